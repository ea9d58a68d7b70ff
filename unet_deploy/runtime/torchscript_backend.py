"""The TorchScript backend: a traced, frozen ``.ts`` file as ``unet-deploy export`` writes it, config in its
``unet_deploy.json`` extra file. TorchScript is deprecated in torch >= 2.9 but works and users ask for it."""

from __future__ import annotations

import contextlib
import warnings
import zipfile
from pathlib import Path

from unet_deploy.config import CONFIG_KEY, DeployConfig
from unet_deploy.errors import UserError, first_line
from unet_deploy.runtime.backend_options import TorchScriptOptions
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.torch_backend import TorchRunner

__all__ = ["load_torchscript", "silence_torchscript_deprecation", "read_torchscript_config"]


@contextlib.contextmanager
def silence_torchscript_deprecation():
    """torch >= 2.9 warns that ``torch.jit`` is deprecated; it still works, and users ask for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        yield



def load_torchscript(path: Path, device: str, options: TorchScriptOptions | None = None) -> Backend:
    """A :class:`Backend` running the TorchScript file ``path`` on ``device``."""
    import torch

    extra = {CONFIG_KEY: ""}
    try:
        with silence_torchscript_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path}: not a readable TorchScript model ({first_line(e)}); re-export it") from None
    config = DeployConfig.from_json(extra[CONFIG_KEY]) if extra[CONFIG_KEY] else DeployConfig()
    module.eval()
    dtype = torch.float32
    for p in module.parameters():
        dtype = p.dtype
        break
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    return Backend(name="torchscript", path=path, device=device, config=config,
                   provider=f"torchscript {device}", precision=precision, options=TorchScriptOptions(),
                   call=TorchRunner(module, device, dtype))



def read_torchscript_config(path: Path) -> DeployConfig | None:
    """The config in a TorchScript file's extra files, or None."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("extra/" + CONFIG_KEY)), None)
            return DeployConfig.from_json(z.read(name)) if name else None
    except zipfile.BadZipFile:
        raise UserError(f"{path}: not a readable TorchScript file; re-export it") from None
