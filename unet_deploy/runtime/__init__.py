"""Running a model: one registry entry per backend (torch, TorchScript, ONNX Runtime, OpenVINO), the Runner
protocol every loaded model follows, per-backend options, the CPU's capabilities and the precision a model runs
at, flip TTA and tiling (which wrap any Runner), and memory estimates."""

from unet_deploy.runtime.loader import *  # noqa: F403 - the public names of the old ``backends`` module
from unet_deploy.runtime.loader import __all__  # noqa: F401
