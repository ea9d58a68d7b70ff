"""The report in the terminal: the results table (rich), the speed-up line per scale with its "?" footnotes,
the roofline and the targets."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from unet_deploy.bench.analysis import speedups, targets
from unet_deploy.bench.machine import reliability, reliability_notes, unsteady
from unet_deploy.bench.probe import images_per_s
from unet_deploy.bench.variants import variant_label
from unet_deploy.runtime.registry import REFERENCE_BACKEND

__all__ = ["COLUMNS", "mark_doubtful", "parity_text", "table_rows", "run_title", "render_table", "render_speedups",
           "render_targets", "render_roofline", "limit_lines", "busy_peaks_note", "fmt_rate",
           "fmt_pct"]

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
        if "ExecutionProvider" in c.get("provider", ""):  # ONNX Runtime's: which one ran it
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
                 for r in rows if r["scale"] == scale and r["backend"] != REFERENCE_BACKEND]
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
    """Plain-text roofline lines for the terminal (empty without ``--roofline``): both peaks per precision,
    each backend's rate and its fraction of both peaks, the ceilings and the fastest case."""
    roof = report.get("roofline")
    if not roof:
        return []
    if roof.get("schema") is None:
        return _roofline_v1_lines(roof)
    out = []
    peaks = roof.get("peaks")
    if peaks:
        cpu, clock, layer = peaks["cpu"], peaks["clock"], peaks["layer"]
        ghz = "?" if clock["ghz"] is None else f"{clock['ghz']:.2f} GHz"
        out.append(f"roofline: {cpu['model_name'] or '?'} = {cpu['uarch']} ({cpu['source']}), clock {ghz} "
                   f"({'measured' if clock['measured'] else 'reported by the OS, not measured'}), "
                   f"{peaks['cores']} cores; layer {layer['layer']}")
        for p, ops in cpu["per_cycle"].items():
            theory, best = peaks["theoretical"].get(p), layer["best"].get(p)
            out.append(f"roofline peak {p}: theoretical {fmt_rate(theory)} ({ops or '?'}/core/cycle), best layer "
                       + ("-" if best is None else f"{best['gops']:.3g} ({best['runtime']})") + " G(FL)OP/s")
        if layer.get("skipped"):
            out.append("roofline: skipped " + "; ".join(f"{k} ({v})" for k, v in layer["skipped"].items()))
        note = busy_peaks_note(peaks)
        if note:
            out.append(f"roofline: {note}")
    for entry in roof["sizes"]:
        parts = [f"{variant_label(n)} {fmt_rate(c['gflops'])} ({fmt_pct(c['of_theoretical'])} / "
                 f"{fmt_pct(c['of_best_layer'])})" for n, c in entry["cases"].items()]
        out.append(f"roofline {entry['input']}: {entry['gflop']:.4g} GFLOP per image; G(FL)OP/s (of theoretical / "
                   "best layer peak): " + ", ".join(parts))
        out += [f"roofline {line}" for line in limit_lines(entry, floors=False)]  # ceilings, fastest case
    return out


def fmt_rate(x: float | None) -> str:
    """A rate with 3 significant digits, "-" for none."""
    return "-" if x is None else f"{x:.3g}"


def fmt_ms(ms: float) -> str:
    """Milliseconds: whole with thousands separators from 100 up, else 3 significant digits."""
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_pct(x: float | None) -> str:
    """A fraction as a whole percentage, "-" for none."""
    return "-" if x is None else f"{100 * x:.0f}%"


def busy_peaks_note(peaks: dict[str, Any] | None) -> str | None:
    """A "?" line when the layer was timed on a busy machine (load above the cores it used): its rates, the
    best-layer ceilings and every fraction are then low; the theoretical peak is not (clock in CPU time)."""
    load = (peaks or {}).get("load_avg_1m")
    if load is None or peaks is None or load <= peaks["cores"]:
        return None
    return (f"? machine busy as the layer was timed (load {load:.1f} on {peaks['cores']} cores): best-layer peaks, "
            "their ceilings and the fractions are unreliable (too low); the theoretical peak is not affected "
            "(its clock counts CPU time)")


def limit_lines(entry: dict[str, Any], floors: bool = True) -> list[str]:
    """Per input size: floors at each peak (unless ``floors`` is False), speed-up ceilings over eager fp32,
    and the fastest case."""
    out = []
    floor_ms = entry.get("floor_ms") or {}
    if floors and floor_ms:
        out.append(f"{entry['input']}: floor latency " + ", ".join(
            f"{p} " + " / ".join(f"{fmt_ms(ms)} ms ({kind.replace('_', ' ')})" for kind, ms in f.items())
            for p, f in floor_ms.items()))
    best, theory = entry.get("ceiling_speedup") or {}, entry.get("ceiling_speedup_theoretical") or {}
    if best or theory:
        out.append(f"{entry['input']}: largest speed-up over eager fp32 ({fmt_rate(entry.get('eager_gflops'))} "
                   "GFLOP/s on the network) = peak / eager's rate: " + ", ".join(
                       f"{p} {best[p]:.2f}x (best layer)" + (f" / {theory[p]:.2f}x (theoretical)" if p in theory
                                                             else "") for p in best))
    b = entry.get("best")
    if b:
        speed = "" if b["speedup"] is None else f"{b['speedup']:.2f}x eager fp32, "
        int8 = ("" if b["precision"] == "int8" else
                f"; {fmt_pct(b['of_theoretical_int8'])} / {fmt_pct(b['of_best_layer_int8'])} of the int8 peaks")
        out.append(f"{entry['input']}: fastest {variant_label(b['backend'])} ({b['precision']}): {speed}"
                   f"{fmt_rate(b['gflops'])} G(FL)OP/s = {fmt_pct(b['of_theoretical'])} of the theoretical and "
                   f"{fmt_pct(b['of_best_layer'])} of the best layer {b['precision']} peak{int8}")
    return out


def _roofline_v1_lines(roof: dict[str, Any]) -> list[str]:
    """A report from before the roofline schema: ONNX Runtime's probe peaks only."""
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
