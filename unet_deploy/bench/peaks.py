"""The best rate any installed runtime reaches on one compute-bound layer, per precision.

One 3x3 convolution with many channels (:data:`PEAK_LAYER`: 256 -> 256 channels on 160x120, 11.3 GMAC) is
timed on every runtime and precision installed here, each with the benchmark's threads:

* ONNX Runtime fp32 (NCHWc kernels) and static int8 QDQ (u8 x s8, the ``export --int8`` recipe), with the
  session options of the ``ort`` backend;
* torch eager (oneDNN) fp32, and bf16 with channels_last (the ``torch-bf16-cl`` variant);
* OpenVINO f32 and bf16 (``INFERENCE_PRECISION_HINT``; bf16 only where the CPU really runs it) and int8 (the
  same QDQ ONNX file, read by OpenVINO).

A runtime that is not installed, or fails, is skipped and named in ``skipped``. The best time of a few runs
per runtime counts; the best rate per precision, with the runtime that reached it, is the layer peak.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.errors import first_line

__all__ = ["PEAK_LAYER", "PROBES", "measure_layer_peaks", "best_per_precision"]

#: The probe layer: 3x3 convolution, 256 -> 256 channels on a 160x120 map (11.3 GMAC): big enough to be
#: compute-bound on a CPU, small enough to time in well under a second per run.
PEAK_LAYER = {"channels": 256, "height": 120, "width": 160}
#: Seconds of timed runs per runtime at most (after one warm-up call); at least two runs are timed.
BUDGET_S = 1.5


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantiser logs advice on the root logger ("consider pre-processing"); a one-layer probe needs none."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logging.disable(previous)


def _weights(c: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((c, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)


def _write_models(folder: Path, c: int, h: int, w: int, feed: np.ndarray) -> tuple[Path, Path]:
    """The probe layer as an fp32 ONNX file and its static int8 QDQ twin (the ``export --int8`` recipe)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from unet_deploy.export.onnx_passes import fold_qdq_data_movement

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, h, w])],
                              initializer=[numpy_helper.from_array(_weights(c), "w"),
                                           numpy_helper.from_array(np.zeros(c, np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    fp32, int8 = folder / "fp32.onnx", folder / "int8.onnx"
    onnx.save_model(model, str(fp32))

    class _One(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [{"x": feed}]

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.batches.pop() if self.batches else None

    quantize_static(str(fp32), str(int8), _One(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    quantized = onnx.load(str(int8))
    fold_qdq_data_movement(quantized)
    onnx.save_model(quantized, str(int8))
    return fp32, int8


def _best_seconds(call: Callable[[], Any], runs: int) -> tuple[float, int]:
    """(best seconds, runs timed): one warm-up call, then up to ``runs`` timed calls within :data:`BUDGET_S`."""
    call()
    best, done, spent = float("inf"), 0, 0.0
    while done < runs and (done < 2 or spent < BUDGET_S):
        t0 = time.perf_counter()
        call()
        took = time.perf_counter() - t0
        best, done, spent = min(best, took), done + 1, spent + took
    return best, done


def _ort(path: Path, feed: np.ndarray, threads: int | None) -> Callable[[], Any]:
    import onnxruntime as ort

    from unet_deploy.runtime.ort_session import ort_session_options

    session = ort.InferenceSession(str(path), sess_options=ort_session_options(threads),
                                   providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"x": feed})


def _torch(feed: np.ndarray, bf16: bool) -> Callable[[], Any]:
    import torch

    x, w = torch.from_numpy(feed), torch.from_numpy(_weights(feed.shape[1]))
    if bf16:  # the torch-bf16-cl variant: bfloat16 weights and activations, channels_last
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def call() -> Any:
        with torch.no_grad():
            return torch.nn.functional.conv2d(x, w, padding=1)

    return call


def _openvino(path: Path, feed: np.ndarray, threads: int | None, hint: str | None) -> Callable[[], Any]:
    import openvino as ov

    from unet_deploy.runtime.openvino_backend import openvino_cpu_has

    if hint == "bf16" and not openvino_cpu_has("bf16"):  # never ask the plugin for what the CPU lacks
        raise RuntimeError("this CPU runs f32 when asked for bf16")
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    runs_at = compiled.get_property("INFERENCE_PRECISION_HINT")
    if hint and runs_at != getattr(ov.Type, hint):  # e.g. bf16 asked of a CPU without bf16: it runs f32
        raise RuntimeError(f"this CPU runs {runs_at.to_string()} when asked for {hint}")
    request = compiled.create_infer_request()
    return lambda: request.infer({0: feed})


#: (runtime, precision, what to time): every probe, given (fp32 file, int8 file, input, threads).
PROBES: tuple[tuple[str, str, Callable[[Path, Path, np.ndarray, int | None], Callable[[], Any]]], ...] = (
    ("onnxruntime", "fp32", lambda fp32, int8, x, t: _ort(fp32, x, t)),
    ("onnxruntime", "int8", lambda fp32, int8, x, t: _ort(int8, x, t)),
    ("torch", "fp32", lambda fp32, int8, x, t: _torch(x, bf16=False)),
    ("torch", "bf16", lambda fp32, int8, x, t: _torch(x, bf16=True)),
    ("openvino", "fp32", lambda fp32, int8, x, t: _openvino(fp32, x, t, "f32")),
    ("openvino", "bf16", lambda fp32, int8, x, t: _openvino(fp32, x, t, "bf16")),
    ("openvino", "int8", lambda fp32, int8, x, t: _openvino(int8, x, t, None)),
)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the probe, restored after (stage timing follows)."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_layer_peaks(threads: int | None = None, runs: int = 10, layer: dict[str, int] | None = None,
                        probes: tuple[tuple[str, str, Any], ...] = PROBES) -> dict[str, Any]:
    """Every probe's best rate on the layer (``rates``), the runtimes skipped and why, and the best per
    precision (``best``: ``{precision: {"gops", "runtime"}}``)."""
    spec = dict(PEAK_LAYER if layer is None else layer)
    c, h, w = spec["channels"], spec["height"], spec["width"]
    gflop = 2 * c * c * 9 * h * w / 1e9
    feed = np.random.default_rng(1).random((1, c, h, w), dtype=np.float32)
    rates: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="unet-roofline-") as tmp, _quiet(), _torch_threads(threads):
        fp32, int8 = _write_models(Path(tmp), c, h, w, feed)
        for runtime, precision, make in probes:
            try:
                seconds, timed = _best_seconds(make(fp32, int8, feed, threads), runs)
            except ImportError:
                skipped[f"{runtime} {precision}"] = "not installed"
                continue
            except Exception as e:  # noqa: BLE001 - one runtime's failure must not lose the others
                skipped[f"{runtime} {precision}"] = first_line(e)[:200]
                continue
            rates.append({"runtime": runtime, "precision": precision, "ms": 1e3 * seconds, "runs": timed,
                          "gops": gflop / seconds})
    return {"layer": f"conv 3x3 {c}->{c} on {w}x{h}", "gflop": gflop, "threads": threads, "runs": runs,
            "rates": rates, "skipped": skipped, "best": best_per_precision(rates)}


def best_per_precision(rates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{precision: {"gops", "runtime"}}``: the fastest runtime of each precision."""
    best: dict[str, dict[str, Any]] = {}
    for r in rates:
        if r["gops"] > best.get(r["precision"], {}).get("gops", 0.0):
            best[r["precision"]] = {"gops": r["gops"], "runtime": r["runtime"]}
    return best
