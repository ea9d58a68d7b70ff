"""What one CPU core can do per cycle at each precision: the microarchitecture from /proc/cpuinfo, a small
table of per-cycle throughputs, and (for CPUs not in the table) a rule from the ISA flags.

Per-core, per-cycle operations (one multiply-add = 2 operations), the figures behind every theoretical peak:

* fp32: FMA pipes x vector lanes x 2.
* bf16: the rate of the widest bf16 dot-product instruction the core has (AVX512_BF16 ``VDPBF16PS``, AMX
  ``TDPBF16PS``); a core without one converts bf16 to fp32 and computes at the fp32 rate.
* int8: the rate of the u8 x s8 dot product (``VPDPBUSD`` with AVX512_VNNI / AVX-VNNI, AMX ``TDPBUSD``);
  without VNNI, AVX2's ``VPMADDUBSW`` + ``VPMADDWD`` pair takes two multiply-pipe instructions per 32 (256-bit)
  multiply-adds, so 64 operations per cycle on a core with two such pipes.

The table's numbers are capped by what the flags the OS shows enable (a hypervisor that hides AVX-512 from a
Zen 4 guest leaves it the AVX2 rates), and ``source`` says whether a number came from the table or the flags.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unet_deploy.runtime.cpu_features import hidden_flags

__all__ = ["CpuId", "UARCH_TABLE", "PRECISIONS", "read_cpu", "per_cycle", "from_flags", "name_by_flags",
           "theoretical_peaks"]

PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class CpuId:
    """The facts of /proc/cpuinfo that pick a row of :data:`UARCH_TABLE`."""

    vendor: str = ""
    family: int | None = None
    model: int | None = None
    model_name: str = ""
    arch: str = ""
    flags: frozenset[str] = field(default_factory=frozenset)


#: (vendor, family, (first model, last model), name, fp32, bf16, int8 operations per core per cycle). Sources:
#: AMD's Software Optimization Guides for family 19h (Zen 3, Zen 4) and 1Ah (Zen 5): two 256-bit FMA pipes
#: on Zen 3 and Zen 4 (Zen 4 runs a 512-bit instruction as two 256-bit halves), two 512-bit FMA pipes on
#: Zen 5 desktop/server parts (mobile Zen 5 halves them; those come out high here); Zen 4's AVX512_BF16 and
#: AVX512_VNNI at two 256-bit halves per cycle: 64 bf16, 128 int8. Zen 3 has neither: bf16 at the fp32
#: rate, int8 by VPMADDUBSW + VPMADDWD on its two integer-multiply pipes (64). Intel: Sapphire/Emerald/
#: Granite Rapids, two 512-bit FMA units per core (64 fp32) and AMX (1024 bf16, 2048 int8 operations per
#: cycle, Intel's Architecture Day 2021 figures); Ice Lake-SP: two 512-bit FMA units, AVX512_VNNI (256 int8),
#: no bf16.
UARCH_TABLE: tuple[tuple[str, int, tuple[int, int], str, int, int, int], ...] = (
    ("AuthenticAMD", 0x19, (0x00, 0x0F), "Zen 3", 32, 32, 64),
    ("AuthenticAMD", 0x19, (0x20, 0x5F), "Zen 3", 32, 32, 64),
    ("AuthenticAMD", 0x19, (0x10, 0x1F), "Zen 4", 32, 64, 128),
    ("AuthenticAMD", 0x19, (0x60, 0x7F), "Zen 4", 32, 64, 128),
    ("AuthenticAMD", 0x19, (0xA0, 0xAF), "Zen 4", 32, 64, 128),
    ("AuthenticAMD", 0x1A, (0x00, 0xFF), "Zen 5", 64, 128, 256),
    ("GenuineIntel", 6, (0x8F, 0x8F), "Sapphire Rapids", 64, 1024, 2048),
    ("GenuineIntel", 6, (0xCF, 0xCF), "Emerald Rapids", 64, 1024, 2048),
    ("GenuineIntel", 6, (0xAD, 0xAE), "Granite Rapids", 64, 1024, 2048),
    ("GenuineIntel", 6, (0x6A, 0x6C), "Ice Lake-SP", 64, 64, 256),
)


def read_cpu(text: str | None = None) -> CpuId:
    """Parse /proc/cpuinfo (or ``text``, e.g. a test's sample); unknown fields stay empty."""
    sample = text is not None
    if text is None:
        text = ""
        with contextlib.suppress(OSError):
            text = Path("/proc/cpuinfo").read_text()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() and fields:
            break  # the first processor's block is enough
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())

    def number(key: str) -> int | None:
        with contextlib.suppress(KeyError, ValueError):
            return int(fields[key], 0)
        return None

    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())  # x86 / arm64
    arch = ("aarch64" if "features" in fields else "x86_64") if sample else platform.machine().lower()
    if not sample:
        flags -= hidden_flags()  # UNET_DEPLOY_CPU_HIDE: the roofline sees the CPU the switch leaves
    return CpuId(vendor=fields.get("vendor_id", ""), family=number("cpu family"), model=number("model"),
                 model_name=fields.get("model name", ""), arch=arch, flags=flags)


