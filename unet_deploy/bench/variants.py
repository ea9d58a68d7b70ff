"""Variant names: a backend plus its fast-path options, written like "torch-bf16-cl" or "ort-int8".

The grammar is ``BACKEND[-PRECISION][-cl][-compile|-cgraph][-default][-iob][-plain]``. Which precisions and flags a
backend takes, and the options a variant loads with, are its registry entry's (:mod:`unet_deploy.runtime.registry`:
``precisions``, ``cuda_only``, ``variant_flags``, ``options.for_variant``); this module only parses and names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from unet_deploy.errors import UserError
from unet_deploy.names import PRECISIONS
from unet_deploy.runtime.backend_options import BackendOptions
from unet_deploy.runtime.registry import BACKENDS, REGISTRY, closest, installed_backends

__all__ = ["BENCH_BACKENDS", "default_backends", "PRECISIONS", "FLAGS", "BACKEND_NAMES", "VARIANT_HELP", "Variant",
           "parse_variant", "expand_variants", "variant_label"]

#: Backends in table order; "torch" (eager) is the parity reference.
BENCH_BACKENDS = BACKENDS
FLAGS = ("cl", "compile", "cgraph", "default", "iob", "plain")
#: How the tables name each backend.
BACKEND_NAMES = {name: entry.label for name, entry in REGISTRY.items()}
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
    return installed_backends()


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
        """The backend's load options for this variant (``threads``: for backends that take threads)."""
        options: BackendOptions = REGISTRY[self.backend].options.for_variant(self, threads)
        return options

    @property
    def file_key(self) -> str:
        """Which model file it loads (keys of ``ModelFiles.paths``): the backend, the precision of a derived file
        (``ort-int8``, ``openvino-int8``) and ``plain`` (``openvino-int8-plain``)."""
        derived = self.precision in REGISTRY[self.backend].derived_precisions
        return "-".join([self.backend, *([self.precision] if derived else []), *(["plain"] if self.plain else [])])

    @property
    def label(self) -> str:
        """Table label, e.g. "torch (eager) bf16 cl", "onnxruntime int8"."""
        base = BACKEND_NAMES.get(self.backend, self.backend)
        extra = [w for w in self.name.split("-")[1:]]
        return " ".join([base, *extra]) if extra else base


def _refuse_combination(backend: str, precision: str, flags: set[str], device: str | None) -> str | None:
    """Why this backend cannot take ``precision`` / ``flags`` (a message), or None when it can."""
    entry = REGISTRY[backend]
    if not entry.runs_precision_on(precision, device):
        on_cuda = [p for p in entry.precisions if p not in entry.cuda_only]
        cuda = f" ({', '.join(entry.cuda_only)} needs CUDA)" if entry.cuda_only else ""
        return f"{backend} takes {', '.join(on_cuda)}{cuda}, not {precision}"
    if flags - set(entry.variant_flags):
        takes = ", ".join(f"-{f}" for f in entry.variant_flags) or "no flags"
        return f"{backend} takes {takes}, not {', '.join(sorted(f'-{f}' for f in flags))}"
    return None


def parse_variant(word: str, device: str | None = None) -> Variant:
    """``torch-bf16-cl`` -> Variant; bad words and combinations raise a one-line :class:`UserError`."""
    parts = [p for p in word.strip().lower().replace("_", "-").split("-") if p]
    if not parts or parts[0] not in REGISTRY:
        raise UserError(f"--backends {word}: unknown backend{closest(parts[0] if parts else '', tuple(REGISTRY))}; "
                        f"use {VARIANT_HELP}")
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

    Each precision is applied to every backend that runs it (its registry entry: torchscript only fp32, torch
    fp16 only on CUDA); ``channels_last`` and ``compile`` apply to the eager torch variants.
    """
    out: list[str] = []
    for word in words:
        v = parse_variant(word, device)
        options = [v.precision] if not precisions else list(precisions)
        for p in options:
            if p not in PRECISIONS:
                raise UserError(f"--precision {p}: use {', '.join(PRECISIONS)}")
            if not REGISTRY[v.backend].runs_precision_on(p, device or "cpu"):
                continue
            c = replace(v, precision=p)
            if "cl" in REGISTRY[c.backend].variant_flags:  # the eager fast paths
                c = replace(c, channels_last=c.channels_last or channels_last, compile=c.compile or compile)
            out.append(c.name)
    return list(dict.fromkeys(out))


def variant_label(name: str) -> str:
    """Table label of a variant name ("torch-bf16-cl" -> "torch (eager) bf16 cl"); unknown names as given."""
    try:
        return parse_variant(name).label
    except UserError:
        return name
