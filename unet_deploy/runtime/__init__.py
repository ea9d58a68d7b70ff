"""Running a model: one registry entry per backend (torch, TorchScript, ONNX Runtime, OpenVINO), the Runner
protocol every loaded model follows, per-backend options, the CPU's capabilities and the precision a model runs
at, flip TTA and tiling (which wrap any Runner), and memory estimates.

The names most callers need are here; each lives in its own module:

* :func:`load_backend`, :func:`read_embedded_config`, :func:`check_model_file` (:mod:`.loader`);
* :class:`Runner`, :class:`Backend`, :class:`Description`, :func:`as_runner` (:mod:`.base`);
* the option classes and :func:`options_for` (:mod:`.backend_options`);
* the registry: :data:`REGISTRY`, :data:`BACKENDS`, :func:`spec`, :func:`backend_for_path` (:mod:`.registry`);
* :func:`resolve_device` (:mod:`.devices`), :func:`module_backend` and :func:`cpu_supports_bf16`
  (:mod:`.torch_backend`).
"""

from unet_deploy.runtime.backend_options import (
    COMPILE_MODES,
    BackendOptions,
    OpenVinoOptions,
    OrtOptions,
    TorchOptions,
    TorchScriptOptions,
    options_for,
)
from unet_deploy.runtime.base import Backend, Description, Runner, as_runner
from unet_deploy.runtime.devices import configure_cudnn, resolve_device
from unet_deploy.runtime.loader import check_model_file, load_backend, read_embedded_config
from unet_deploy.runtime.ort_session import ORT_PROFILES, ort_providers, ort_session_options, physical_cores
from unet_deploy.runtime.registry import BACKENDS, REGISTRY, backend_for_path, spec
from unet_deploy.runtime.torch_backend import cpu_supports_bf16, module_backend
from unet_deploy.runtime.torchscript_backend import silence_torchscript_deprecation

__all__ = ["Runner", "Backend", "Description", "load_backend", "module_backend", "as_runner", "BackendOptions",
           "TorchOptions", "TorchScriptOptions", "OrtOptions", "OpenVinoOptions", "options_for", "BACKENDS",
           "REGISTRY", "spec", "ORT_PROFILES", "COMPILE_MODES", "backend_for_path", "check_model_file",
           "resolve_device", "read_embedded_config", "silence_torchscript_deprecation", "physical_cores",
           "ort_session_options", "ort_providers", "cpu_supports_bf16", "configure_cudnn"]
