"""The machine a benchmark ran on (CPU, cores, RAM, GPU, library versions, load average) and whether it was
quiet enough to trust the timings (busy machine, unsteady cases)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import psutil
import torch

from unet_deploy.bench.uarch import per_cycle, read_cpu
from unet_deploy.bench.variants import variant_label
from unet_deploy.config import versions
from unet_deploy.runtime.cpu_features import cpu_summary
from unet_deploy.runtime.cpu_share import affinity_cpus, cgroup_cpu_quota, too_few_free

__all__ = ["UNSTEADY_SPREAD", "VECTOR_FLAGS", "cpu_model", "cpu_identity", "load_average_1m", "machine_facts",
           "unsteady", "reliability", "reliability_notes"]

#: A case whose p90 is more than this times its p50 had unsteady timings (other work got in the way).
UNSTEADY_SPREAD = 1.25


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


#: The ISA flags that decide a core's per-cycle throughput (see :mod:`.uarch`).
VECTOR_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8",
                "asimd", "asimddp", "bf16")


def cpu_identity() -> dict[str, Any]:
    """Vendor, family, model, microarchitecture and vector ISA flags (the CPU model name of a VM often says
    only "AMD EPYC"; these say which core it is)."""
    cpu = read_cpu()
    return {"vendor": cpu.vendor, "family": cpu.family, "model": cpu.model, "uarch": per_cycle(cpu)["uarch"],
            "vector_flags": [f for f in VECTOR_FLAGS if f in cpu.flags]}


def load_average_1m() -> float | None:
    """The 1-minute load average, rounded to 0.01; None where the platform has none."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine_facts(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, RAM, GPU, library versions and ONNX Runtime providers of this machine."""
    usable = affinity_cpus()
    facts: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_id": cpu_identity(), "cpu_features": cpu_summary(), "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False), "cores_usable": usable, "cpu_quota": cgroup_cpu_quota(),
        "ram_gib": round(psutil.virtual_memory().total / 1024 ** 3, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "versions": versions(), "gpu": None,
        "load_avg_1m": load_average_1m(),
        "cuda": torch.version.cuda, "hostname_hash": hashlib.sha256(platform.node().encode()).hexdigest()[:8],
    }
    with contextlib.suppress(ImportError):
        import onnxruntime as ort

        facts["ort_providers"] = ort.get_available_providers()
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        props = torch.cuda.get_device_properties(index)
        facts["gpu"] = props.name
        facts["gpu_memory_gib"] = round(props.total_memory / 1024 ** 3, 1)
    return facts


def unsteady(case: dict[str, Any]) -> bool:
    """True when the case's p90/p50 is above :data:`UNSTEADY_SPREAD`."""
    lat = case.get("latency") or {}
    p50, p90 = lat.get("p50_ms"), lat.get("p90_ms")
    if not p50 or not p90:
        return False
    return bool(p90 / p50 > UNSTEADY_SPREAD)


def _busy(report: dict[str, Any], cores: int) -> tuple[bool, float | None, float | None]:
    """(busy, free CPUs, peak load): busy when other processes left fewer than ``usable - 0.5`` CPUs free over
    the run (``cpu_free``, read from the CPUs' idle time); without that reading, when the 1-minute load average
    at the start or end was above the cores (it lags: it stays up for a minute after a job ends)."""
    load = report.get("load_avg") or {}
    seen = [x for x in (load.get("start"), load.get("end"), (report.get("machine") or {}).get("load_avg_1m"))
            if x is not None]
    peak = max(seen) if seen else None
    reading = report.get("cpu_free") or {}
    if reading.get("free") is not None:
        return too_few_free(reading["free"], reading["usable"]), reading["free"], peak
    return peak is not None and peak > cores, None, peak


def reliability(report: dict[str, Any]) -> dict[str, Any]:
    """Was the machine quiet enough to trust the ratios? ``busy``: other processes took the CPUs during the run
    (:func:`_busy`); ``unsteady``: the cases with p90/p50 above :data:`UNSTEADY_SPREAD`; ``reliable``:
    neither."""
    m = report.get("machine") or {}
    cores = (report.get("cpu_free") or {}).get("usable") or m.get("cores_usable") or m.get("cores_logical") \
        or os.cpu_count() or 1
    busy, free, peak = _busy(report, cores)
    shaky = [{"backend": c["backend"], "scale": c["scale"],
              "spread": c["latency"]["p90_ms"] / c["latency"]["p50_ms"]} for c in report["cases"] if unsteady(c)]
    return {"busy": busy, "free_cpus": free, "load": peak, "cores": cores, "spread_limit": UNSTEADY_SPREAD,
            "unsteady": shaky, "reliable": not busy and not shaky}


def reliability_notes(report: dict[str, Any]) -> list[str]:
    """Footnote lines for the ``?`` marks: why this run's timings and ratios are not to be trusted."""
    r = reliability(report)
    out = []
    if r["busy"]:
        why = (f"other processes left {r['free_cpus']:.1f} of {r['cores']} CPUs free" if r["free_cpus"] is not None
               else f"load {r['load']:.1f} on {r['cores']} cores")
        out.append(f"? machine busy ({why}): ratios unreliable, rerun on a quiet machine")
    if r["unsteady"]:
        cases = ", ".join(f"{variant_label(c['backend'])} at {c['scale']:g} ({c['spread']:.2f}x)"
                          for c in r["unsteady"])
        out.append(f"? unsteady timings, p90/p50 above {UNSTEADY_SPREAD:g}: {cases}; their rows and ratios are "
                   "unreliable, rerun with more --runs on a quiet machine")
    return out
