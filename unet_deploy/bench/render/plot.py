"""The report as a PNG: latency (p50 bars, p90 whiskers) and peak memory per backend and scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.bench.render.table import run_title
from unet_deploy.bench.variants import variant_label
from unet_deploy.fileio import atomic_path

__all__ = ["write_plot"]


def write_plot(report: dict[str, Any], path: str | Path) -> Path:
    """Latency (p50 bars with p90 whiskers) and peak memory per backend and scale, side by side (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = report["settings"]["scales"]
    backends = list(dict.fromkeys(c["backend"] for c in report["cases"]))
    x = np.arange(len(scales))
    width = 0.8 / max(len(backends), 1)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    for i, b in enumerate(backends):
        by_scale = {c["scale"]: c for c in report["cases"] if c["backend"] == b}
        p50 = [by_scale[s]["latency"]["p50_ms"] if s in by_scale else np.nan for s in scales]
        p90 = [by_scale[s]["latency"]["p90_ms"] if s in by_scale else np.nan for s in scales]
        mem = [by_scale[s]["peak_mib"] if s in by_scale else np.nan for s in scales]
        pos = x + (i - (len(backends) - 1) / 2) * width
        yerr = np.vstack([np.zeros(len(p50)), np.maximum(np.subtract(p90, p50), 0)])
        ax_t.bar(pos, p50, width, yerr=yerr, capsize=3, label=variant_label(b))
        ax_m.bar(pos, mem, width, label=variant_label(b))
    labels = []
    for s in scales:
        case = next((c for c in report["cases"] if c["scale"] == s), None)
        labels.append(f"scale {s:g}\n{case['input'] if case else ''}")
    for ax, ylabel, title in ((ax_t, "latency ms (p50, whisker p90)", "Latency per image"),
                              (ax_m, "peak MiB", "Peak memory")):
        ax.set_xticks(x, labels)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(run_title(report), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
