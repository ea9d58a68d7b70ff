"""The one-line answer of a benchmark: the fastest backend whose parity passed on this machine, and how to
use it (the export and predict flags that give the measured variant)."""

from __future__ import annotations

import math
from typing import Any

from .machine import reliability, unsteady
from .variants import parse_variant

__all__ = ["recommendation", "render_recommendation", "how_to_run"]

#: Variants that exist to compare against, not to deploy: untuned ONNX Runtime, OpenVINO on a plain export.
_COMPARISON_FLAGS = ("default", "plain")


def _deployable(case: dict[str, Any]) -> bool:
    par = case.get("parity") or {}
    name = str(case["backend"])
    return bool(par.get("passed", par.get("reference"))) and not any(
        flag in name.split("-")[1:] for flag in _COMPARISON_FLAGS)


def recommendation(report: dict[str, Any]) -> dict[str, Any] | None:
    """The verified variant with the lowest geometric-mean p50 latency over the scales where every such
    variant ran, with its p50 per input size and speed-up over eager fp32; None without a verified case."""
    cases = [c for c in report.get("cases", []) if _deployable(c)]
    by_variant: dict[str, dict[str, dict[str, Any]]] = {}
    for c in cases:
        by_variant.setdefault(c["backend"], {})[c["input"]] = c
    if not by_variant:
        return None
    inputs = set.intersection(*(set(v) for v in by_variant.values())) or set(next(iter(by_variant.values())))
    scored = {name: math.fsum(math.log(rows[i]["latency"]["p50_ms"]) for i in inputs)
              for name, rows in by_variant.items() if inputs <= set(rows)}
    best = min(scored, key=lambda name: scored[name])
    eager = {c["input"]: c for c in report.get("cases", []) if c["backend"] == "torch"}
    sizes = []
    for size in sorted(inputs, key=lambda s: int(s.split("x")[0])):
        p50 = by_variant[best][size]["latency"]["p50_ms"]
        speedup = eager[size]["latency"]["p50_ms"] / p50 if size in eager else None
        sizes.append({"input": size, "p50_ms": p50, "speedup_vs_eager": speedup})
    doubtful = reliability(report)["busy"] or any(unsteady(by_variant[best][i]) for i in inputs)
    return {"backend": best, "sizes": sizes, "unreliable": doubtful, "how": how_to_run(best)}


def how_to_run(variant: str) -> str:
    """The commands that run ``variant`` on your own model (after `unet-deploy train`)."""
    v = parse_variant(variant)
    if v.backend == "torch":
        flags = [f"--precision {v.precision}"] if v.precision != "fp32" else []
        flags += ["--channels-last"] if v.channels_last else []
        flags += [f"--compile {v.compile}"] if v.compile else []
        return " ".join(["unet-deploy predict", *flags, "IMAGES"])
    if v.backend == "torchscript":
        return "unet-deploy export --format torchscript && unet-deploy predict --backend torchscript IMAGES"
    if v.backend == "ort":
        extra = {"int8": " --int8", "fp16": " --fp16"}.get(v.precision, "")
        model = f" -m exported/best.{v.precision}.onnx" if extra else ""
        return f"unet-deploy export --format onnx{extra} && unet-deploy predict --backend ort{model} IMAGES"
    if v.precision == "int8":
        return ("unet-deploy export --format openvino --int8 && unet-deploy predict --backend openvino "
                "-m exported/best.int8.xml IMAGES")
    hint = f" --precision {v.precision}" if v.precision != "fp32" else ""
    return f"unet-deploy export --format openvino && unet-deploy predict --backend openvino{hint} IMAGES"


def render_recommendation(report: dict[str, Any]) -> str | None:
    """One line: the fastest verified backend here, its latency per size and speed-up, and how to run it."""
    rec = recommendation(report)
    if rec is None:
        return None
    parts = []
    for s in rec["sizes"]:
        gain = f", {s['speedup_vs_eager']:.2f}x eager" if s["speedup_vs_eager"] is not None else ""
        parts.append(f"{s['p50_ms']:,.1f} ms at {s['input']}{gain}")
    note = " (machine busy or timings unsteady: rerun to confirm)" if rec["unreliable"] else ""
    return (f"recommended on this machine: {rec['backend']}, the fastest backend whose parity passed "
            f"({'; '.join(parts)}){note}: {rec['how']}")
