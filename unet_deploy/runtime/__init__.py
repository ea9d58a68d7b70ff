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

from typing import TYPE_CHECKING

from unet_deploy import lazy_exports

if TYPE_CHECKING:  # the real names, for type checkers and IDEs
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
    from unet_deploy.runtime.ort_session import (
        ORT_PROFILES,
        ort_providers,
        ort_session_options,
        physical_cores,
        release_large_frees,
    )
    from unet_deploy.runtime.registry import BACKENDS, REGISTRY, backend_for_path, spec
    from unet_deploy.runtime.torch_backend import cpu_supports_bf16, module_backend
    from unet_deploy.runtime.torchscript_backend import silence_torchscript_deprecation

#: name -> the module that defines it. Imported on first use (PEP 562), so ``from unet_deploy.runtime import
#: load_backend`` does not import torch, ONNX Runtime or OpenVINO before a backend needs them.
_HOMES = {
    **dict.fromkeys(["COMPILE_MODES", "BackendOptions", "OpenVinoOptions", "OrtOptions", "TorchOptions",
                     "TorchScriptOptions", "options_for"], "backend_options"),
    **dict.fromkeys(["Backend", "Description", "Runner", "as_runner"], "base"),
    **dict.fromkeys(["configure_cudnn", "resolve_device"], "devices"),
    **dict.fromkeys(["check_model_file", "load_backend", "read_embedded_config"], "loader"),
    **dict.fromkeys(["ORT_PROFILES", "ort_providers", "ort_session_options", "physical_cores",
                     "release_large_frees"], "ort_session"),
    **dict.fromkeys(["BACKENDS", "REGISTRY", "backend_for_path", "spec"], "registry"),
    **dict.fromkeys(["cpu_supports_bf16", "module_backend"], "torch_backend"),
    "silence_torchscript_deprecation": "torchscript_backend",
}

__all__ = ["BACKENDS", "Backend", "BackendOptions", "COMPILE_MODES", "Description", "ORT_PROFILES",
           "OpenVinoOptions", "OrtOptions", "REGISTRY", "Runner", "TorchOptions", "TorchScriptOptions", "as_runner",
           "backend_for_path", "check_model_file", "configure_cudnn", "cpu_supports_bf16", "load_backend",
           "module_backend", "options_for", "ort_providers", "ort_session_options", "physical_cores",
           "read_embedded_config", "release_large_frees", "resolve_device", "silence_torchscript_deprecation",
           "spec"]


__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
