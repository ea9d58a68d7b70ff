"""Per-backend load options: one small object per backend, holding only the options that backend takes.

``TorchOptions`` (eager ``.pth``: precision, channels_last, compile), ``TorchScriptOptions`` (none) and
``OrtOptions`` (ONNX Runtime: threads, session profile, IO binding) and ``OpenVinoOptions`` (precision
hint, threads, performance hint, compiled-model cache). :func:`options_for` builds the right one from
command-line values and refuses, in one line, a value given for an option the backend does not take
(``--threads`` for a checkpoint, ``--precision bf16`` for an ONNX file on ONNX Runtime): never silently
ignored. No torch, ONNX Runtime or OpenVINO imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from unet_deploy.errors import OptionError, UserError, closest
from unet_deploy.runtime.ort_session import ORT_PROFILES

__all__ = ["TORCH_PRECISIONS", "OPENVINO_PRECISIONS", "TorchOptions", "TorchScriptOptions", "OrtOptions",
           "OpenVinoOptions", "BackendOptions", "COMPILE_MODES",
           "OPENVINO_HINTS", "OPTION_FLAGS", "options_for", "options_for_model"]

#: Precisions the eager torch backend converts a checkpoint to.
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")
#: OpenVINO's inference-precision hints (the precision its kernels compute in; an int8 IR stays int8).
OPENVINO_PRECISIONS = ("fp32", "bf16", "fp16")
#: ``torch.compile`` modes for ``TorchOptions(compile=...)``; "reduce-overhead" uses CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: OpenVINO performance hints: "auto" compiles for latency and, for batches of several images, also for
#: throughput (parallel streams, one image each); "latency" / "throughput" force one.
OPENVINO_HINTS = ("auto", "latency", "throughput")
#: option field -> the command-line flag that sets it (for messages)
OPTION_FLAGS = {"precision": "--precision", "channels_last": "--channels-last", "compile": "--compile",
                "threads": "--threads", "profile": "ORT profile", "io_binding": "IO binding",
                "hint": "OpenVINO hint", "cache": "OpenVINO cache"}
_WHERE = {"torch": "the eager torch backend (a .pth model)", "ort": "--backend ort (an .onnx model)",
          "torchscript": "--backend torchscript (a .ts model)", "openvino": "--backend openvino"}


@dataclass(frozen=True)
class TorchOptions:
    """Eager torch: ``precision`` fp32, bf16 (CPUs with native bfloat16, or CUDA) or fp16 (CUDA);
    ``channels_last`` NHWC memory layout; ``compile`` a ``torch.compile`` mode or None."""

    backend: ClassVar[str] = "torch"
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in TORCH_PRECISIONS:
            raise OptionError(f"--precision {self.precision}: unknown precision"
                              f"{closest(self.precision, TORCH_PRECISIONS)}; use {', '.join(TORCH_PRECISIONS)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise UserError(f"--compile {self.compile}: unknown mode; use {', '.join(COMPILE_MODES)}")

    @classmethod
    def for_variant(cls, variant: Any, threads: int | None = None) -> TorchOptions:
        """A benchmark variant's options (torch's threads are set for the whole process, not here)."""
        return cls(precision=variant.precision, channels_last=variant.channels_last, compile=variant.compile)


@dataclass(frozen=True)
class TorchScriptOptions:
    """TorchScript runs at the precision it was exported with; it takes no load options."""

    backend: ClassVar[str] = "torchscript"

    @classmethod
    def for_variant(cls, variant: Any, threads: int | None = None) -> TorchScriptOptions:
        """A benchmark variant's options: none."""
        return cls()


@dataclass(frozen=True)
class OrtOptions:
    """ONNX Runtime: ``threads`` intra-op threads (None: the physical cores); ``profile`` "tuned" (this
    package's session options) or "default" (ONNX Runtime's own); ``io_binding`` (None: on for CUDA)."""

    backend: ClassVar[str] = "ort"
    threads: int | None = None
    profile: str = "tuned"
    io_binding: bool | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads}: use 1 or more (or leave it out for all cores)")
        if self.profile not in ORT_PROFILES:
            raise UserError(f"ORT profile {self.profile!r}: use {' or '.join(ORT_PROFILES)}")

    @classmethod
    def for_variant(cls, variant: Any, threads: int | None = None) -> OrtOptions:
        """A benchmark variant's options (an ONNX file's precision is the file's, so it is no load option)."""
        return cls(threads=threads, profile=variant.ort_profile, io_binding=variant.io_binding)


