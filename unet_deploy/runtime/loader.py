"""Loading any model file for inference: :func:`load_backend` checks the file and the options, then asks the
backend's registry entry (:mod:`unet_deploy.runtime.registry`) to load it; :func:`read_embedded_config` reads the
config a model file carries without running it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unet_deploy.config import DeployConfig
from unet_deploy.errors import ModelFileError, UserError
from unet_deploy.fileio import require_file
from unet_deploy.names import DEMO_DIR
from unet_deploy.runtime.backend_options import BackendOptions, options_for
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.devices import resolve_device
from unet_deploy.runtime.registry import is_checkpoint_file, spec, spec_for_path

__all__ = ["load_backend", "check_model_file", "read_embedded_config"]


def read_embedded_config(path: str | Path) -> DeployConfig | None:
    """The config a model file carries (checkpoint, TorchScript extra file, ONNX metadata, IR rt_info), or None.

    Args:
        path: the model file; its suffix says which backend reads it.

    Returns:
        The :class:`~unet_deploy.config.DeployConfig`, or None for an export without one.
    """
    path = Path(path)
    config: DeployConfig | None = spec_for_path(path).read_config(path)
    return config


def check_model_file(path: Path) -> None:
    """A one-line :class:`UserError` when the model file is missing or unreadable, saying how to make one (or,
    when only the Quick start ran here, where the demo's file of that name is)."""
    demo = Path(DEMO_DIR) / path
    how = ("train one with `unet-deploy train` or pass -m" if is_checkpoint_file(path)
           else "export one with `unet-deploy export` or pass -m")
    if not Path(path).is_absolute() and not Path(path).exists() and demo.is_file():
        how = f"the demo's is {demo}: pass -m {demo}, or leave -m out (predict and serve find it)"
    require_file(path, "model file", how, "re-export it", error=ModelFileError)


def load_backend(path: str | Path, backend: str | None = None, device: str = "auto",
                 options: BackendOptions | None = None, **option_values: Any) -> Backend:
    """Load a checkpoint (.pth), TorchScript (.ts), ONNX (.onnx) or OpenVINO IR (.xml) model for inference.

    Args:
        path: the model file.
        backend: the backend to run it on (default: the one its suffix names; ``openvino`` also runs .onnx).
        device: ``auto``, ``cpu``, ``cuda[:N]`` (OpenVINO: also its own device names).
        options: the backend's option object (:mod:`unet_deploy.runtime.backend_options`).
        **option_values: or the option values as keywords (``precision="bf16"``, ``threads=2``), turned into
            that object: a value for an option the backend does not take is a one-line :class:`UserError`,
            never silently ignored.

    Returns:
        The loaded :class:`~unet_deploy.runtime.base.Backend` (a Runner). The precision of an ONNX file is the
        one it was exported with; on CUDA torch runs with cuDNN autotuning and a bounded workspace.

    Raises:
        UserError: a missing or unreadable file, an unknown backend, a file the backend cannot run, options of
            another backend.
    """
    path = Path(path)
    check_model_file(path)
    chosen = spec(backend) if backend else spec_for_path(path)
    if not chosen.runs(path):
        owner = spec_for_path(path).name
        raise ModelFileError(f"{path}: a {owner} model file cannot run on --backend {chosen.name}; "
                        f"pass --backend {owner} or a matching file")
    if options is None:
        options = options_for(chosen.name, **option_values)
    elif option_values:
        raise TypeError("load_backend: pass either an options object or option keywords, not both")
    elif options.backend != chosen.name:
        raise UserError(f"{path}: {type(options).__name__} are for --backend {options.backend}, not {chosen.name}")
    if not chosen.own_devices:
        device = resolve_device(device, chosen.name)
    loaded: Backend = chosen.load(path, device, options)
    return loaded
