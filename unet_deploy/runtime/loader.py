"""One small interface over eager PyTorch, TorchScript, ONNX Runtime and OpenVINO.

``load_backend(path, backend=None, device="auto", options=None)`` returns a :class:`Backend`, which is a
:class:`Runner`. ``options`` is the backend's own option object (:mod:`unet_deploy.runtime.backend_options`:
``TorchOptions``, ``TorchScriptOptions``, ``OrtOptions``, ``OpenVinoOptions``), so an option a backend does
not take cannot be passed to it silently. ``backend.run(batch)`` on a float32 NCHW batch (numpy or torch)
returns float32 logits (N, C, H, W) as the runtime made them (numpy for ONNX Runtime on the CPU, so that path
never imports torch); calling the backend returns them as a torch tensor. :func:`as_runner` makes an in-memory
module or a plain callable a Runner too (parity's reference). Preprocessing and post-processing live elsewhere
(``data.preprocess``, ``postprocess``), so backends can only differ in the network itself.

torch (and :mod:`.checkpoint`, which needs it), onnx, onnxruntime and openvino (:mod:`.backend_openvino`)
are imported inside the functions that use them: the ONNX Runtime path must never load torch, and the
torch path need not load ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from unet_deploy.config import CONFIG_KEY, DeployConfig
from unet_deploy.errors import UserError, first_line
from unet_deploy.fileio import require_file
from unet_deploy.names import BACKENDS, MODEL_SUFFIXES, backend_for_path, is_checkpoint_file
from unet_deploy.runtime.backend_options import (
    COMPILE_MODES,
    BackendOptions,
    OpenVinoOptions,
    OrtOptions,
    TorchOptions,
    TorchScriptOptions,
    options_for,
)
from unet_deploy.runtime.ort_session import (
    ORT_PROFILES,
    ort_providers,
    ort_session_options,
    physical_cores,
    release_large_frees,
)

__all__ = ["Runner", "Backend", "Description", "load_backend", "module_backend", "as_runner", "BackendOptions",
           "TorchOptions", "TorchScriptOptions", "OrtOptions", "OpenVinoOptions", "options_for", "BACKENDS",
           "ORT_PROFILES",
           "COMPILE_MODES", "backend_for_path", "check_model_file", "resolve_device", "read_embedded_config",
           "silence_torchscript_deprecation", "physical_cores", "ort_session_options", "ort_providers",
           "cpu_supports_bf16", "configure_cudnn", "release_large_frees"]

#: cuDNN convolution workspace cap (MiB) applied with ``configure_cudnn``: autotuning may not pick an
#: algorithm that needs more scratch memory than this.
CUDNN_WORKSPACE_MIB = 1024

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def silence_torchscript_deprecation():
    """torch >= 2.9 warns that ``torch.jit`` is deprecated; it still works, and users ask for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated")
        yield


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


class _TorchRunner:
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
                   options=TorchOptions(precision=precision), call=_TorchRunner(module, device, dtype))


def as_runner(model: Any, config: DeployConfig | None = None) -> Runner:
    """``model`` as a :class:`Runner`: a Runner as it is, an eager ``nn.Module`` through
    :func:`module_backend`, any other callable (batch -> logits) wrapped with ``config``."""
    if isinstance(model, Runner):
        return model
    if hasattr(model, "parameters") and hasattr(model, "eval"):  # an nn.Module, without importing torch
        return module_backend(model, config)
    if not callable(model):
        raise TypeError(f"as_runner: {type(model).__name__} is neither a Runner, a module nor a callable")
    name = getattr(model, "__name__", type(model).__name__)
    return Backend(name="callable", path=Path(f"<{name}>"), device="cpu", config=config or DeployConfig(),
                   provider=name, call=model)


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


def read_embedded_config(path: str | Path) -> DeployConfig | None:
    """The config embedded in an export (TorchScript extra file / ONNX metadata), or None."""
    path = Path(path)
    kind = backend_for_path(path)
    if kind == "openvino":
        from unet_deploy.runtime.openvino_backend import read_ir_metadata

        meta = read_ir_metadata(path)
        return DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    if kind == "ort":
        import onnx

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}); re-export it") from None
        meta = {p.key: p.value for p in model.metadata_props}
        return DeployConfig.from_json(meta[CONFIG_KEY]) if CONFIG_KEY in meta else None
    if kind == "torchscript":
        try:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("extra/" + CONFIG_KEY)), None)
                return DeployConfig.from_json(z.read(name)) if name else None
        except zipfile.BadZipFile:
            raise UserError(f"{path}: not a readable TorchScript file; re-export it") from None
    from unet_deploy.checkpoint import load_checkpoint

    return load_checkpoint(path).config


