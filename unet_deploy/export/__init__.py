"""Exporting a checkpoint: writers for every format (TorchScript, ONNX, OpenVINO IR, int8, fp16), graph passes,
parity against eager, and the stage -> verify -> place pipeline behind ``unet-deploy export``."""

from typing import TYPE_CHECKING

from unet_deploy import lazy_exports

_WRITER_NAMES = ["export_torchscript", "export_onnx", "onnx_metadata", "quantize_onnx_int8", "convert_onnx_fp16",
                 "calibration_batches", "recorded_config", "quiet_exporter", "DEFAULT_OPSET", "EXAMPLE_SHAPE",
                 "DEFAULT_CALIBRATION_COUNT", "StageInputs", "stage_onnx", "stage_torchscript", "derive_onnx_int8",
                 "derive_onnx_fp16"]

if TYPE_CHECKING:  # the real names, for type checkers and IDEs
    from unet_deploy.export.writers import *  # noqa: F403

__all__ = list(_WRITER_NAMES)

#: every name loads :mod:`.writers` (and torch) on first use, so ``unet_deploy.export.parity`` alone stays light.
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_WRITER_NAMES, "writers"))
