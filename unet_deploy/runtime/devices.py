"""Which device a model runs on: ``auto`` resolved to CUDA when a GPU is visible (without importing torch where
the system tells), and cuDNN's autotuning with a bounded workspace."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from unet_deploy.errors import UserError

__all__ = ["resolve_device", "configure_cudnn", "CUDNN_WORKSPACE_MIB"]

#: cuDNN convolution workspace cap (MiB) applied with ``configure_cudnn``: autotuning may not pick an
#: algorithm that needs more scratch memory than this.
CUDNN_WORKSPACE_MIB = 1024


def _nvidia_gpu_visible() -> bool:
    """Whether a CUDA GPU is visible, without importing torch where the system tells (Linux, macOS)."""
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        gpus = Path("/proc/driver/nvidia/gpus")  # the driver's list; containers may only have the devices
        return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str, backend: str = "torch") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an unavailable ``cuda`` is a user error.

    ``backend="ort"`` asks the system instead of PyTorch (no ``import torch``, ~1 s) where it can.
    """
    device = (device or "auto").lower()
    if backend == "ort":
        visible, who = _nvidia_gpu_visible(), "this machine"
    else:
        import torch

        visible, who = torch.cuda.is_available(), "PyTorch"
    if device == "auto":
        return "cuda" if visible else "cpu"
    if device.startswith("cuda") and not visible:
        raise UserError(f"--device {device}: no CUDA GPU is visible to {who}; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: unknown device; use auto, cpu or cuda[:N]")
    return device



def configure_cudnn(workspace_mib: int | None = CUDNN_WORKSPACE_MIB) -> None:
    """cuDNN autotuning (``cudnn.benchmark``: the fastest algorithm per input shape, found on the first
    call of each shape) with its scratch workspace capped at ``workspace_mib`` MiB.

    The cap is cuDNN's ``CUDNN_CONV_WSCAP_DBG`` variable, read when cuDNN first runs a convolution; an
    explicit value in the environment wins.
    """
    import torch

    if workspace_mib is not None:
        os.environ.setdefault("CUDNN_CONV_WSCAP_DBG", str(int(workspace_mib)))
    torch.backends.cudnn.benchmark = True

