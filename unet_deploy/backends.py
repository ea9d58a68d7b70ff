"""One small interface over eager PyTorch, TorchScript and ONNX Runtime.

``load_backend(path, backend=None, device="auto")`` returns a :class:`Backend`; calling it on a float32
NCHW batch (numpy or torch) returns float32 logits (N, C, H, W) as a torch tensor. Preprocessing and
post-processing live elsewhere (``data.preprocess``, ``postprocess``), so backends can only differ in
the network itself.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import CONFIG_KEY, DeployConfig
from .errors import UserError
from .fileio import require_file

__all__ = ["Backend", "BACKENDS", "load_backend", "backend_for_path", "resolve_device",
           "read_embedded_config", "silence_torchscript_deprecation"]

BACKENDS = ("torch", "torchscript", "ort")
_SUFFIXES = {
    ".pth": "torch", ".pt": "torch", ".ckpt": "torch",
    ".ts": "torchscript", ".torchscript": "torchscript", ".jit": "torchscript",
    ".onnx": "ort",
}

log = logging.getLogger(__name__)


@contextlib.contextmanager
def silence_torchscript_deprecation():
    """torch >= 2.9 warns that ``torch.jit`` is deprecated; it still works, and users ask for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        yield


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an unavailable ``cuda`` is a user error."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: unknown device; use auto, cpu or cuda[:N]")
    return device


def backend_for_path(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise UserError(f"{path}: cannot tell the backend from suffix {suffix!r}; use .pth (torch), "
                        ".ts (torchscript) or .onnx (ort), or pass --backend")
    return _SUFFIXES[suffix]


@dataclass
class Backend:
    """A loaded model. ``backend(batch)`` -> logits (N, C, H, W), float32 torch tensor."""

    name: str
    path: Path
    device: str
    config: DeployConfig
    provider: str = ""  # what really runs: "torch cpu", "CPUExecutionProvider", ...
    precision: str = "fp32"
    _impl: Any = field(default=None, repr=False)

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self._impl(batch)

    def describe(self) -> str:
        return f"{self.name} ({self.precision}) on {self.provider} from {self.path}"


class _TorchRunner:
    def __init__(self, module: torch.nn.Module, device: str, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False):
        self.module = module
        self.device = device
        self.dtype = dtype
        self.channels_last = channels_last

    @torch.inference_mode()
    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(batch).to(self.device, dtype=self.dtype, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x).float()


class _OrtRunner:
    def __init__(self, session: Any):
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.input_type = session.get_inputs()[0].type

    def __call__(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        x = np.ascontiguousarray(batch, dtype=np.float16 if "float16" in self.input_type else np.float32)
        out = self.session.run(None, {self.input_name: x})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


def read_embedded_config(path: str | Path) -> DeployConfig | None:
    """The config embedded in an export (TorchScript extra file / ONNX metadata), or None."""
    path = Path(path)
    kind = backend_for_path(path)
    if kind == "ort":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}); re-export it") from None
        meta = {p.key: p.value for p in model.metadata_props}
        return DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    if kind == "torchscript":
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("extra/" + CONFIG_KEY)), None)
                return DeployConfig.from_json(z.read(name)) if name else None
        except zipfile.BadZipFile:
            raise UserError(f"{path}: not a readable TorchScript file; re-export it") from None
    from .checkpoint import load_checkpoint

    return load_checkpoint(path).config


def _check_file(path: Path) -> None:
    how = ("train one with `unet-deploy train` or pass -m" if path.suffix.lower() in (".pth", ".pt", ".ckpt")
           else "export one with `unet-deploy export` or pass -m")
    require_file(path, "model file", how, "re-export it")


def _load_torch(path: Path, device: str, precision: str, channels_last: bool) -> Backend:
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    model = ckpt.build_model(device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    if dtype != torch.float32:
        model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Backend("torch", path, device, ckpt.config, f"torch {device}", precision,
                   _TorchRunner(model, device, dtype, channels_last))


def _load_torchscript(path: Path, device: str) -> Backend:
    extra = {CONFIG_KEY: ""}
    try:
        with silence_torchscript_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable TorchScript model ({first}); re-export it") from None
    config = DeployConfig.from_json(extra[CONFIG_KEY]) if extra[CONFIG_KEY] else DeployConfig()
    module.eval()
    dtype = torch.float32
    for p in module.parameters():
        dtype = p.dtype
        break
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    return Backend("torchscript", path, device, config, f"torchscript {device}", precision,
                   _TorchRunner(module, device, dtype))


def ort_providers(device: str) -> list[Any]:
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index, "cudnn_conv_algo_search": "HEURISTIC"}),
                "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _load_ort(path: Path, device: str, threads: int | None) -> Backend:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("--backend ort needs ONNX Runtime: pip install onnxruntime-gpu (Linux x86-64) "
                        "or onnxruntime") from None
    config = read_embedded_config(path) or DeployConfig()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=ort_providers(device))
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types for bad models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: ONNX Runtime cannot load this model ({first[:200]}); re-export it") from None
    active = session.get_providers()[0]
    if device.startswith("cuda") and active != "CUDAExecutionProvider":
        log.warning("%s: CUDA was asked for but ONNX Runtime runs on %s (is onnxruntime-gpu with CUDA 12/13 "
                    "and cuDNN 9 installed?)", path, active)
    in_type = session.get_inputs()[0].type
    precision = "fp16" if "float16" in in_type else "fp32"
    meta = session.get_modelmeta().custom_metadata_map
    precision = meta.get("unet_deploy.precision", precision)
    return Backend("ort", path, device, config, active, precision, _OrtRunner(session))


def load_backend(path: str | Path, backend: str | None = None, device: str = "auto",
                 precision: str = "fp32", channels_last: bool = False, threads: int | None = None) -> Backend:
    """Load a checkpoint (.pth), TorchScript (.ts) or ONNX (.onnx) model for inference."""
    path = Path(path)
    _check_file(path)
    backend = backend or backend_for_path(path)
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: unknown backend; use one of {', '.join(BACKENDS)}")
    expected = backend_for_path(path) if Path(path).suffix.lower() in _SUFFIXES else backend
    if expected != backend:
        raise UserError(f"{path}: a {expected} model file cannot run on --backend {backend}; "
                        f"pass --backend {expected} or a matching file")
    device = resolve_device(device)
    if precision not in ("fp32", "fp16", "bf16"):
        raise UserError(f"--precision {precision}: use fp32, fp16 or bf16")
    if backend == "torch":
        if precision == "fp16" and device == "cpu":
            raise UserError("--precision fp16 needs a GPU for the torch backend; use bf16 or fp32 on CPU")
        return _load_torch(path, device, precision, channels_last)
    if backend == "torchscript":
        return _load_torchscript(path, device)
    return _load_ort(path, device, threads)
