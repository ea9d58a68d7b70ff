"""How close each backend runs to what this machine can do: the network's work against two peaks.

Speed-up targets are ratios, and a ratio is bounded by the hardware. This module puts each backend's rate
on the whole network beside two peaks per precision (fp32, bf16, int8), neither taken from the network's
own runs, so a ceiling can never equal the best result by construction:

* the **theoretical** peak: per-core per-cycle operations of the CPU's vector units
  (:mod:`.uarch`: microarchitecture table, or the ISA flags) x the clock timed on a dependent-instruction
  loop (:mod:`.cpu_clock`; VMs often report only the base clock) x the cores the benchmark uses;
* the **best layer** peak: the best rate any installed runtime reaches on one compute-bound 3x3
  convolution (:mod:`.peaks`: ONNX Runtime, torch/oneDNN, OpenVINO).

* :func:`network_work` - multiply-accumulates of every convolution of a U-Net at an input size
  (counted with hooks on the ``meta`` device: no memory, no compute). The seed network at 959x640 is
  373 GMAC = 746 GFLOP in its bilinear variant (the figure in the design notes) and 899 GFLOP in the
  transposed one (Pytorch-UNet's default, which the benchmark uses).
* :func:`measure_peaks` - both peaks of this machine.
* :func:`roofline_report` - per input size: each case's achieved G(FL)OP/s as a fraction of both peaks of its
  precision, the floor latency at each peak, and the speed-up ceilings over eager fp32 (peak / eager's rate).

``unet-deploy benchmark --roofline`` adds the result to the report (``ROOFLINE_SCHEMA``; reports written
before it have ONNX Runtime's probe peaks only and are still rendered).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from unet_deploy.bench.cpu_clock import measure_clock
from unet_deploy.bench.machine import load_average_1m
from unet_deploy.bench.peaks import PEAK_LAYER, measure_layer_peaks
from unet_deploy.bench.uarch import PRECISIONS, per_cycle, read_cpu, theoretical_peaks
from unet_deploy.runtime.ort_session import physical_cores
from unet_deploy.runtime.registry import REFERENCE_BACKEND

__all__ = ["ROOFLINE_SCHEMA", "network_work", "measure_peaks", "roofline_report", "precision_of", "PEAK_LAYER"]

#: Version of the ``roofline`` section of a benchmark report (absent in reports with ORT's probe peaks only).
ROOFLINE_SCHEMA = "unet-deploy.roofline/2"


def network_work(config: Any, width: int, height: int) -> dict[str, float]:
    """Multiply-accumulates of the U-Net described by ``config`` (a ModelConfig) at ``width`` x ``height``
    (batch 1): ``{"gmac": ..., "gflop": ...}`` with one multiply-add = 2 FLOP."""
    with torch.device("meta"):
        model = config.build().eval()
    macs = 0

    def conv_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal macs
        w = cast(torch.Tensor, module.weight)  # hooks are registered on convolutions only
        if isinstance(module, nn.ConvTranspose2d):  # every input pixel feeds C_out x kH x kW outputs
            macs += inputs[0].numel() * w.shape[1] * w.shape[2] * w.shape[3]
        else:  # every output pixel reads C_in / groups x kH x kW inputs
            macs += output.numel() * w.shape[1] * w.shape[2] * w.shape[3]

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            model(torch.empty(1, config.n_channels, height, width, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return {"gmac": macs / 1e9, "gflop": 2 * macs / 1e9}


def precision_of(case: dict[str, Any]) -> str:
    """A case's precision: its ``precision`` field, else from the variant name (fp32 unless -bf16/-fp16/-int8)."""
    if case.get("precision"):
        return str(case["precision"])
    parts = str(case["backend"]).split("-")
    return next((p for p in ("bf16", "fp16", "int8") if p in parts), "fp32")


def measure_peaks(threads: int | None = None, runs: int = 10, layer: dict[str, int] | None = None) -> dict[str, Any]:
    """This machine's theoretical peak (per-cycle table x timed clock x cores) and best-layer peak per
    precision, in G(FL)OP/s, with where each number came from."""
    cores = threads or physical_cores()
    cpu = read_cpu()
    ops = per_cycle(cpu)
    clock = measure_clock(cores)
    load = load_average_1m()  # other work lowers the layer rates (not the clock: it counts CPU time)
    return {
        "cpu": {"model_name": cpu.model_name, "vendor": cpu.vendor, "family": cpu.family, "model": cpu.model,
                "uarch": ops["uarch"], "source": ops["source"], "capped": ops["capped"],
                "per_cycle": {p: ops[p] for p in PRECISIONS}},
        "clock": clock, "cores": cores, "load_avg_1m": load,
        "theoretical": theoretical_peaks(ops, clock["ghz"], cores),
        "layer": measure_layer_peaks(cores, runs, layer),  # every runtime on the cores the peak counts
    }


