"""TorchScript and ONNX writers with the model's config embedded.

* TorchScript: traced (the size-dependent padding is scripted so it stays dynamic), frozen, config in
  ``_extra_files[CONFIG_KEY]``. Loads with plain ``torch.jit.load``.
* ONNX: torch's dynamo exporter with dynamic batch/height/width, one self-contained file
  (``external_data=False``), config in ``metadata_props`` (full JSON under CONFIG_KEY plus flat keys).
  Loads with plain ``onnxruntime.InferenceSession``.

Both are written atomically: a failed export leaves nothing under the target name.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.export import Dim

from unet_deploy.config import CONFIG_KEY, DeployConfig, versions
from unet_deploy.errors import UserError, first_line
from unet_deploy.export.onnx_passes import conv_transpose_to_depth_to_space, fold_qdq_data_movement
from unet_deploy.fileio import atomic_path
from unet_deploy.images.image_io import load_image, preprocess
from unet_deploy.model import export_form
from unet_deploy.runtime.torchscript_backend import silence_torchscript_deprecation

__all__ = ["export_torchscript", "export_onnx", "onnx_metadata", "quantize_onnx_int8", "convert_onnx_fp16",
           "calibration_batches", "recorded_config", "quiet_exporter", "DEFAULT_OPSET", "EXAMPLE_SHAPE",
           "DEFAULT_CALIBRATION_COUNT", "StageInputs", "stage_onnx", "stage_torchscript", "derive_onnx_int8",
           "derive_onnx_fp16"]

DEFAULT_OPSET = 18
#: Images used to calibrate int8 activation ranges when --calibration-count is not given.
DEFAULT_CALIBRATION_COUNT = 16
#: Example input for tracing/exporting: batch > 1 and sizes > 1 so no dimension is specialised.
EXAMPLE_SHAPE = (2, 3, 64, 96)


def _example(model: nn.Module, config: DeployConfig, shape: tuple[int, ...] | None) -> torch.Tensor:
    n, _, h, w = shape or EXAMPLE_SHAPE
    param = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, config.model.n_channels, h, w, generator=g).to(param.device, param.dtype)


def export_torchscript(model: nn.Module, config: DeployConfig, path: str | Path,
                       example_shape: tuple[int, ...] | None = None, freeze: bool = True) -> Path:
    """Trace ``model`` (eval mode), optionally freeze it, and save it with the config embedded."""
    path = Path(path)
    model = model.eval()
    x = _example(model, config, example_shape)
    cfg = recorded_config(config)
    with silence_torchscript_deprecation(), torch.inference_mode(False), torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        if freeze:
            traced = torch.jit.freeze(traced)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp), _extra_files={CONFIG_KEY: cfg.to_json()})
    return path


def recorded_config(config: DeployConfig) -> DeployConfig:
    """The config to embed: this run's versions, and the source checkpoint's absolute path beside the path
    as given (``verify`` finds the checkpoint from any folder)."""
    source = dict(config.source)
    if source.get("path") and not source.get("abs_path"):
        source["abs_path"] = os.path.abspath(source["path"])
    return replace(config, versions=versions(), source=source)


def onnx_metadata(config: DeployConfig, precision: str = "fp32") -> dict[str, str]:
    """Flat, human-readable metadata keys plus the full config JSON under CONFIG_KEY."""
    c = config
    return {
        CONFIG_KEY: c.to_json(),
        "unet_deploy.architecture": c.model.architecture,
        "unet_deploy.classes": str(c.model.n_classes),
        "unet_deploy.mask_values": json.dumps(c.inference.mask_values),
        "unet_deploy.scale": repr(c.inference.scale),
        "unet_deploy.threshold": repr(c.inference.threshold),
        "unet_deploy.preprocessing": json.dumps(c.preprocessing, sort_keys=True),
        "unet_deploy.source_sha256": str(c.source.get("sha256", "")),
        "unet_deploy.versions": json.dumps(c.versions, sort_keys=True),
        "unet_deploy.precision": precision,
    }


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs and prints a lot (missing torchvision ops, progress); keep real errors."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


def export_onnx(model: nn.Module, config: DeployConfig, path: str | Path, opset: int = DEFAULT_OPSET,
                example_shape: tuple[int, ...] | None = None, dynamic: bool = True) -> Path:
    """Export with dynamic (batch, height, width), embed metadata, run ``onnx.checker``, save atomically."""
    if opset < 17:
        raise UserError(f"--opset {opset}: use 17 or newer (bilinear Resize with align_corners needs a "
                        "recent opset; the dynamo exporter targets 18)")
    path = Path(path)
    model = export_form(model)  # decoder without concatenations: less memory in ONNX Runtime
    x = _example(model, config, example_shape)
    dynamic_shapes = ({0: Dim("batch"), 2: Dim("height"), 3: Dim("width")},) if dynamic else None
    cfg = replace(config, versions=versions())
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=dynamic_shapes,
                                        external_data=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; report one line
        raise UserError(f"{path}: ONNX export failed ({first_line(e)[:300]})") from None
    if program is None:  # the dynamo exporter always returns a program; None would be an exporter bug
        raise UserError(f"{path}: ONNX export produced no model; report this with the torch version")
    precision = "fp16" if next(model.parameters()).dtype == torch.float16 else "fp32"
    return _save_onnx(program.model_proto, cfg, precision, path, full_check=True)


# ---------------------------------------------------------------------------------------------------
# Derived ONNX files: int8 (static QDQ) and fp16, made from a verified fp32 export


def _save_onnx(proto: onnx.ModelProto, config: DeployConfig, precision: str, path: str | Path,
               full_check: bool = False) -> Path:
    """Embed the config as metadata, run ``onnx.checker`` and write ``path`` atomically."""
    proto.producer_name = "unet-deploy"
    del proto.metadata_props[:]
    for key, value in onnx_metadata(recorded_config(config), precision).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=full_check)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(path)


def calibration_batches(images: list[Path], config: DeployConfig, scale: float | None = None
                        ) -> Iterator[np.ndarray]:
    """Each image decoded and preprocessed exactly as ``predict`` does (``data.preprocess`` at the
    model's scale), as a (1, C, H, W) float32 batch."""
    scale = config.inference.scale if scale is None else scale
    for path in images:
        yield preprocess(load_image(path, config.model.n_channels), scale)[None]


def _calibration_reader(calibration: Iterable[np.ndarray]) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over the batches; ``.count`` says how many it gave."""
    from onnxruntime.quantization import CalibrationDataReader

    batches = iter(calibration)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            if batch is None:
                return None
            self.count += 1
            return {"input": np.ascontiguousarray(batch, dtype=np.float32)}

    return _Reader()


def _int8_preprocess(source: str | Path, tmp: Path) -> Path:
    """ConvTranspose rewritten as Conv + DepthToSpace, then ``quant_pre_process``; the file it wrote."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = tmp / "pre.onnx"
    rewritten = tmp / "rewritten.onnx"
    try:
        source_proto = onnx.load(str(source))
        conv_transpose_to_depth_to_space(source_proto)  # int8 QLinearConv instead of a float ConvTranspose
        onnx.save_model(source_proto, str(rewritten))
        del source_proto
        with quiet_exporter():
            quant_pre_process(str(rewritten), str(pre), skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - the pre-processor raises many types
        raise UserError(f"{source}: int8 pre-processing failed ({first_line(e)[:200]})") from None
    return pre


def quantize_onnx_int8(source: str | Path, config: DeployConfig, path: str | Path,
                       calibration: Iterable[np.ndarray], per_channel: bool = True) -> Path:
    """Static int8 quantisation of the fp32 ONNX file ``source`` into ``path`` (QDQ format).

    ``quant_pre_process`` (shape inference, constant folding, BatchNorm folded into Conv) runs first;
    then ``quantize_static`` calibrates activation ranges (min/max) on the ``calibration`` batches and
    writes QuantizeLinear/DequantizeLinear pairs: weights int8 per output channel, activations uint8
    (ONNX Runtime runs u8 x s8 convolutions with AVX-512 VNNI / AVX2 on x86). The config is embedded
    with precision "int8". Written atomically.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    path = Path(path)
    reader = _calibration_reader(calibration)
    with tempfile.TemporaryDirectory(prefix="unet-int8-") as tmp:
        pre = _int8_preprocess(source, Path(tmp))
        out = Path(tmp) / "int8.onnx"
        try:
            with quiet_exporter():
                quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax)
        except Exception as e:  # noqa: BLE001
            if reader.count == 0:
                raise UserError("int8 calibration: no calibration images; pass --calibration DIR") from None
            raise UserError(f"{source}: int8 quantisation failed ({first_line(e)[:200]})") from None
        if reader.count == 0:
            raise UserError("int8 calibration: no calibration images; pass --calibration DIR")
        quantized = onnx.load(str(out))
        fold_qdq_data_movement(quantized)  # DepthToSpace and Pad on uint8, not float between DQ/Q pairs
        return _save_onnx(quantized, config, "int8", path)


def convert_onnx_fp16(source: str | Path, config: DeployConfig, path: str | Path) -> Path:
    """Half-precision weights and activations, float32 input and output (``keep_io_types``), so callers
    feed the same float32 batches; made with onnxconverter-common. Precision "fp16" in the metadata.

    Meant for CUDA (tensor cores). ONNX Runtime's CPU provider runs it too, but slowly: it lacks fp16
    kernels for most ops and inserts casts.
    """
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise UserError("--fp16 needs onnxconverter-common: pip install onnxconverter-common") from None
    path = Path(path)
    proto = onnx.load(str(source))
    with quiet_exporter():
        half = float16.convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    return _save_onnx(half, config, "fp16", path)


@dataclass(frozen=True)
class StageInputs:
    """What a format's writer gets (the registry's ``writer``): the eager model and its config, the staging
    path to write, the ONNX opset, and ``onnx_source()``: this run's verified ONNX file, or one staged for it
    (formats converted from ONNX)."""

    eager: nn.Module
    config: DeployConfig
    staged: Path
    opset: int
    onnx_source: Callable[[], Path]


def stage_onnx(inputs: StageInputs) -> None:
    """The ONNX writer of the registry."""
    export_onnx(inputs.eager, inputs.config, inputs.staged, opset=inputs.opset)


def stage_torchscript(inputs: StageInputs) -> None:
    """The TorchScript writer of the registry."""
    export_torchscript(inputs.eager, inputs.config, inputs.staged)


def derive_onnx_int8(source: Path, config: DeployConfig, staged: Path, calibration: Iterable[np.ndarray]) -> None:
    """``NAME.int8.onnx``: static QDQ int8, calibrated on the preprocessed batches ``calibration``."""
    quantize_onnx_int8(source, config, staged, calibration)


def derive_onnx_fp16(source: Path, config: DeployConfig, staged: Path, calibration: Iterable[np.ndarray]) -> None:
    """``NAME.fp16.onnx``: half precision with fp32 input and output (``calibration`` unused)."""
    convert_onnx_fp16(source, config, staged)
