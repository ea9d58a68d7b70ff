"""Exporting a checkpoint: writers for every format (TorchScript, ONNX, OpenVINO IR, int8, fp16), graph passes,
parity against eager, and the stage -> verify -> place pipeline behind ``unet-deploy export``."""

from unet_deploy.export.writers import *  # noqa: F403
from unet_deploy.export.writers import __all__  # noqa: F401