def _peak(peaks: dict[str, Any] | None, kind: str, precision: str) -> float | None:
    """The ``kind`` ("theoretical" / "best_layer") peak of ``precision`` in G(FL)OP/s, or None."""
    if not peaks:
        return None
    if kind == "theoretical":
        return (peaks.get("theoretical") or {}).get(precision)
    return ((peaks.get("layer") or {}).get("best") or {}).get(precision, {}).get("gops")


def _share(rate: float | None, peak: float | None) -> float | None:
    return rate / peak if rate and peak else None


def _case_entry(case: dict[str, Any], gflop: float, peaks: dict[str, Any] | None) -> dict[str, Any]:
    """One case's achieved rate on the whole network and its fraction of both peaks of its precision."""
    p50_s = case["latency"]["p50_ms"] / 1e3
    rate = gflop / p50_s if p50_s > 0 else None
    precision = precision_of(case)
    cpu = case.get("device", "cpu") == "cpu"
    return {"precision": precision, "gflops": rate,
            "of_theoretical": _share(rate, _peak(peaks, "theoretical", precision)) if cpu else None,
            "of_best_layer": _share(rate, _peak(peaks, "best_layer", precision)) if cpu else None}


def _limits(entry: dict[str, Any], peaks: dict[str, Any] | None, eager_rate: float | None) -> None:
    """Floor latency at each peak, and speed-up ceilings over eager fp32 = peak / eager's rate (never from
    any case's own rate but eager's)."""
    floor: dict[str, dict[str, float]] = {}
    best: dict[str, float] = {}
    theory: dict[str, float] = {}
    for p in PRECISIONS:
        for kind, ceiling in (("best_layer", best), ("theoretical", theory)):
            peak = _peak(peaks, kind, p)
            if peak:
                floor.setdefault(p, {})[kind] = 1e3 * entry["gflop"] / peak
                if eager_rate:
                    ceiling[p] = peak / eager_rate
    entry["floor_ms"] = floor
    entry["ceiling_speedup"] = best  # best-layer ceilings, per precision (analysis.targets quotes these)
    entry["ceiling_speedup_theoretical"] = theory


def _best_case(entry: dict[str, Any], rows: list[dict[str, Any]], eager: dict[str, Any] | None,
               peaks: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fastest case whose parity passed: speed-up over eager, fractions of its precision's peaks and of
    the int8 peaks (the fastest CPU path is normally int8; the issue asks for both)."""
    ok = [c for c in rows if c.get("parity", {}).get("passed", True)]
    if not ok:
        return None
    fast = min(ok, key=lambda c: c["latency"]["p50_ms"])
    own = entry["cases"][fast["backend"]]
    rate = own["gflops"]
    return {"backend": fast["backend"], "precision": own["precision"], "gflops": rate,
            "speedup": eager["latency"]["p50_ms"] / fast["latency"]["p50_ms"] if eager else None,
            "of_theoretical": own["of_theoretical"], "of_best_layer": own["of_best_layer"],
            "of_theoretical_int8": _share(rate, _peak(peaks, "theoretical", "int8")),
            "of_best_layer_int8": _share(rate, _peak(peaks, "best_layer", "int8"))}


def roofline_report(report: dict[str, Any], config: Any, peaks: dict[str, Any] | None) -> dict[str, Any]:
    """Per input size of a benchmark ``report``: the network's GFLOP, each case's achieved rate and
    fraction of both peaks of its precision, the floors and speed-up ceilings, and the fastest case."""
    sizes: dict[str, dict[str, Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for case in report["cases"]:
        size = case["input"]
        if size not in sizes:
            gflop = network_work(config, case["input_width"], case["input_height"])["gflop"]
            sizes[size] = {"input": size, "gflop": gflop, "cases": {}}
        sizes[size]["cases"][case["backend"]] = _case_entry(case, sizes[size]["gflop"], peaks)
        rows.setdefault(size, []).append(case)
    for size, entry in sizes.items():
        eager = next((c for c in rows[size] if c["backend"] == REFERENCE_BACKEND), None)
        entry["eager_gflops"] = entry["cases"][REFERENCE_BACKEND]["gflops"] if eager else None
        _limits(entry, peaks, entry["eager_gflops"])
        entry["best"] = _best_case(entry, rows[size], eager, peaks)
    return {"schema": ROOFLINE_SCHEMA, "peaks": peaks, "sizes": list(sizes.values())}
