"""What a report says: each backend's speed-up and memory against eager, each fast path against what it
replaces (before/after), and the project's targets this run can judge."""

from __future__ import annotations

from typing import Any

from unet_deploy.bench.machine import reliability, unsteady
from unet_deploy.bench.settings import CARVANA_SIZE
from unet_deploy.bench.variants import variant_label

__all__ = ["CPU_TARGETS", "CPU_MEMORY_TARGET", "GPU_LATENCY_TARGET_MS", "GPU_MEMORY_TARGET", "BEFORE_AFTER",
           "speedups", "targets", "ceilings", "before_after"]

#: Issue targets, checked on full-size runs (a 1918x1280 source image) only.
CPU_TARGETS = {"ort": 2.5, "ort-int8": 6.5}
CPU_MEMORY_TARGET = 0.5  # ORT peak RSS <= this x eager
GPU_LATENCY_TARGET_MS = {959: 1.6, 1918: 6.5}  # best backend, on an H200
GPU_MEMORY_TARGET = 0.3  # best backend's peak <= this x the seed default (eager fp32)
#: (before, after) variant pairs shown in the before/after table when both were measured.
BEFORE_AFTER = (("ort-default", "ort"), ("torch", "torch-cl"), ("torch", "torch-bf16"), ("torch", "torch-bf16-cl"),
                ("torch", "torch-compile"), ("torch", "torch-fp16-cl"), ("torch", "torch-fp16-cl-compile"),
                ("torch", "torch-fp16-cl-cgraph"), ("ort", "ort-int8"), ("ort", "ort-fp16"), ("ort", "ort-iob"),
                ("ort-fp16", "ort-fp16-iob"))


def speedups(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scale, each backend against eager torch measured in the same run: speed-up of p50 latency
    (> 1 = faster than eager) and peak memory relative to eager (< 1 = less memory)."""
    out = []
    busy = reliability(report)["busy"]
    for scale in report["settings"]["scales"]:
        rows = {c["backend"]: c for c in report["cases"] if c["scale"] == scale}
        eager = rows.get("torch")
        if eager is None:
            continue
        for name, case in rows.items():
            mem = case["peak_mib"] / eager["peak_mib"] if eager["peak_mib"] > 0 else None
            out.append({"scale": scale, "backend": name, "input": case["input"],
                        "speedup_p50": eager["latency"]["p50_ms"] / case["latency"]["p50_ms"],
                        "memory_ratio": mem, "unreliable": busy or unsteady(eager) or unsteady(case)})
    return out


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets that this run can judge: ``target``, ``measured`` (text), ``met`` (bool)."""
    s = report["settings"]
    if s.get("quick") or list(s.get("image_size") or []) != list(CARVANA_SIZE):
        return []
    out: list[dict[str, Any]] = []
    cuda = str(s["device"]).startswith("cuda")
    for scale in s["scales"]:
        rows = {c["backend"]: c for c in report["cases"] if c["scale"] == scale}
        if not rows:
            continue
        out += _gpu_targets(rows) if cuda else _cpu_targets(report, rows)
    return out


def _cpu_targets(report: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """ORT (and int8) speed-up over eager at 959x640, with the roofline's ceiling when measured; ORT's memory."""
    eager = rows.get("torch")
    if eager is None:
        return []
    out: list[dict[str, Any]] = []
    size = next(iter(rows.values()))["input"]
    width = next(iter(rows.values()))["input_width"]
    roof = ceilings(report, size)
    for name, want in CPU_TARGETS.items():
        if name in rows and width == 959:
            got = eager["latency"]["p50_ms"] / rows[name]["latency"]["p50_ms"]
            goal = {"target": f"{variant_label(name)} >= {want:g}x eager fp32 at {size}",
                    "measured": f"{got:.2f}x", "met": got >= want}
            ceiling = roof.get("int8" if name == "ort-int8" else "fp32")
            if ceiling is not None:
                goal["ceiling"] = ceiling
                goal["reachable"] = ceiling >= want
            out.append(goal)
    if "ort" in rows and eager["peak_mib"] > 0:
        got = rows["ort"]["peak_mib"] / eager["peak_mib"]
        out.append({"target": f"onnxruntime peak RSS <= {CPU_MEMORY_TARGET:g}x eager at {size}",
                    "measured": f"{got:.2f}x", "met": got <= CPU_MEMORY_TARGET})
    return out


def _gpu_targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The best backend's latency (H200) and the lowest peak memory against eager fp32."""
    eager = rows.get("torch")
    size = next(iter(rows.values()))["input"]
    width = next(iter(rows.values()))["input_width"]
    out: list[dict[str, Any]] = []
    ok = [c for c in rows.values() if c["parity"].get("passed", True)]
    best = min(ok, key=lambda c: c["latency"]["p50_ms"]) if ok else None
    want = GPU_LATENCY_TARGET_MS.get(width)
    if best is not None and want is not None:
        got = best["latency"]["p50_ms"]
        out.append({"target": f"best backend <= {want:g} ms at {size} (H200)",
                    "measured": f"{got:.2f} ms ({variant_label(best['backend'])})", "met": got <= want})
    if best is not None and eager is not None and eager["peak_mib"] > 0:
        lowest = min(ok, key=lambda c: c["peak_mib"])
        got = lowest["peak_mib"] / eager["peak_mib"]
        out.append({"target": f"peak memory <= {GPU_MEMORY_TARGET:g}x the seed default at {size}",
                    "measured": f"{got:.2f}x ({variant_label(lowest['backend'])})", "met": got <= GPU_MEMORY_TARGET})
    return out


def ceilings(report: dict[str, Any], size: str) -> dict[str, float]:
    """Largest speed-up over eager fp32 per precision at ``size`` (``--roofline`` runs): the best layer peak
    of any installed runtime / eager's rate on the whole network (reports before the roofline schema: ONNX
    Runtime's fp32 and int8 probe peaks). Never computed from the case's own run."""
    for entry in (report.get("roofline") or {}).get("sizes", []):
        if entry["input"] == size:
            return dict(entry.get("ceiling_speedup") or {})
    return {}


def before_after(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each fast path against what it replaces, same run, same scale: speed-up and memory ratio."""
    out = []
    busy = reliability(report)["busy"]
    for scale in report["settings"]["scales"]:
        rows = {c["backend"]: c for c in report["cases"] if c["scale"] == scale}
        for before, after in BEFORE_AFTER:
            if before in rows and after in rows:
                b, a = rows[before], rows[after]
                out.append({"scale": scale, "input": a["input"], "before": before, "after": after,
                            "before_ms": b["latency"]["p50_ms"], "after_ms": a["latency"]["p50_ms"],
                            "speedup": b["latency"]["p50_ms"] / a["latency"]["p50_ms"],
                            "before_mib": b["peak_mib"], "after_mib": a["peak_mib"],
                            "memory_ratio": a["peak_mib"] / b["peak_mib"] if b["peak_mib"] > 0 else None,
                            "unreliable": busy or unsteady(a) or unsteady(b)})
    return out
