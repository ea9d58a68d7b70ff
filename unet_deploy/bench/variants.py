"""Variant names: a backend plus its fast-path options, written like "torch-bf16-cl" or "ort-int8".

The grammar is ``BACKEND[-PRECISION][-cl][-compile|-cgraph][-default][-iob]``; the plain backend and precision
names are :mod:`unet_deploy.names`'s, this module adds the flags and which combinations make sense.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..backend_options import BackendOptions, OrtOptions, TorchOptions, TorchScriptOptions
from ..errors import UserError
from ..names import BACKENDS, PRECISIONS

__all__ = ["BENCH_BACKENDS", "PRECISIONS", "FLAGS", "BACKEND_NAMES", "VARIANT_HELP", "Variant", "parse_variant",
           "expand_variants", "variant_label"]

#: Backends in table order; "torch" (eager) is the parity reference.
BENCH_BACKENDS = BACKENDS
FLAGS = ("cl", "compile", "cgraph", "default", "iob")
#: How the tables name each backend.
BACKEND_NAMES = {"torch": "torch (eager)", "torchscript": "torchscript", "ort": "onnxruntime"}
VARIANT_HELP = ("BACKEND[-PRECISION][-cl][-compile|-cgraph][-default][-iob]: torch, torchscript or ort; "
                "precision fp32 (default), bf16/fp16 (torch), fp16/int8 (ort files); cl = channels_last; "
                "compile = torch.compile, cgraph = torch.compile reduce-overhead (CUDA graphs); default = "
                "ONNX Runtime's default session options (untuned); iob = ORT IO binding")


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration: a backend and its fast-path options."""

    backend: str
    precision: str = "fp32"
    channels_last: bool = False
    compile: str | None = None
    ort_profile: str = "tuned"
    io_binding: bool | None = None

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
        return "-".join(parts)

    def options(self, threads: int | None = None) -> BackendOptions:
        """The backend's load options for this variant (``threads``: ONNX Runtime's; torch's are set for
        the whole process). An ONNX file's precision is the file's, so it is no load option."""
        if self.backend == "ort":
            return OrtOptions(threads=threads, profile=self.ort_profile, io_binding=self.io_binding)
        if self.backend == "torchscript":
            return TorchScriptOptions()
        return TorchOptions(precision=self.precision, channels_last=self.channels_last, compile=self.compile)

    @property
    def file_key(self) -> str:
        """Which model file it loads (keys of ``ModelFiles.paths``)."""
        return f"ort-{self.precision}" if self.backend == "ort" and self.precision != "fp32" else self.backend

    @property
    def label(self) -> str:
        """Table label, e.g. "torch (eager) bf16 cl", "onnxruntime int8"."""
        base = BACKEND_NAMES.get(self.backend, self.backend)
        extra = [w for w in self.name.split("-")[1:]]
        return " ".join([base, *extra]) if extra else base


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
    if backend == "torchscript" and (precision != "fp32" or flags):
        raise UserError(f"--backends {word}: torchscript runs the fp32 export as is; drop {'-'.join(rest)}")
    if backend == "torch":
        if precision == "int8" or flags & {"default", "iob"}:
            raise UserError(f"--backends {word}: int8, default and iob are ONNX Runtime options (ort-...)")
        if precision == "fp16" and device is not None and not device.startswith("cuda"):
            raise UserError(f"--backends {word}: torch fp16 needs CUDA; use torch-bf16 on CPU")
    if backend == "ort":
        if precision == "bf16" or flags & {"cl", "compile", "cgraph"}:
            raise UserError(f"--backends {word}: ort takes fp32, fp16 or int8 and -default/-iob only")
    compile_mode = "reduce-overhead" if "cgraph" in flags else ("default" if "compile" in flags else None)
    return Variant(backend, precision, "cl" in flags, compile_mode, "default" if "default" in flags else "tuned",
                   True if "iob" in flags else None)


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