@dataclass(frozen=True)
class OpenVinoOptions:
    """OpenVINO: ``precision`` its inference-precision hint: "auto" (default) the fastest one whose parity was
    verified for this model on this CPU at export (:mod:`unet_deploy.runtime.precision`), else fp32; or fp32,
    bf16 (CPUs with AVX-512 BF16 or AMX), fp16 where the device has it (an int8 IR keeps its int8 layers and
    runs the others at this precision); "default" sets no hint (OpenVINO's own choice: bf16 on CPUs with
    bf16; the plain-recipe comparison); ``threads`` CPU inference threads
    (None: OpenVINO's choice, the physical cores); ``hint`` a performance hint (:data:`OPENVINO_HINTS`);
    ``cache`` a compiled-model cache in ``.openvino-cache/`` beside the model (faster start-up)."""

    backend: ClassVar[str] = "openvino"
    precision: str = "auto"
    threads: int | None = None
    hint: str = "auto"
    cache: bool = True

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "default", *OPENVINO_PRECISIONS):
            near = closest(self.precision, OPENVINO_PRECISIONS)
            raise OptionError(f"--precision {self.precision}{near}: OpenVINO takes auto, "
                              f"{', '.join(OPENVINO_PRECISIONS)} (an int8 model is exported with "
                              "`unet-deploy export --format openvino --int8`)")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads {self.threads}: use 1 or more (or leave it out for all cores)")
        if self.hint not in OPENVINO_HINTS:
            raise UserError(f"OpenVINO hint {self.hint!r}: use {', '.join(OPENVINO_HINTS)}")

    @classmethod
    def for_variant(cls, variant: Any, threads: int | None = None) -> OpenVinoOptions:
        """A benchmark variant's options. An int8 IR is int8 by its file and runs its other layers at the fastest
        precision this CPU has (bf16 where it has bf16); the plain int8 recipe sets no hint at all."""
        precision = variant.precision
        if precision == "int8" and variant.plain:
            precision = "default"
        elif precision == "int8":
            from unet_deploy.runtime.openvino_backend import openvino_cpu_has

            precision = "bf16" if openvino_cpu_has("bf16") else "fp32"
        return cls(precision=precision, threads=threads)


BackendOptions = TorchOptions | TorchScriptOptions | OrtOptions | OpenVinoOptions
_CLASSES: tuple[type[TorchOptions] | type[TorchScriptOptions] | type[OrtOptions] | type[OpenVinoOptions], ...] = (
    TorchOptions, TorchScriptOptions, OrtOptions, OpenVinoOptions)
#: option name -> the defaults it has (precision: fp32 for torch, auto for OpenVINO); None means "not given"
_DEFAULTS: dict[str, set[Any]] = {}
for _cls in _CLASSES:
    for _f in fields(_cls):
        _DEFAULTS.setdefault(_f.name, {None}).add(_f.default)


def _owners(name: str) -> list[str]:
    return [cls.backend for cls in _CLASSES if name in {f.name for f in fields(cls)}]


def _refusal(backend: str, name: str, value: Any) -> UserError:
    flag = OPTION_FLAGS[name]
    shown = f"{flag} {value}" if name == "precision" else flag
    hint = ("a .ts / .onnx model on ONNX Runtime runs at the precision it was exported with (for ONNX fp16, "
            "export an fp16 model)" if name == "precision" else f"drop {flag}")
    where = " and ".join(_WHERE[b] for b in _owners(name))
    return UserError(f"{shown} applies to {where} only, not to {backend}; {hint}")


def options_for(backend: str, **given: Any) -> BackendOptions:
    """The option object for ``backend`` from option values (``precision=``, ``threads=``, ...). None means
    "not given" (the backend's default). A value left at a default is dropped when the backend does not take
    it; any other is a one-line
    :class:`UserError` naming the flag and the backend it applies to."""
    from unet_deploy.runtime.registry import spec

    cls = spec(backend).options
    own = {f.name for f in fields(cls)}
    for name, value in given.items():
        if name not in _DEFAULTS:
            raise TypeError(f"options_for: unknown option {name!r}")
        if name not in own and value not in _DEFAULTS[name]:
            raise _refusal(backend, name, value)
    return cls(**{k: v for k, v in given.items() if k in own and v is not None})


def options_for_model(path: str | Path, backend: str | None = None, **given: Any) -> BackendOptions:
    """:func:`options_for` the backend that runs ``path`` (``backend``, else the one its suffix names)."""
    from unet_deploy.runtime.registry import backend_for_path

    return options_for(backend or backend_for_path(Path(path)), **given)
