"""The report in the terminal: the results table (rich), the speed-up line per scale with its "?" footnotes,
the roofline and the targets."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ..analysis import speedups, targets
from ..machine import reliability, reliability_notes, unsteady
from ..probe import images_per_s
from ..variants import variant_label

__all__ = ["COLUMNS", "mark_doubtful", "parity_text", "table_rows", "run_title", "render_table", "render_speedups",
           "render_targets", "render_roofline"]

#: Table columns; img/s is 1000 / p50 ms x batch, so it always agrees with the p50 column.
COLUMNS = ("backend", "precision", "scale", "input", "parity vs eager", "p50 ms", "p90 ms", "img/s (p50)",
           "peak MiB", "file MB")


def mark_doubtful(text: str, doubtful: bool) -> str:
    """``text`` with a " ?" when the number is not to be trusted."""
    return f"{text} ?" if doubtful else text


def parity_text(case: dict[str, Any]) -> str:
    """The parity cell: "reference" for eager, else relative error and pixel agreement (ok / FAIL)."""
    p = case["parity"]
    if p.get("reference"):
        return "reference"
    verdict = "" if "passed" not in p else (" ok" if p["passed"] else " FAIL")
    return f"rel {p['max_rel_err']:.1e}, {100 * p['pixel_agreement']:.2f}% px{verdict}"


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Table rows; the p50 of a case timed on a busy machine or with unsteady timings is marked "?"."""
    rows = []
    busy = reliability(report)["busy"]
    for c in report["cases"]:
        lat = c["latency"]
        name = variant_label(c["backend"])
        if c.get("runtime", c["backend"]) == "ort":
            name += f" ({c['provider'].split(',')[0].replace('ExecutionProvider', '')})"
        per_s = images_per_s(lat["p50_ms"], lat.get("batch", 1))  # also for JSON written before img/s used p50
        rows.append([name, c["precision"], f"{c['scale']:g}", c["input"], parity_text(c),
                     mark_doubtful(f"{lat['p50_ms']:.1f}", busy or unsteady(c)), f"{lat['p90_ms']:.1f}",
                     f"{per_s:.2f}", f"{c['peak_mib']:.0f}", f"{c['file_mb']:.1f}"])
    return rows


def run_title(report: dict[str, Any]) -> str:
    """One line: model, device, machine, warm-up and runs (the table's and the plot's title)."""
    m, s = report["machine"], report["settings"]
    where = m["gpu"] or f"{m['cpu']}, {m['cores_usable']} cores"
    mode = "QUICK MODE, " if s["quick"] else ""
    return (f"{mode}{report['model']['architecture']} ({report['model']['source']}) on {s['device']} "
            f"[{where}]; warmup {s['warmup']}, runs {s['runs']}")


def render_table(report: dict[str, Any]) -> Any:
    """The results as a rich Table (print it with a rich Console)."""
    table = Table(title=run_title(report), title_justify="left")
    for col in COLUMNS:
        numeric = col.startswith(("p50", "p90", "img/s", "peak", "file")) or col == "scale"
        table.add_column(col, justify="right" if numeric else "left")
    for row in table_rows(report):
        table.add_row(*row)
    return table


def render_speedups(report: dict[str, Any]) -> str:
    """One line per scale: each backend's speed-up and memory ratio against eager ("?" = unreliable), then
    the footnotes explaining any "?"."""
    lines = []
    rows = speedups(report)  # recomputed: JSON from before the reliability flags gets them too
    for scale in report["settings"]["scales"]:
        parts = [mark_doubtful(f"{variant_label(r['backend'])} {r['speedup_p50']:.2f}x", r["unreliable"])
                 + (f" ({r['memory_ratio']:.2f}x memory)" if r["memory_ratio"] is not None else "")
                 for r in rows if r["scale"] == scale and r["backend"] != "torch"]
        if parts:
            lines.append(f"scale {scale:g}: speed-up vs eager (p50): " + ", ".join(parts))
    return "\n".join(lines + reliability_notes(report))


def render_targets(report: dict[str, Any]) -> list[str]:
    """The project's own targets (met / NOT met), one line each: for the record (``--targets``), not for
    users judging a backend."""
    out = []
    for goal in report["targets"] if "targets" in report else targets(report):
        ceiling = (f"; ceiling here {goal['ceiling']:.2f}x, {'reachable' if goal['reachable'] else 'out of reach'}"
                   if "ceiling" in goal else "")
        out.append(f"target: {goal['target']}: {goal['measured']} ({'met' if goal['met'] else 'NOT met'}{ceiling})")
    return out


def render_roofline(report: dict[str, Any]) -> list[str]:
    """Plain-text roofline lines for the terminal (empty without ``--roofline``)."""
    roof = report.get("roofline")
    if not roof:
        return []
    out = []
    peaks = roof.get("peaks")
    if peaks:
        out.append(f"roofline: ONNX Runtime peak on {peaks['layer']}: fp32 {peaks['fp32_gflops']:.0f} GFLOP/s, "
                   f"int8 {peaks['int8_gops']:.0f} GOP/s")
    for entry in roof["sizes"]:
        parts = [f"{variant_label(n)} {c['gflops']:.3g}" for n, c in entry["cases"].items() if c["gflops"]]
        line = f"roofline {entry['input']}: {entry['gflop']:.4g} GFLOP per image; GFLOP/s: " + ", ".join(parts)
        if entry.get("ceiling_speedup"):
            c = entry["ceiling_speedup"]
            line += f"; largest speed-up over eager allowed: fp32 {c['fp32']:.2f}x, int8 {c['int8']:.2f}x"
        out.append(line)
    return out
