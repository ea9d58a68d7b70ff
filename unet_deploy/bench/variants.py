"""Variant names: a backend plus its fast-path options, written like "torch-bf16-cl" or "ort-int8".

The grammar is ``BACKEND[-PRECISION][-cl][-compile|-cgraph][-default][-iob][-plain]``; the plain backend and precision
names are :mod:`unet_deploy.names`'s, this module adds the flags and which combinations make sense.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from unet_deploy.errors import UserError
from unet_deploy.names import PRECISIONS
from unet_deploy.runtime.backend_options import (
    BackendOptions,
    OpenVinoOptions,
    OrtOptions,
    TorchOptions,
    TorchScriptOptions,
)
from unet_deploy.runtime.registry import BACKENDS

__all__ = ["BENCH_BACKENDS", "default_backends", "PRECISIONS", "FLAGS", "BACKEND_NAMES", "VARIANT_HELP", "Variant",
           "parse_variant", "expand_variants", "variant_label"]

#: Backends in table order; "torch" (eager) is the parity reference.
BENCH_BACKENDS = BACKENDS
FLAGS = ("cl", "compile", "cgraph", "default", "iob", "plain")
#: How the tables name each backend.
BACKEND_NAMES = {"torch": "torch (eager)", "torchscript": "torchscript", "ort": "onnxruntime", "openvino": "openvino"}
VARIANT_HELP = ("BACKEND[-PRECISION][-cl][-compile|-cgraph][-default][-iob][-plain]: torch, torchscript, ort or "
                "openvino; precision fp32 (default), bf16/fp16 (torch, openvino), fp16/int8 (ort files), int8 "
                "(openvino: NNCF, other layers at bf16 where the CPU has it); cl = channels_last; compile = "
                "torch.compile, cgraph = torch.compile reduce-overhead (CUDA graphs); default = ONNX Runtime's "
                "default session options (untuned); iob = ORT IO binding; plain = openvino on a plain "
                "torch.onnx export (no export rewrites); openvino-int8-plain = the plain recipe (plain export, "
                "nncf.quantize with its defaults, OpenVINO's default hints)")


def default_backends() -> tuple[str, ...]:
    """The backends a benchmark runs when none are named: every one whose runtime is installed (OpenVINO
    is an extra)."""
    from unet_deploy.runtime import openvino_backend as backend_openvino  # light: no openvino import

    return tuple(b for b in BENCH_BACKENDS if b != "openvino" or backend_openvino.openvino_installed())


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: a backend and its fast-path options."""

    backend: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    ort_profile: str = "tuned"
    io_binding: bool | None = None
    plain: bool = False  #: openvino: the IR of a plain torch.onnx export instead of this package's export

    @property
    def name(self) -> str:
        """Canonical name: backend, then precision (unless fp32), then flags in a fixed order."""
        parts = [self.backend]
        if self.precision != "fp32":
            parts.append(self.precision)
        if self.channels_last:
            parts.append("cl")
        if self.compile:
            parts.append("cgraph" if self.compile == "reduce-overhead" else "compile")
        if self.ort_profile == "default":
            parts.append("default")
        if self.io_binding:
            parts.append("iob")
        if self.plain:
            parts.append("plain")
        return "-".join(parts)

    def options(self, threads: int | None = None) -> BackendOptions:
        """The backend's load options for this variant (``threads``: ONNX Runtime's; torch's are set for
        the whole process). An ONNX file's precision is the file's, so it is no load option."""
        if self.backend == "ort":
            return OrtOptions(threads=threads, profile=self.ort_profile, io_binding=self.io_binding)
        if self.backend == "torchscript":
            return TorchScriptOptions()
        if self.backend == "openvino":
            return OpenVinoOptions(precision=self._openvino_precision(), threads=threads)
        return TorchOptions(precision=self.precision, channels_last=self.channels_last, compile=self.compile)

    def _openvino_precision(self) -> str:
        """The runtime precision hint: an int8 IR is int8 by its file and runs its other layers at the fastest
        precision this CPU has (bf16 where it has bf16); the plain int8 recipe sets no hint at all."""
        if self.precision != "int8":
            return self.precision
        if self.plain:
            return "default"
        from unet_deploy.runtime.openvino_backend import openvino_cpu_has

        return "bf16" if openvino_cpu_has("bf16") else "fp32"

    @property
    def file_key(self) -> str:
        """Which model file it loads (keys of ``ModelFiles.paths``)."""
        if self.backend == "openvino":
            return "-".join(["openvino", *(["int8"] if self.precision == "int8" else []),
                             *(["plain"] if self.plain else [])])
        return f"ort-{self.precision}" if self.backend == "ort" and self.precision != "fp32" else self.backend

    @property
    def label(self) -> str:
        """Table label, e.g. "torch (eager) bf16 cl", "onnxruntime int8"."""
        base = BACKEND_NAMES.get(self.backend, self.backend)
        extra = [w for w in self.name.split("-")[1:]]
        return " ".join([base, *extra]) if extra else base


