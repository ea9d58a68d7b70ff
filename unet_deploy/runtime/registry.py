"""One typed entry per backend: what it is called, which files it runs, its options, how it loads and exports,
its precisions, memory figures, default batching and thread policy. Every other module asks here; adding a
backend is one runtime module plus one entry in :data:`REGISTRY`.

Loaders, config readers and export writers are named as ``"module:function"`` and imported when first used:
the registry itself imports no runtime (the ONNX Runtime path never loads torch, and OpenVINO is an extra).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unet_deploy.errors import ModelFileError, OptionError, UserError, closest
from unet_deploy.runtime.backend_options import (
    OPENVINO_PRECISIONS,
    TORCH_PRECISIONS,
    BackendOptions,
    OpenVinoOptions,
    OrtOptions,
    TorchOptions,
    TorchScriptOptions,
)

__all__ = ["BackendSpec", "register", "REGISTRY", "BACKENDS", "REFERENCE_BACKEND", "MODEL_SUFFIXES",
           "EXPORT_SUFFIXES", "FORMATS", "spec", "spec_for_path", "backend_for_path", "format_spec",
           "is_checkpoint_file", "is_export_file", "installed_backends", "closest"]


@dataclass(frozen=True)
class BackendSpec:
    """A backend.

    Args:
        name: the ``--backend`` word (``ort``).
        label: how tables name it (``onnxruntime``).
        suffixes: model files it runs; the first is the one its export writes.
        options: its options class (:mod:`unet_deploy.runtime.backend_options`).
        loader: ``"module:function"`` with ``(path, device, options) -> Backend``.
        config_reader: ``"module:function"`` with ``(path) -> DeployConfig | None``: the config a model file
            carries.
        precisions: the precisions a model may run at on it.
        export_format: the ``--format`` word that writes its files (None: checkpoints come from training).
        format_aliases: other words for that format.
        format_title: how messages name that format (``ONNX``).
        export_rank: the order ``export`` writes formats in (ONNX first: the IR is converted from it).
        writer: ``"module:function"`` staging an export of this format (:mod:`unet_deploy.export.exporter`).
        built_from: the backend whose exported file its writer converts (OpenVINO's IR: from the ONNX file).
        derivers: (precision, ``"module:function"``) pairs: files ``export`` derives from the verified one
            (``NAME.int8.onnx``), each written by its function.
        companions: files that travel with a model file (an IR's ``.bin``): sized, placed first, together.
        runtime_precisions: reduced precisions it can be asked to run a file at (OpenVINO's hint), each checked
            at export on this CPU and recorded in the file.
        precision_probe: ``"module:function"`` (precision) -> whether this CPU runs it natively.
        verdict_writer: ``"module:function"`` (file, key, value) recording the verdicts in the file.
        verify_options: option values the export's parity loads use (OpenVINO: no compiled-model cache).
        variant_flags: the benchmark variant flags it takes (``torch-bf16-cl``: ``cl``;
            :mod:`unet_deploy.bench.variants`).
        cuda_only: precisions it runs on CUDA only (eager torch fp16).
        also_runs: other suffixes it runs (OpenVINO reads ONNX files).
        own_devices: it resolves ``--device`` itself (OpenVINO's device names).
        activation_bytes: bytes per pixel per feature channel at (fp32, half) precision during inference
            (:mod:`unet_deploy.runtime.resources`).
        overhead_mib: the runtime's own memory on top of weights and activations.
        max_batch_cpu: ``serve``'s default ``--max-batch`` on a CPU (4 on a GPU): batches that run faster per
            image (OpenVINO's parallel streams) or not (one image already uses every core).
        takes_threads: its options take ``threads``; several processes on one machine share the cores.
        runtime_module: the library it runs on, imported before a benchmark's memory baseline (part of the
            process, not of the model's memory).
        optional_module: the module whose presence says it is installed (an extra), or None.
        install_hint: how to install it.
    """

    name: str
    label: str
    suffixes: tuple[str, ...]
    options: type[Any]
    loader: str
    config_reader: str
    precisions: tuple[str, ...]
    export_format: str | None = None
    format_aliases: tuple[str, ...] = ()
    format_title: str = ""
    export_rank: int = 0
    writer: str | None = None
    built_from: str | None = None
    derivers: tuple[tuple[str, str], ...] = ()
    companions: tuple[str, ...] = ()
    runtime_precisions: tuple[str, ...] = ()
    precision_probe: str | None = None
    verdict_writer: str | None = None
    verify_options: tuple[tuple[str, Any], ...] = ()
    variant_flags: tuple[str, ...] = ()
    cuda_only: tuple[str, ...] = ()
    also_runs: tuple[str, ...] = ()
    own_devices: bool = False
    activation_bytes: tuple[float, float] = (32.0, 32.0)
    overhead_mib: int = 64
    max_batch_cpu: int = 1
    takes_threads: bool = False
    runtime_module: str = "torch"
    optional_module: str | None = None
    install_hint: str = ""

    @property
    def derived_precisions(self) -> tuple[str, ...]:
        """The precisions ``export`` derives as separate files."""
        return tuple(p for p, _ in self.derivers)

    def deriver(self, precision: str) -> Callable[..., Any]:
        """The function writing the ``precision`` file derived from this backend's export."""
        return _resolve(dict(self.derivers)[precision])

    def has_precision(self, precision: str) -> bool:
        """Whether this CPU runs ``precision`` natively on this backend (fp32: always)."""
        return precision == "fp32" or (self.precision_probe is not None
                                       and bool(_resolve(self.precision_probe)(precision)))

    def record_verdicts(self, path: Path, key: str, value: str) -> None:
        """Record precision verdicts in the model file (backends with runtime precisions)."""
        if self.verdict_writer is not None:
            _resolve(self.verdict_writer)(path, key, value)

    @property
    def export_suffix(self) -> str:
        """The suffix ``export`` writes for this backend."""
        return self.suffixes[0]

    def runs(self, path: str | Path) -> bool:
        """Whether this backend runs the file ``path`` (by its suffix)."""
        return Path(path).suffix.lower() in (*self.suffixes, *self.also_runs)

    def installed(self) -> bool:
        """Whether its runtime can be imported here (without importing it)."""
        if self.optional_module is None:
            return True
        try:
            return importlib.util.find_spec(self.optional_module) is not None
        except (ImportError, ValueError):  # an import hook that refuses it, a broken install
            return False

    def load(self, path: Path, device: str, options: BackendOptions) -> Any:
        """Its loader (imported now) applied to ``path``."""
        return _resolve(self.loader)(path, device, options)

    def read_config(self, path: Path) -> Any:
        """The config the model file carries, or None."""
        return _resolve(self.config_reader)(path)

    def stage(self) -> Callable[..., Any]:
        """Its export writer."""
        if self.writer is None:
            raise UserError(f"--backend {self.name}: runs checkpoints; there is nothing to export for it")
        return _resolve(self.writer)

    def runs_precision_on(self, precision: str, device: str | None) -> bool:
        """Whether a model may run at ``precision`` on this backend and ``device`` (None: not yet known)."""
        on_device = device is None or device.startswith("cuda") or precision not in self.cuda_only
        return precision in self.precisions and on_device

    def max_batch(self, device: str) -> int:
        """``serve``'s default ``--max-batch`` on ``device``."""
        return 4 if device.startswith("cuda") else self.max_batch_cpu


def _resolve(dotted: str) -> Callable[..., Any]:
    module, _, name = dotted.partition(":")
    found: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return found


_RT = "unet_deploy.runtime"
#: Every backend, in table order; "torch" (eager) is the parity reference.
REGISTRY: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("torch", "torch (eager)", (".pth", ".pt", ".ckpt"), TorchOptions,
                f"{_RT}.torch_backend:load_torch", f"{_RT}.torch_backend:read_checkpoint_config",
                TORCH_PRECISIONS, variant_flags=("cl", "compile", "cgraph"), cuda_only=("fp16",),
                activation_bytes=(32, 32), overhead_mib=64),
    BackendSpec("torchscript", "torchscript", (".ts", ".torchscript", ".jit"), TorchScriptOptions,
                f"{_RT}.torchscript_backend:load_torchscript", f"{_RT}.torchscript_backend:read_torchscript_config",
                ("fp32",), export_format="torchscript", format_aliases=("ts", "jit"),
                format_title="TorchScript", export_rank=1,
                writer="unet_deploy.export.writers:stage_torchscript", activation_bytes=(18, 18), overhead_mib=64),
    BackendSpec("ort", "onnxruntime", (".onnx",), OrtOptions, f"{_RT}.ort_backend:load_ort",
                f"{_RT}.ort_backend:read_onnx_config", ("fp32", "fp16", "int8"), export_format="onnx",
                format_title="ONNX",                writer="unet_deploy.export.writers:stage_onnx",
                derivers=(("int8", "unet_deploy.export.writers:derive_onnx_int8"),
                          ("fp16", "unet_deploy.export.writers:derive_onnx_fp16")), variant_flags=("default", "iob"),
                activation_bytes=(14, 12), overhead_mib=0, takes_threads=True, runtime_module="onnxruntime",
                install_hint="pip install onnxruntime-gpu (Linux x86-64) or onnxruntime"),
    BackendSpec("openvino", "openvino", (".xml",), OpenVinoOptions, f"{_RT}.openvino_backend:load_openvino",
                f"{_RT}.openvino_backend:read_ir_config", (*OPENVINO_PRECISIONS, "int8"),
                export_format="openvino", format_aliases=("ov", "ir"), format_title="OpenVINO", export_rank=2,
                writer="unet_deploy.export.openvino_writer:stage_openvino", built_from="ort",
                derivers=(("int8", "unet_deploy.export.openvino_writer:derive_ir_int8"),), companions=(".bin",),
                runtime_precisions=("bf16", "fp16"), precision_probe=f"{_RT}.openvino_backend:openvino_cpu_has",
                verdict_writer="unet_deploy.export.openvino_writer:set_ir_metadata",
                verify_options=(("cache", False),), variant_flags=("plain",), also_runs=(".onnx",), own_devices=True,
                activation_bytes=(24, 24), overhead_mib=64,
                max_batch_cpu=4, takes_threads=True, runtime_module="openvino", optional_module="openvino",
                install_hint='pip install "unet-deploy[openvino]" (or pip install openvino)'),
)}
BACKENDS = tuple(REGISTRY)
#: The backend every other is compared with: parity's reference and the speed-ups' denominator (eager fp32).
REFERENCE_BACKEND = "torch"
#: Model file suffix -> the backend that runs it.
MODEL_SUFFIXES: dict[str, str] = {}
#: The suffix ``unet-deploy export`` writes for each exported backend.
EXPORT_SUFFIXES: dict[str, str] = {}
#: ``--format`` word -> the backend whose files it writes, in the order ``export`` writes them.
FORMATS: dict[str, BackendSpec] = {}


def _index() -> None:
    """Fill the tables above from :data:`REGISTRY` (in place: modules hold references to them)."""
    MODEL_SUFFIXES.clear()
    MODEL_SUFFIXES.update({suffix: s.name for s in REGISTRY.values() for suffix in s.suffixes})
    EXPORT_SUFFIXES.clear()
    EXPORT_SUFFIXES.update({s.name: s.export_suffix for s in REGISTRY.values() if s.export_format})
    FORMATS.clear()
    FORMATS.update({s.export_format: s for s in sorted(REGISTRY.values(), key=lambda s: s.export_rank)
                    if s.export_format})


_index()


def register(entry: BackendSpec) -> Callable[[], None]:
    """Add a backend at run time (a plugin, a test): its files load, predict, serve and benchmark through it.

    Args:
        entry: the new backend's entry; its loader and config reader name a module that can be imported.

    Returns:
        A function that removes the entry again.

    Raises:
        ValueError: a backend of that name, or a suffix another backend runs, exists already.
    """
    taken = [x for x in entry.suffixes if x in MODEL_SUFFIXES]
    if entry.name in REGISTRY or taken:
        raise ValueError(f"register: backend {entry.name!r} or suffixes {taken} exist already")
    REGISTRY[entry.name] = entry
    _index()

    def remove() -> None:
        REGISTRY.pop(entry.name, None)
        _index()

    return remove


def spec(name: str, flag: str = "--backend") -> BackendSpec:
    """The entry of backend ``name``; an unknown name is a one-line :class:`UserError` suggesting the closest."""
    found = REGISTRY.get(name)
    if found is None:
        names = tuple(REGISTRY)
        raise OptionError(f"{flag} {name}: unknown backend{closest(name, names)}; use one of {', '.join(names)}")
    return found


def format_spec(word: str) -> BackendSpec:
    """The backend whose files ``--format word`` writes (aliases too); one line suggesting the closest if none."""
    for s in FORMATS.values():
        if word == s.export_format or word in s.format_aliases:
            return s
    words = [*FORMATS, "all"]
    raise OptionError(f"--format {word}: unknown format{closest(word, words)}; use {', '.join(words)}")


def spec_for_path(path: str | Path) -> BackendSpec:
    """The backend that runs a model file, from its suffix; an unknown suffix is a one-line :class:`UserError`."""
    suffix = Path(path).suffix.lower()
    if suffix not in MODEL_SUFFIXES:
        known = ", ".join(f"{s.suffixes[0]} ({s.name})" for s in REGISTRY.values())
        raise ModelFileError(f"{path}: cannot tell the backend from suffix {suffix!r}; use {known}, or pass --backend")
    return REGISTRY[MODEL_SUFFIXES[suffix]]


def backend_for_path(path: str | Path) -> str:
    """The name of the backend that runs a model file (:func:`spec_for_path`)."""
    return spec_for_path(path).name


def is_checkpoint_file(path: str | Path) -> bool:
    """Whether the suffix names a checkpoint (a file no export writes: .pth, .pt, .ckpt)."""
    name = MODEL_SUFFIXES.get(Path(path).suffix.lower())
    return name is not None and REGISTRY[name].export_format is None


def is_export_file(path: str | Path) -> bool:
    """Whether the suffix names an exported model (TorchScript, ONNX or OpenVINO IR)."""
    name = MODEL_SUFFIXES.get(Path(path).suffix.lower())
    return name is not None and REGISTRY[name].export_format is not None


def installed_backends() -> tuple[str, ...]:
    """The backends whose runtime is installed here, in table order (OpenVINO is an extra)."""
    return tuple(name for name, s in REGISTRY.items() if s.installed())
