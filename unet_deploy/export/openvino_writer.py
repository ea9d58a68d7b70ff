"""OpenVINO IR writers: ``NAME.xml`` + ``NAME.bin`` from this package's verified ONNX export, and an int8 IR
quantised by NNCF post-training quantisation.

* :func:`convert_onnx_to_ir` reads the ONNX file with OpenVINO's ONNX front end (the same graph ONNX Runtime
  runs: the decoder without concatenations) and saves the IR with fp32 weights (``compress_to_fp16=False``:
  the parity check compares fp32 with fp32), the ONNX export's metadata in ``rt_info`` under
  ``unet_deploy``.
* :func:`quantize_ir_int8` calibrates NNCF's post-training quantisation on images preprocessed exactly as
  ``predict`` does (``export.calibration_batches``) and saves the int8 IR with precision "int8".
* :func:`place_ir` moves a verified IR into place: the ``.bin`` first, then the ``.xml`` that reads it, so
  the ``.xml`` under the target name never names weights that are not there yet. The writers above save
  under a temporary name beside the target and place it the same way: an interrupted write leaves no IR.

openvino and nncf are imported here only (``pip install "unet-deploy[openvino]"``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.config import DeployConfig
from unet_deploy.errors import UserError, first_line
from unet_deploy.export.writers import (
    StageInputs,
    onnx_metadata,
    quiet_exporter,
    recorded_config,
)
from unet_deploy.runtime.openvino_backend import (
    INSTALL_HINT,
    RT_INFO_SECTION,
    import_openvino,
    openvino_core,
    openvino_installed,
)

__all__ = ["convert_onnx_to_ir", "quantize_ir_int8", "quantize_ir_plain", "place_ir", "set_ir_metadata", "bin_path",
           "openvino_installed", "stage_openvino", "derive_ir_int8"]


def bin_path(xml: str | Path) -> Path:
    """The weights file OpenVINO reads beside an IR ``.xml``."""
    return Path(xml).with_suffix(".bin")


def _save_ir(model: Any, config: DeployConfig, precision: str, xml: Path) -> Path:
    for key, value in onnx_metadata(recorded_config(config), precision).items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])
    return _save_and_place(model, xml)


def _save_and_place(model: Any, xml: Path) -> Path:
    """Save ``model`` (fp32 weights) under a temporary name beside ``xml``, then place it there."""
    staged = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")  # beside the target: the renames are atomic
    try:
        import_openvino().save_model(model, str(staged), compress_to_fp16=False)
        place_ir(staged, xml)
    except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
        raise UserError(f"{xml}: OpenVINO could not write the IR ({first_line(e)[:200]})") from None
    finally:
        for leftover in (staged, bin_path(staged)):
            leftover.unlink(missing_ok=True)
    return xml


def convert_onnx_to_ir(source: str | Path, config: DeployConfig, xml: str | Path) -> Path:
    """``source`` (this package's fp32 ONNX export) as an fp32 IR at ``xml`` (+ ``.bin``), metadata embedded."""
    try:
        model = openvino_core().read_model(str(source))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{source}: OpenVINO cannot read this ONNX file ({first_line(e)[:200]})") from None
    return _save_ir(model, config, "fp32", Path(xml))


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF logs at INFO and draws progress bars; keep errors only."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with quiet_exporter(), contextlib.redirect_stderr(open(os.devnull, "w")) as sink:  # noqa: SIM115
            try:
                yield
            finally:
                sink.close()
    finally:
        logger.setLevel(level)


def quantize_ir_int8(source: str | Path, config: DeployConfig, xml: str | Path,
                     calibration: Iterable[np.ndarray]) -> Path:
    """NNCF post-training int8 quantisation of the fp32 IR ``source`` into ``xml`` (+ ``.bin``).

    Activations are calibrated on the ``calibration`` batches (each (1, C, H, W) float32, preprocessed as
    ``predict`` does); weights are int8 per output channel (NNCF's "performance" preset: symmetric
    activations, fast on CPUs with VNNI/AMX). The first convolution stays in float: symmetric int8 gives
    the image, in [0, 1], only 128 levels (half of its 256), and that cost a trained model 3.7 % of a
    held-out image's mask pixels against fp32 (its dice moved +0.0039; +0.0006 with the first convolution
    in float, for 0.2 % of the network's work). Precision "int8" in the metadata."""
    nncf = _import_nncf()
    return _quantize(source, config, Path(xml), calibration, preset=nncf.QuantizationPreset.PERFORMANCE,
                     first_conv_float=True)


def quantize_ir_plain(source: str | Path, config: DeployConfig, xml: str | Path,
                      calibration: Iterable[np.ndarray]) -> Path:
    """The plain recipe a user without this package would follow: ``nncf.quantize`` with its defaults on
    ``source`` (any model file OpenVINO reads, e.g. a plain ``torch.onnx.export``), saved as an int8 IR (the
    benchmark's ``openvino-int8-plain`` comparison)."""
    _import_nncf()
    return _quantize(source, config, Path(xml), calibration)


def _import_nncf() -> Any:
    try:
        import nncf
    except ImportError:
        raise UserError(f"--int8 for OpenVINO needs NNCF: {INSTALL_HINT.replace('openvino)', 'nncf)')}") from None
    return nncf


def _quantize(source: str | Path, config: DeployConfig, xml: Path, calibration: Iterable[np.ndarray],
              first_conv_float: bool = False, **options: Any) -> Path:
    """``nncf.quantize(model, batches, **options)`` of ``source`` (``first_conv_float``: the first convolution
    left unquantised), saved as an int8 IR at ``xml``."""
    nncf = _import_nncf()
    batches = list(calibration)
    if not batches:
        raise UserError("int8 calibration: no calibration images; pass --calibration DIR")
    model = openvino_core().read_model(str(source))
    if first_conv_float:
        first = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")
        options["ignored_scope"] = nncf.IgnoredScope(names=[first.get_friendly_name()])
    try:
        with _quiet_nncf():
            quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches), **options)
    except Exception as e:  # noqa: BLE001 - NNCF raises many types
        raise UserError(f"{source}: OpenVINO int8 quantisation failed ({first_line(e)[:200]})") from None
    finally:
        del model
        gc.collect()  # NNCF's statistics models and requests go now, not at some later collection
    return _save_ir(quantized, config, "int8", xml)


def set_ir_metadata(xml: str | Path, key: str, value: str) -> Path:
    """Set one ``unet_deploy`` rt_info entry of the IR at ``xml`` (read and saved again by OpenVINO, written
    under a temporary name and placed like any IR: weights unchanged, nothing half-written)."""
    xml = Path(xml)
    model = openvino_core().read_model(str(xml))
    model.set_rt_info(value, [RT_INFO_SECTION, key])
    return _save_and_place(model, xml)


def place_ir(staged: Path, target: Path) -> None:
    """Move a staged IR into place: ``.bin`` first, then the ``.xml`` (each one atomic rename)."""
    os.replace(bin_path(staged), bin_path(target))
    os.replace(staged, target)


def stage_openvino(inputs: StageInputs) -> None:
    """The IR writer of the registry: converted from this run's ONNX export (or one staged for it)."""
    convert_onnx_to_ir(inputs.onnx_source(), inputs.config, inputs.staged)


def derive_ir_int8(source: Path, config: DeployConfig, staged: Path, calibration: Iterable[np.ndarray]) -> None:
    """``NAME.int8.xml``: NNCF int8 of the verified IR, calibrated on the preprocessed batches ``calibration``."""
    quantize_ir_int8(source, config, staged, calibration)
