"""The eager PyTorch backend: a checkpoint (``.pth``, also Pytorch-UNet's) at fp32, bf16 (CPUs with native
bfloat16) or fp16 (CUDA), channels_last, ``torch.compile``; and :func:`module_backend` for an in-memory module
(export's parity reference)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unet_deploy.config import DeployConfig
from unet_deploy.errors import UserError, first_line
from unet_deploy.runtime.backend_options import TorchOptions
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.cpu_share import limit_torch_threads
from unet_deploy.runtime.devices import configure_cudnn

if TYPE_CHECKING:
    import torch

__all__ = ["TorchRunner", "load_torch", "module_backend", "cpu_supports_bf16", "read_checkpoint_config"]

log = logging.getLogger(__name__)


class TorchRunner:
    def __init__(self, module: Any, device: str, dtype: torch.dtype | None = None,
                 channels_last: bool = False, cuda_graphs: bool = False):
        import torch

        self.module = module
        self.device = device
        self.dtype = dtype if dtype is not None else torch.float32
        self.channels_last = channels_last
        self.cuda_graphs = cuda_graphs  # torch.compile(mode="reduce-overhead"): outputs are reused buffers

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            x = torch.as_tensor(batch).to(self.device, dtype=self.dtype, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
                return self.module(x).float().clone()
            return self.module(x).float()


def module_backend(module: torch.nn.Module, config: DeployConfig | None = None) -> Backend:
    """An in-memory eager module as a :class:`Backend`: eval mode, no autograd, run on the device and in the
    dtype of its parameters (export's parity reference, before any file exists)."""
    import torch

    module = module.eval()
    param = next(module.parameters(), None)
    device = str(param.device) if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    name = type(module).__name__
    return Backend(name="torch", path=Path(f"<in-memory {name}>"), device=device, config=config or DeployConfig(),
                   provider=f"eager {name} ({device})", precision=precision,
                   options=TorchOptions(precision=precision), call=TorchRunner(module, device, dtype))



def cpu_supports_bf16() -> bool:
    """True when oneDNN can run bfloat16 convolutions natively (AVX-512 BF16 or AMX), not emulated."""
    import torch

    from unet_deploy.runtime.cpu_features import bf16_hidden

    if bf16_hidden() or not torch.backends.mkldnn.is_available():  # UNET_DEPLOY_CPU_HIDE=bf16
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))



def _compile(model: torch.nn.Module, mode: str, path: Path) -> Any:
    import torch

    try:
        return torch.compile(model, mode=mode, dynamic=False)
    except Exception as e:  # noqa: BLE001 - compile errors come in many types; one line for the user
        raise UserError(f"{path}: torch.compile failed ({first_line(e)[:200]}); run without --compile") from None


def load_torch(path: Path, device: str, options: TorchOptions) -> Backend:
    import torch

    from unet_deploy.checkpoint import load_checkpoint

    precision = options.precision
    if precision == "fp16" and device == "cpu":
        raise UserError("--precision fp16 needs a GPU for the torch backend; use bf16 or fp32 on CPU")
    ckpt = load_checkpoint(path)
    if device == "cpu":
        limit_torch_threads()  # within the CPUs this process may use (a container's quota too)
    model = ckpt.build_model(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if device.startswith("cuda"):
        configure_cudnn()
    elif precision == "bf16" and not cpu_supports_bf16():
        log.warning("%s: this CPU has no native bfloat16 (AVX-512 BF16/AMX); bf16 will be slow", path)
    if dtype != torch.float32:
        model = model.to(dtype)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # untyped kwarg
    module: Any = model
    provider = f"torch {device}"
    if options.compile:
        module = _compile(model, options.compile, path)
        provider += f" compiled ({options.compile})"
    cuda_graphs = bool(options.compile == "reduce-overhead" and device.startswith("cuda"))
    return Backend(name="torch", path=path, device=device, config=ckpt.config, provider=provider,
                   precision=precision, options=options,
                   call=TorchRunner(module, device, dtype, options.channels_last, cuda_graphs))



def read_checkpoint_config(path: Path) -> DeployConfig:
    """The config of a checkpoint (this project's, or read off a Pytorch-UNet state dict)."""
    from unet_deploy.checkpoint import load_checkpoint

    return load_checkpoint(path).config
