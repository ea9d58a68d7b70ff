"""What this CPU computes fast, decided by the ISA flags of /proc/cpuinfo -- and one switch that hides
bf16/AMX, so that the paths of an AVX2-only or AVX-512 CPU can be run and tested on an AMX machine.

``UNET_DEPLOY_CPU_HIDE`` takes comma-separated words:

* ``bf16`` -- no bf16 (nor fp16) kernels: AVX512_BF16, AMX (all tiles) and AVX512_FP16 are hidden; every
  OpenVINO model is compiled with the fp32 hint, torch bf16 counts as emulated, the roofline drops the
  bf16/AMX peaks;
* ``amx`` -- AMX only (an AMX Xeon looks like an AVX-512 BF16/VNNI CPU such as Zen 4).

Everything that asks "does this CPU have bf16?" asks here (OpenVINO's capability probe, torch's, the
roofline's flags), so the switch reaches them all, child processes included (it is an environment
variable). No torch, no OpenVINO imports here.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Any

from unet_deploy.errors import UserError

__all__ = ["HIDE_ENV", "HIDE_WORDS", "hidden_words", "hidden_flags", "raw_flags", "cpu_flags", "bf16_hidden",
           "bf16_kernels", "int8_kernels", "cpu_summary", "ISA_FLAGS"]

HIDE_ENV = "UNET_DEPLOY_CPU_HIDE"
_AMX = frozenset({"amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "amx_complex"})
#: switch word -> the /proc/cpuinfo flags it hides
HIDE_WORDS: dict[str, frozenset[str]] = {
    "amx": _AMX,
    "bf16": _AMX | {"avx512_bf16", "avx512_fp16", "avx_ne_convert"},
}
#: The flags that decide which int8 / bf16 kernels run (reported beside every measured number).
ISA_FLAGS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


def hidden_words() -> frozenset[str]:
    """The words of :data:`HIDE_ENV`; an unknown word is a one-line :class:`UserError`."""
    words = frozenset(w.strip().lower() for w in os.environ.get(HIDE_ENV, "").split(",") if w.strip())
    unknown = sorted(words - set(HIDE_WORDS))
    if unknown:
        raise UserError(f"{HIDE_ENV}={os.environ[HIDE_ENV]}: unknown word {unknown[0]!r}; use "
                        f"{' or '.join(HIDE_WORDS)} (comma-separated), or unset it")
    return words


def hidden_flags() -> frozenset[str]:
    """The ISA flags the switch hides now."""
    out: frozenset[str] = frozenset()
    for word in hidden_words():
        out |= HIDE_WORDS[word]
    return out


@functools.lru_cache(maxsize=1)
def raw_flags() -> frozenset[str]:
    """The flags (x86) or features (arm64) line of /proc/cpuinfo; empty where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip().lower() in ("flags", "features"):
                return frozenset(value.split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The CPU's flags as this package sees them: /proc/cpuinfo minus what :data:`HIDE_ENV` hides."""
    return raw_flags() - hidden_flags()


def bf16_hidden() -> bool:
    """Whether the switch hides bf16 (then no runtime may be asked for bf16 or fp16 kernels)."""
    return "bf16" in hidden_words()


def bf16_kernels() -> str | None:
    """Which bf16 kernels this CPU runs: "amx", "avx512_bf16", or None (no native bf16 seen)."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return None


def int8_kernels() -> str:
    """Which int8 dot products this CPU runs: "amx", "vnni" (AVX512_VNNI / AVX-VNNI) or "avx2"/"other"."""
    flags = cpu_flags()
    if "amx_int8" in flags:
        return "amx"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


def cpu_summary() -> dict[str, Any]:
    """The facts every reduced-precision result is tied to: ISA flags seen, what the switch hides, and the
    bf16 and int8 kernels they give."""
    return {"isa": [f for f in ISA_FLAGS if f in cpu_flags()], "hidden": sorted(hidden_words()),
            "bf16_kernels": bf16_kernels(), "int8_kernels": int8_kernels()}
