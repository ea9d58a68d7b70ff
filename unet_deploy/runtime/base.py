"""What every loaded model is, whatever runs it: the :class:`Runner` protocol, the :class:`Backend` that
implements it for a model file, and :func:`as_runner` for an in-memory module or a plain callable.

``backend.run(batch)`` on a float32 NCHW batch (numpy or torch) returns float32 logits (N, C, H, W) as the runtime
made them (numpy for ONNX Runtime on the CPU, so that path never imports torch); calling the backend returns them
as a torch tensor. Preprocessing and post-processing live elsewhere (:mod:`unet_deploy.images`), so backends can
only differ in the network itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from unet_deploy.config import DeployConfig
from unet_deploy.runtime.backend_options import BackendOptions, TorchOptions

if TYPE_CHECKING:
    import torch

__all__ = ["Runner", "Backend", "Description", "as_runner"]


@runtime_checkable
class Runner(Protocol):
    """What every loaded model offers, whatever runs it (eager torch, TorchScript, ONNX Runtime, or a
    wrapper such as flip TTA): the model's config, the device and precision it runs at, and a call."""

    config: DeployConfig
    device: str
    precision: str

    def run(self, batch: Any) -> Any:
        """Float32 NCHW batch (numpy or torch) -> float32 logits (N, C, H, W) as the runtime made them."""
        ...

    def describe(self) -> dict[str, Any]:
        """What runs, for messages and reports: backend, precision, provider, device, path."""
        ...


class Description(dict):
    """``Backend.describe()``: a plain dict (JSON-ready) that prints as one line for messages."""

    def __str__(self) -> str:
        return f"{self['backend']} ({self['precision']}) on {self['provider']} from {self['path']}"


@dataclass(kw_only=True)
class Backend:
    """A loaded model (a :class:`Runner`). ``backend(batch)`` -> logits (N, C, H, W), float32 torch tensor."""

    name: str
    path: Path
    device: str
    config: DeployConfig
    provider: str = ""  # what really runs: "torch cpu", "CPUExecutionProvider", ...
    precision: str = "fp32"
    call: Callable[[Any], Any] = field(repr=False)  #: the runtime's own call (see :meth:`run`)
    options: BackendOptions = field(default_factory=TorchOptions)  #: what it was loaded with

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        out = self.native(batch)
        if isinstance(out, np.ndarray):
            import torch

            out = torch.from_numpy(out)
        return out

    def run(self, batch: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Float32 logits (N, C, H, W) as the runtime made them: a torch tensor (on the model's device)
        for torch, TorchScript and IO-bound ONNX Runtime, a numpy array for ONNX Runtime on the CPU."""
        return self.call(batch)

    def native(self, batch: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """The same as :meth:`run` (its older name; predict calls it once per batch)."""
        return self.run(batch)

    def describe(self) -> Description:
        """backend, precision, provider, device and path; ``str()`` of it is one line for messages."""
        return Description(backend=self.name, precision=self.precision, provider=self.provider,
                           device=self.device, path=str(self.path))

    def wrapped(self, run: Callable[[Any], Any], label: str) -> Backend:
        """A copy of this backend whose runs go through ``run`` (which may call this backend's own
        :meth:`run`, as flip TTA does); ``label`` is added to the provider, e.g. "flip TTA"."""
        return replace(self, provider=f"{self.provider} + {label}", call=run)



def as_runner(model: Any, config: DeployConfig | None = None) -> Runner:
    """``model`` as a :class:`Runner`: a Runner as it is, an eager ``nn.Module`` through
    :func:`module_backend`, any other callable (batch -> logits) wrapped with ``config``."""
    if isinstance(model, Runner):
        return model
    if hasattr(model, "parameters") and hasattr(model, "eval"):  # an nn.Module, without importing torch
        from unet_deploy.runtime.torch_backend import module_backend

        return module_backend(model, config)
    if not callable(model):
        raise TypeError(f"as_runner: {type(model).__name__} is neither a Runner, a module nor a callable")
    name = getattr(model, "__name__", type(model).__name__)
    return Backend(name="callable", path=Path(f"<{name}>"), device="cpu", config=config or DeployConfig(),
                   provider=name, call=model)