def from_flags(cpu: CpuId) -> dict[str, int] | None:
    """Per-cycle operations the ISA flags allow (an upper bound: assumes two FMA pipes at the widest vector
    width, as server parts have), or None where the flags say nothing known."""
    f = cpu.flags
    if "avx512f" in f:
        return {"fp32": 64, "bf16": 1024 if "amx_bf16" in f else 128 if "avx512_bf16" in f else 64,
                "int8": 2048 if "amx_int8" in f else 256 if "avx512_vnni" in f else 128}
    if "avx2" in f and "fma" in f:
        return {"fp32": 32, "bf16": 32, "int8": 128 if "avx_vnni" in f else 64}
    if "avx" in f:  # one 256-bit multiply and one add per cycle, no 256-bit integer ops
        return {"fp32": 16, "bf16": 16, "int8": 32}
    if "asimd" in f:  # arm64: two 128-bit FMA pipes
        return {"fp32": 16, "bf16": 32 if "bf16" in f else 16, "int8": 64 if "asimddp" in f else 32}
    if "sse2" in f:
        return {"fp32": 8, "bf16": 8, "int8": 16}
    return None


def name_by_flags(cpu: CpuId) -> str:
    """A name for a CPU the table does not know (a VM may report a made-up model number), from the vector
    units its flags show, e.g. "unknown model, AMX" -- the flags, not the model, decide the peaks."""
    f = cpu.flags
    if "amx_bf16" in f or "amx_int8" in f:
        units = "AMX"
    elif "avx512f" in f:
        extra = [name for flag, name in (("avx512_bf16", "BF16"), ("avx512_vnni", "VNNI")) if flag in f]
        units = "AVX-512" + (f" {'/'.join(extra)}" if extra else "")
    elif "avx2" in f:
        units = "AVX2" + (" + AVX-VNNI" if "avx_vnni" in f else "")
    else:
        units = "asimd" if "asimd" in f else "scalar"
    return f"unknown model, {units}"


def per_cycle(cpu: CpuId) -> dict[str, Any]:
    """``{"uarch", "source", "fp32", "bf16", "int8", "capped"}``: the table's row for ``cpu``, each number
    capped by :func:`from_flags` (``capped`` lists those), or the flags' numbers alone (``source`` "flags");
    numbers are None when neither knows the CPU."""
    flags = from_flags(cpu)
    for vendor, family, (lo, hi), name, *ops in UARCH_TABLE:
        if cpu.vendor == vendor and cpu.family == family and cpu.model is not None and lo <= cpu.model <= hi:
            row = dict(zip(PRECISIONS, ops, strict=True))
            limit = dict(flags or row)
            if not cpu.flags & {"avx512_bf16", "amx_bf16", "bf16"}:  # no bf16 dot product shown: the fp32 rate
                limit["bf16"] = min(limit["bf16"], row["fp32"], limit["fp32"])
            capped = [p for p in PRECISIONS if limit[p] < row[p]]
            row.update({p: limit[p] for p in capped})
            return {"uarch": name, "source": "table", **row, "capped": capped}
    if flags is not None:
        return {"uarch": name_by_flags(cpu), "source": "flags", **flags, "capped": []}
    return {"uarch": "unknown", "source": "unknown", "fp32": None, "bf16": None, "int8": None, "capped": []}


def theoretical_peaks(ops: dict[str, Any], ghz: float | None, cores: int) -> dict[str, float | None]:
    """Peak G(FL)OP/s per precision: per-cycle operations x clock (GHz) x cores."""
    return {p: (ops[p] * ghz * cores if ops.get(p) and ghz else None) for p in PRECISIONS}