def check_model_file(path: Path) -> None:
    """A one-line :class:`UserError` when the model file is missing or unreadable, saying how to make one."""
    how = ("train one with `unet-deploy train` or pass -m" if is_checkpoint_file(path)
           else "export one with `unet-deploy export` or pass -m")
    require_file(path, "model file", how, "re-export it")



def cpu_supports_bf16() -> bool:
    """True when oneDNN can run bfloat16 convolutions natively (AVX-512 BF16 or AMX), not emulated."""
    import torch

    from unet_deploy.runtime.cpu_features import bf16_hidden

    if bf16_hidden() or not torch.backends.mkldnn.is_available():  # UNET_DEPLOY_CPU_HIDE=bf16
        return False
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


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


def _compile(model: torch.nn.Module, mode: str, path: Path) -> Any:
    import torch

    try:
        return torch.compile(model, mode=mode, dynamic=False)
    except Exception as e:  # noqa: BLE001 - compile errors come in many types; one line for the user
        raise UserError(f"{path}: torch.compile failed ({first_line(e)[:200]}); run without --compile") from None


def _load_torch(path: Path, device: str, options: TorchOptions) -> Backend:
    import torch

    from unet_deploy.checkpoint import load_checkpoint

    precision = options.precision
    if precision == "fp16" and device == "cpu":
        raise UserError("--precision fp16 needs a GPU for the torch backend; use bf16 or fp32 on CPU")
    ckpt = load_checkpoint(path)
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
                   call=_TorchRunner(module, device, dtype, options.channels_last, cuda_graphs))


def _load_torchscript(path: Path, device: str) -> Backend:
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
                   call=_TorchRunner(module, device, dtype))


def _load_ort(path: Path, device: str, options: OrtOptions) -> Backend:
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


def load_backend(path: str | Path, backend: str | None = None, device: str = "auto",
                 options: BackendOptions | None = None, **option_values: Any) -> Backend:
    """Load a checkpoint (.pth), TorchScript (.ts), ONNX (.onnx) or OpenVINO IR (.xml) model for inference.

    ``backend`` defaults to the one the file's suffix names. ``options`` is the backend's option object
    (:class:`TorchOptions`, :class:`TorchScriptOptions`, :class:`OrtOptions` or :class:`OpenVinoOptions`);
    alternatively give the
    option values as keywords (``precision="bf16"``, ``threads=2``, ...), which :func:`options_for` turns
    into that object: a value for an option the backend does not take is a one-line :class:`UserError`,
    never silently ignored. On CUDA, torch runs with cuDNN autotuning and a bounded workspace
    (:func:`configure_cudnn`). The precision of an ONNX file (fp32, fp16, int8) is the one it was
    exported with. ``--backend openvino`` also runs an .onnx file (OpenVINO reads ONNX directly).
    """
    path = Path(path)
    check_model_file(path)
    backend = backend or backend_for_path(path)
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: unknown backend; use one of {', '.join(BACKENDS)}")
    expected = MODEL_SUFFIXES.get(path.suffix.lower(), backend)
    if expected != backend and not (backend == "openvino" and expected == "ort"):
        raise UserError(f"{path}: a {expected} model file cannot run on --backend {backend}; "
                        f"pass --backend {expected} or a matching file")
    if options is None:
        options = options_for(backend, **option_values)
    elif option_values:
        raise TypeError("load_backend: pass either an options object or option keywords, not both")
    elif options.backend != backend:
        raise UserError(f"{path}: {type(options).__name__} are for --backend {options.backend}, not {backend}")
    if isinstance(options, OpenVinoOptions):
        from unet_deploy.runtime.openvino_backend import load_openvino

        return load_openvino(path, device, options)
    device = resolve_device(device, backend)
    if isinstance(options, TorchOptions):
        return _load_torch(path, device, options)
    if isinstance(options, TorchScriptOptions):
        return _load_torchscript(path, device)
    return _load_ort(path, device, options)