def _refuse_combination(backend: str, precision: str, flags: set[str], device: str | None) -> str | None:
    """Why this backend cannot take ``precision`` / ``flags`` (a message), or None when it can."""
    if backend == "torchscript" and (precision != "fp32" or flags):
        return "torchscript runs the fp32 export as is; use plain torchscript"
    if "plain" in flags and backend != "openvino":
        return "-plain is an openvino option (openvino-plain)"
    if backend == "torch" and (precision == "int8" or flags & {"default", "iob"}):
        return "int8, default and iob are ONNX Runtime options (ort-...)"
    if backend == "torch" and precision == "fp16" and device is not None and not device.startswith("cuda"):
        return "torch fp16 needs CUDA; use torch-bf16 on CPU"
    if backend == "ort" and (precision == "bf16" or flags & {"cl", "compile", "cgraph"}):
        return "ort takes fp32, fp16 or int8 and -default/-iob only"
    if backend == "openvino" and flags - {"plain"}:
        return "openvino takes fp32, bf16, fp16 or int8 and -plain only"
    return None


def parse_variant(word: str, device: str | None = None) -> Variant:
    """``torch-bf16-cl`` -> Variant; bad words and combinations raise a one-line :class:`UserError`."""
    parts = [p for p in word.strip().lower().replace("_", "-").split("-") if p]
    if not parts or parts[0] not in BENCH_BACKENDS:
        raise UserError(f"--backends {word}: unknown backend; use {VARIANT_HELP}")
    backend, rest = parts[0], parts[1:]
    precision, flags = "fp32", set()
    for p in rest:
        if p in PRECISIONS:
            precision = p
        elif p in FLAGS:
            flags.add(p)
        else:
            raise UserError(f"--backends {word}: unknown option {p!r}; use {VARIANT_HELP}")
    problem = _refuse_combination(backend, precision, flags, device)
    if problem:
        raise UserError(f"--backends {word}: {problem}")
    compile_mode = "reduce-overhead" if "cgraph" in flags else ("default" if "compile" in flags else None)
    return Variant(backend, precision, "cl" in flags, compile_mode, "default" if "default" in flags else "tuned",
                   True if "iob" in flags else None, "plain" in flags)


def expand_variants(words: Sequence[str], precisions: Sequence[str] = (), channels_last: bool = False,
                    compile: str | None = None, device: str | None = None) -> list[str]:
    """Variant names for ``--backends`` words combined with ``--precision``/``--channels-last``/``--compile``.

    Each precision is applied to every backend that supports it (torchscript only fp32; torch fp16 only
    on CUDA, int8 only for ort); ``channels_last`` and ``compile`` apply to the eager torch variants.
    """
    out: list[str] = []
    for word in words:
        v = parse_variant(word, device)
        options = [v.precision] if not precisions else list(precisions)
        for p in options:
            if p not in PRECISIONS:
                raise UserError(f"--precision {p}: use {', '.join(PRECISIONS)}")
            if v.backend == "torchscript" and p != "fp32":
                continue
            if v.backend == "torch" and (p == "int8" or (p == "fp16" and not str(device).startswith("cuda"))):
                continue
            if v.backend == "ort" and p == "bf16":
                continue
            c = replace(v, precision=p)
            if c.backend == "torch":
                c = replace(c, channels_last=c.channels_last or channels_last, compile=c.compile or compile)
            out.append(c.name)
    return list(dict.fromkeys(out))


def variant_label(name: str) -> str:
    """Table label of a variant name ("torch-bf16-cl" -> "torch (eager) bf16 cl"); unknown names as given."""
    try:
        return parse_variant(name).label
    except UserError:
        return name
