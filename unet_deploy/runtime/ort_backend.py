"""The ONNX Runtime backend: an ``.onnx`` file on the CPU or CUDA provider, plain numpy in and out on the CPU (this
path never imports torch) or IO binding to torch tensors on CUDA."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unet_deploy.config import CONFIG_KEY, DeployConfig
from unet_deploy.errors import UserError, first_line
from unet_deploy.runtime.backend_options import OrtOptions
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.ort_session import ort_providers, ort_session_options, release_large_frees

if TYPE_CHECKING:
    import torch

__all__ = ["load_ort", "read_onnx_config"]

log = logging.getLogger(__name__)


class _OrtRunner:
    """``session.run`` with numpy in and out (the simple path; fine on CPU; no torch involved)."""

    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.input_type = session.get_inputs()[0].type

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        if not isinstance(batch, np.ndarray) and hasattr(batch, "detach"):  # a torch tensor
            batch = batch.detach().cpu().numpy()
        x = np.ascontiguousarray(batch, dtype=np.float16 if "float16" in self.input_type else np.float32)
        out = self.session.run(None, {self.input_name: x})[0]
        return np.asarray(out, dtype=np.float32)


def _ort_dtypes() -> dict[str, tuple[Any, Any]]:
    import torch

    return {"tensor(float)": (np.float32, torch.float32), "tensor(float16)": (np.float16, torch.float16)}


class _OrtIoBindingRunner:
    """``run_with_iobinding``: input and output stay in torch tensors on the session's device.

    On CUDA the input is bound straight from (a copy on) the GPU and the logits are written into a torch
    CUDA tensor, so no host round trip happens; on CPU the same code binds CPU tensors (used in tests).
    """

    def __init__(self, session: Any, device: str, n_classes: int):
        import torch

        self.session = session
        inp, out = session.get_inputs()[0], session.get_outputs()[0]
        dtypes = _ort_dtypes()
        if inp.type not in dtypes or out.type not in dtypes:
            raise UserError(f"IO binding supports float32/float16 inputs and outputs, not {inp.type} -> "
                            f"{out.type}; re-export the model")
        self.input_name, self.output_name = inp.name, out.name
        self.in_np, self.in_torch = dtypes[inp.type]
        self.out_np, self.out_torch = dtypes[out.type]
        channels = out.shape[1] if len(out.shape) == 4 else None
        self.n_classes = channels if isinstance(channels, int) else n_classes
        self.cuda = device.startswith("cuda")
        self.torch_device = torch.device(device)
        self.device_type = "cuda" if self.cuda else "cpu"
        self.device_id = (self.torch_device.index or 0) if self.cuda else 0

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        import torch

        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch))
        x = batch.to(self.torch_device, dtype=self.in_torch).contiguous()
        n, _, h, w = x.shape
        y = torch.empty((n, self.n_classes, h, w), dtype=self.out_torch, device=self.torch_device)
        io = self.session.io_binding()
        io.bind_input(self.input_name, self.device_type, self.device_id, self.in_np, tuple(x.shape),
                      x.data_ptr())
        io.bind_output(self.output_name, self.device_type, self.device_id, self.out_np, tuple(y.shape),
                       y.data_ptr())
        if self.cuda:  # torch wrote the input on its own stream; ORT reads it on another
            torch.cuda.synchronize(self.torch_device)
        self.session.run_with_iobinding(io)
        io.synchronize_outputs()
        return y.float()



def load_ort(path: Path, device: str, options: OrtOptions) -> Backend:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--backend ort needs ONNX Runtime: pip install onnxruntime-gpu (Linux x86-64) "
                        "or onnxruntime") from None
    profile, io_binding = options.profile, options.io_binding
    opts = ort_session_options(options.threads, profile)
    if profile == "tuned":
        release_large_frees()  # before the session exists: its load-time copies are freed into the system
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(device))
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad models
        raise UserError(f"{path}: ONNX Runtime cannot load this model ({first_line(e)[:200]}); "
                        "re-export it") from None
    active = session.get_providers()[0]
    if device.startswith("cuda") and active != "CUDAExecutionProvider":
        log.warning("%s: CUDA was asked for but ONNX Runtime runs on %s (is onnxruntime-gpu with CUDA 12/13 "
                    "and cuDNN 9 installed?)", path, active)
    in_type = session.get_inputs()[0].type
    precision = "fp16" if "float16" in in_type else "fp32"
    meta = session.get_modelmeta().custom_metadata_map  # the ONNX metadata, without importing onnx
    config = DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else DeployConfig()
    precision = meta.get("unet_deploy.precision", precision)
    on_cuda = active == "CUDAExecutionProvider"
    if io_binding is None:
        io_binding = on_cuda  # on CPU plain numpy in/out costs nothing extra
    runner: Any = (_OrtIoBindingRunner(session, device if on_cuda else "cpu", config.model.n_classes)
                   if io_binding else _OrtRunner(session))
    if profile != "tuned":
        active = f"{active}, {profile} options"
    return Backend(name="ort", path=path, device=device, config=config, provider=active, precision=precision,
                   options=replace(options, io_binding=io_binding), call=runner)



def read_onnx_config(path: Path) -> DeployConfig | None:
    """The config in an ONNX file's metadata, or None (the file's weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}); re-export it") from None
    meta = {p.key: p.value for p in model.metadata_props}
    return DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
