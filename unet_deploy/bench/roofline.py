"""How close each backend runs to what this machine can do: the network's work and the CPU's measured peak.

Speed-up targets are ratios, and a ratio is bounded by the hardware: if ONNX Runtime's own convolution
kernels cannot run faster than P GFLOP/s here, no session setting gets the network below its work / P.
This module measures both sides so a benchmark says *how far* a backend is from that floor:

* :func:`network_work` - multiply-accumulates of every convolution of a U-Net at an input size
  (counted with hooks on the ``meta`` device: no memory, no compute). The seed network at 959x640 is
  373 GMAC = 746 GFLOP in its bilinear variant (the figure in the design notes) and 899 GFLOP in the
  transposed one (Pytorch-UNet's default, which the benchmark uses).
* :func:`measure_peaks` - the sustained throughput of ONNX Runtime's float32 convolution (NCHWc kernels)
  and of its static int8 QDQ convolution (u8 x s8, VNNI on AVX-512 CPUs) on one large, compute-bound 3x3
  layer, with the same session options the ``ort`` backend uses and the same quantisation recipe as
  ``export --int8``. The best of several runs is the peak.

``unet-deploy benchmark --roofline`` adds both to the report: achieved GFLOP/s per backend, the floor
latency of the whole network at each peak, and the largest speed-up over eager those floors allow.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ..backends import ort_session_options
from ..onnx_passes import fold_qdq_data_movement

__all__ = ["network_work", "measure_peaks", "roofline_report", "PEAK_LAYER"]

#: The probe layer: 3x3 convolution, 256 -> 256 channels on a 160x120 map (11.3 GMAC): big enough to be
#: compute-bound on a CPU, small enough to time in well under a second per run.
PEAK_LAYER = {"channels": 256, "height": 120, "width": 160}


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


def _probe_model(channels: int, height: int, width: int) -> Any:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((channels, channels, 3, 3)) / np.sqrt(9 * channels)).astype(np.float32)
    b = np.zeros(channels, np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, height, width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, height, width])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model


def _time_session(path: Path, feed: np.ndarray, threads: int | None, runs: int) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=ort_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: feed})  # warm-up: weight packing, thread pool start
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: feed})
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantiser logs advice on the root logger ("consider pre-processing"); a one-layer probe needs none."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


def measure_peaks(threads: int | None = None, runs: int = 10, layer: dict[str, int] | None = None) -> dict[str, Any]:
    """Peak GFLOP/s (float32) and GOP/s (int8) of ONNX Runtime's CPU convolutions on the probe layer."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    spec = dict(PEAK_LAYER if layer is None else layer)
    c, h, w = spec["channels"], spec["height"], spec["width"]
    gflop = 2 * c * c * 9 * h * w / 1e9
    feed = np.random.default_rng(1).random((1, c, h, w), dtype=np.float32)

    class _One(CalibrationDataReader):
        def __init__(self) -> None:
            self.done = False

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.done:
                return None
            self.done = True
            return {"x": feed}

    with tempfile.TemporaryDirectory(prefix="unet-roofline-") as tmp, _quiet():
        fp32 = Path(tmp) / "fp32.onnx"
        onnx.save_model(_probe_model(c, h, w), str(fp32))
        int8 = Path(tmp) / "int8.onnx"
        quantize_static(str(fp32), str(int8), _One(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        quantized = onnx.load(str(int8))
        fold_qdq_data_movement(quantized)
        onnx.save_model(quantized, str(int8))
        t_fp32 = _time_session(fp32, feed, threads, runs)
        t_int8 = _time_session(int8, feed, threads, runs)
    return {"layer": f"conv 3x3 {c}->{c} on {w}x{h}", "gflop": gflop, "threads": threads, "runs": runs,
            "fp32_ms": 1e3 * t_fp32, "int8_ms": 1e3 * t_int8,
            "fp32_gflops": gflop / t_fp32, "int8_gops": gflop / t_int8}


_PEAK_KEYS = {"fp32": "fp32_gflops", "int8": "int8_gops"}


def _ort_cpu_rate(case: dict[str, Any], gflop: float) -> tuple[str, float] | None:
    """(precision, GFLOP/s) of an ONNX Runtime CPU case at fp32 or int8, the kernels the probe times."""
    if (case["backend"].startswith("ort") and case.get("device", "cpu") == "cpu"
            and case.get("precision") in _PEAK_KEYS and case["latency"]["p50_ms"] > 0):
        return case["precision"], gflop / (case["latency"]["p50_ms"] / 1e3)
    return None


def _effective_peaks(report: dict[str, Any], gflop: dict[str, float], peaks: dict[str, Any]) -> dict[str, Any]:
    """The probe's peaks, raised to the best rate an ONNX Runtime case of the same precision reached on the
    whole network (a probe disturbed by other work on a shared machine must not give a ceiling below what
    was observed); ``raised`` names the precisions where that happened. ``gflop``: work per input size."""
    peaks = dict(peaks)
    best: dict[str, float] = {}
    for case in report["cases"]:
        rate = _ort_cpu_rate(case, gflop[case["input"]])
        if rate is not None:
            best[rate[0]] = max(best.get(rate[0], 0.0), rate[1])
    raised = [p for p, key in _PEAK_KEYS.items() if best.get(p, 0.0) > peaks[key]]
    for p in raised:
        peaks[_PEAK_KEYS[p]] = best[p]
    peaks["raised"] = raised
    return peaks


def roofline_report(report: dict[str, Any], config: Any, peaks: dict[str, Any] | None) -> dict[str, Any]:
    """Per input size of a benchmark ``report``: the network's GFLOP, each case's achieved GFLOP/s and
    share of the matching peak, and the floor latency / largest speed-up over eager at each peak."""
    gflop: dict[str, float] = {}
    for case in report["cases"]:
        if case["input"] not in gflop:
            gflop[case["input"]] = network_work(config, case["input_width"], case["input_height"])["gflop"]
    if peaks:
        peaks = _effective_peaks(report, gflop, peaks)
    sizes: dict[str, Any] = {}
    for case in report["cases"]:
        size = case["input"]
        entry = sizes.setdefault(size, {"input": size, "gflop": gflop[size], "cases": {}})
        p50_s = case["latency"]["p50_ms"] / 1e3
        achieved = entry["gflop"] / p50_s if p50_s > 0 else None
        rate = _ort_cpu_rate(case, entry["gflop"])
        share = rate[1] / peaks[_PEAK_KEYS[rate[0]]] if (rate is not None and peaks) else None
        entry["cases"][case["backend"]] = {"gflops": achieved, "share_of_peak": share}
    for size, entry in sizes.items():
        eager = next((c for c in report["cases"] if c["input"] == size and c["backend"] == "torch"), None)
        if peaks:
            entry["floor_ms"] = {"fp32": 1e3 * entry["gflop"] / peaks["fp32_gflops"],
                                 "int8": 1e3 * entry["gflop"] / peaks["int8_gops"]}
            if eager is not None:
                entry["ceiling_speedup"] = {k: eager["latency"]["p50_ms"] / v for k, v in entry["floor_ms"].items()}
    return {"peaks": peaks, "sizes": list(sizes.values())}
