"""The one-line answer of a benchmark: the fastest backend whose parity passed on this machine, for the model the
user deploys, and the commands that run it -- checked by running them once (:mod:`.recommend_check`).

The recommendation comes from the user's model when the benchmark measured one (``-m``, or the
``checkpoints/best.pth`` it found), else from the seed width at scale 0.5; a ``--quick`` run (width 8 on a
small image) only checks the setup and recommends nothing.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from unet_deploy.bench.machine import reliability, unsteady
from unet_deploy.bench.variants import parse_variant
from unet_deploy.runtime.registry import REFERENCE_BACKEND, REGISTRY

__all__ = ["recommendation", "ranked_variants", "how_to_run", "command_line", "render_recommendation",
           "MODEL_WORD", "IMAGES_WORD", "CALIBRATION_WORD", "why_none"]

#: Variants that exist to compare against, not to deploy: untuned ONNX Runtime, OpenVINO on a plain export.
_COMPARISON_FLAGS = ("default", "plain")
#: The model a recommendation for the seed width names: what `unet-deploy train` writes.
MODEL_WORD = "checkpoints/best.pth"
#: Placeholders the printed commands keep (the check fills them in).
IMAGES_WORD = "IMAGES"
CALIBRATION_WORD = "TRAINING_IMAGES"


def _deployable(case: dict[str, Any]) -> bool:
    par = case.get("parity") or {}
    name = str(case["backend"])
    return bool(par.get("passed", par.get("reference"))) and not any(
        flag in name.split("-")[1:] for flag in _COMPARISON_FLAGS)


def _scored(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, dict[str, dict[str, Any]]], set[str]]:
    """(geometric-mean log p50 per verified variant, its cases by input, the inputs compared on)."""
    scales = (report.get("settings") or {}).get("scales") or []
    wanted = 0.5 if not (report.get("settings") or {}).get("checkpoint") and 0.5 in scales else None
    by_variant: dict[str, dict[str, dict[str, Any]]] = {}
    for c in report.get("cases", []):
        if _deployable(c) and (wanted is None or c.get("scale") == wanted):
            by_variant.setdefault(c["backend"], {})[c["input"]] = c
    if not by_variant:
        return {}, {}, set()
    inputs = set.intersection(*(set(v) for v in by_variant.values())) or set(next(iter(by_variant.values())))
    scored = {name: math.fsum(math.log(rows[i]["latency"]["p50_ms"]) for i in inputs)
              for name, rows in by_variant.items() if inputs <= set(rows)}
    return scored, by_variant, inputs


def why_none(report: dict[str, Any]) -> str | None:
    """Why this report recommends nothing (a quick run), or None when it may recommend."""
    settings = report.get("settings") or {}
    if settings.get("quick") and not settings.get("checkpoint"):
        return ("quick run (width 8 on a small image): it checks the setup and recommends nothing; "
                "`unet-deploy benchmark --scales 0.5` recommends for the seed width, "
                "`unet-deploy benchmark -m checkpoints/best.pth` for your model")
    return None


def ranked_variants(report: dict[str, Any]) -> list[str]:
    """Every verified deployable variant, fastest first (geometric mean of p50 over the compared inputs)."""
    if why_none(report):
        return []
    scored, _, _ = _scored(report)
    return sorted(scored, key=lambda name: scored[name])


def recommendation(report: dict[str, Any], variant: str | None = None) -> dict[str, Any] | None:
    """``variant`` (default: the fastest verified one) with its p50 per input size and speed-up over eager
    fp32, and the commands that run it; None without a verified case (or in a quick run)."""
    scored, by_variant, inputs = _scored(report)
    if why_none(report) or not scored:
        return None
    best = variant or min(scored, key=lambda name: scored[name])
    eager = {c["input"]: c for c in report.get("cases", []) if c["backend"] == REFERENCE_BACKEND}
    sizes = []
    for size in sorted(inputs, key=lambda s: int(s.split("x")[0])):
        p50 = by_variant[best][size]["latency"]["p50_ms"]
        speedup = eager[size]["latency"]["p50_ms"] / p50 if size in eager else None
        sizes.append({"input": size, "p50_ms": p50, "speedup_vs_eager": speedup})
    doubtful = reliability(report)["busy"] or any(unsteady(by_variant[best][i]) for i in inputs)
    model = (report.get("settings") or {}).get("checkpoint") or MODEL_WORD
    return {"backend": best, "sizes": sizes, "unreliable": doubtful, "model": model,
            "how": command_line(how_to_run(best, model))}


def how_to_run(variant: str, model: str = MODEL_WORD, calibration: str = CALIBRATION_WORD,
               images: str = IMAGES_WORD) -> list[list[str]]:
    """The commands (argument lists) that run ``variant`` on ``model``: export where needed, then predict."""
    v = parse_variant(variant)
    entry, stem = REGISTRY[v.backend], f"exported/{Path(model).stem}"
    predict = ["unet-deploy", "predict"]
    if entry.export_format is None:  # it runs the checkpoint: the variant's options are predict's flags
        flags = [f"--precision={v.precision}"] if v.precision != "fp32" else []
        flags += ["--channels-last"] if v.channels_last else []
        flags += [f"--compile={v.compile}"] if v.compile else []
        return [[*predict, "-m", model, *flags, images]]
    derived = v.precision in entry.derived_precisions
    extra = ["--int8", "--calibration", calibration] if v.precision == "int8" else [f"--{v.precision}"]
    return [["unet-deploy", "export", "-m", model, "--format", entry.export_format, *(extra if derived else [])],
            [*predict, "--backend", v.backend, "-m", f"{stem}{f'.{v.precision}' if derived else ''}"
             f"{entry.export_suffix}", images]]


def command_line(steps: list[list[str]]) -> str:
    """The steps as one shell line (``a && b``)."""
    return " && ".join(shlex.join(step) for step in steps)


def render_recommendation(report: dict[str, Any]) -> str | None:
    """One line: the fastest verified backend here, its latency per size and speed-up, and how to run it (the
    checked command when the benchmark ran the check)."""
    reason = why_none(report)
    if reason:
        return f"no recommendation: {reason}"
    checked = report.get("recommendation")
    rec = recommendation(report, checked.get("backend") if checked else None)
    if rec is None:
        return None
    parts = []
    for s in rec["sizes"]:
        gain = f", {s['speedup_vs_eager']:.2f}x eager" if s["speedup_vs_eager"] is not None else ""
        parts.append(f"{s['p50_ms']:,.1f} ms at {s['input']}{gain}")
    note = " (machine busy or timings unsteady: rerun to confirm)" if rec["unreliable"] else ""
    how = rec["how"]
    if checked:
        how = checked["command"] + (f" (ran once here in {checked['seconds']:.0f} s)" if checked.get("ok") else "")
        if not checked.get("ok"):
            return f"no recommendation: {checked.get('error', 'no recommended command ran here')}"
    for skipped in (checked or {}).get("failed", []):
        note += f"; {skipped['backend']} was faster but its commands failed here ({skipped['error']})"
    if CALIBRATION_WORD in how:
        note += f" (replace {CALIBRATION_WORD} with a folder of your training images)"
    for_what = "your model" if rec["model"] != MODEL_WORD or (report.get("settings") or {}).get("checkpoint") \
        else "the seed width at scale 0.5"
    return (f"recommended on this machine for {for_what}: {rec['backend']}, the fastest backend whose parity "
            f"passed ({'; '.join(parts)}){note}: {how}")
