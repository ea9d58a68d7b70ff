"""How many CPU threads a process may use, and each process's share when several run a model on one machine
(``predict --nproc N``, ``serve --workers N``).

The CPUs a process may really use are the fewest of: the CPUs it is allowed to run on (affinity, as ``taskset``
and container runtimes set it), the cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1:
a container limited to 2 CPUs on a 64-core host), and the physical cores (hyper-threads share one core's vector
units). ``os.cpu_count()`` sees the host and is not used alone.

A backend whose registry entry ``takes_threads`` (ONNX Runtime, OpenVINO) gets its share as its ``threads``
option; the others run on torch's intra-op pool, which is set for the process (:func:`share_cores`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import psutil

from unet_deploy.runtime.registry import spec

__all__ = ["affinity_cpus", "usable_cpus", "cgroup_cpu_quota", "process_share", "share_cores", "limit_torch_threads",
           "thread_report", "passive_threads_when_busy"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(root: Path) -> list[Path]:
    """Folders that may hold this process's CPU quota: its own cgroup (v2 unified, or v1's cpu controller) and
    every parent up to the mount, then ``root`` itself."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers and "cpu" not in controllers.split(","):
            continue
        base = root if not controllers else (root / "cpu" if (root / "cpu").is_dir() else root / controllers)
        here = base / path.lstrip("/")
        while here != base and base in here.parents:
            dirs.append(here)
            here = here.parent
        dirs.append(base)
    return [*dirs, root]


def _quota_in(folder: Path) -> float | None:
    """The quota a cgroup folder sets, in CPUs (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``/``period``), or None."""
    for quota_file, period_file in (("cpu.max", None), ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
                                    ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = (folder / quota_file).read_text().split()
            if period_file is not None:
                text += (folder / period_file).read_text().split()
            quota, period = int(text[0]), int(text[1])
        except (OSError, ValueError, IndexError):  # no such file, or "max": no quota here
            continue
        return max(0.01, quota / period) if quota > 0 and period > 0 else None
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The tightest CPU quota over this process's cgroup and its parents, in CPUs (``cpu.max`` "200000 100000"
    -> 2.0), or None without one."""
    quotas = [q for q in (_quota_in(d) for d in dict.fromkeys(_cgroup_dirs(root))) if q is not None]
    return min(quotas) if quotas else None


def affinity_cpus() -> int:
    """The CPUs this process may be scheduled on (its affinity; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _usable(allowed: int, quota: float | None) -> int:
    if quota is not None:
        allowed = min(allowed, math.ceil(quota))
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, physical))


def usable_cpus() -> int:
    """The CPUs this process may really use: affinity, the cgroup quota (rounded up) and the physical cores."""
    return _usable(affinity_cpus(), cgroup_cpu_quota())


def process_share(processes: int, usable: int | None = None) -> int:
    """Each of ``processes`` processes' share of ``usable`` CPUs (default :func:`usable_cpus`), at least 1."""
    return max(1, (usable_cpus() if usable is None else usable) // max(1, processes))


def share_cores(backend: str, device: str, processes: int, threads: int | None) -> int | None:
    """The ``threads`` option for one of ``processes`` processes running ``backend`` on ``device``.

    Args:
        backend: the ``--backend`` name.
        device: ``cpu`` or ``cuda[:N]`` (a GPU process keeps its defaults).
        processes: processes on this machine running a model at once.
        threads: ``--threads`` as given (None: not given).

    Returns:
        ``threads`` when given or when one process runs; else this process's share of the cores for a backend
        that takes threads, or None after setting torch's intra-op threads to that share (eager torch,
        TorchScript).
    """
    if threads is not None or processes <= 1 or device.startswith("cuda"):
        return threads
    share = process_share(processes)
    if spec(backend).takes_threads:
        return share
    import torch

    torch.set_num_threads(share)
    return None


def passive_threads_when_busy() -> bool:
    """On a busy machine (1-minute load average at or above the usable CPUs), make OpenMP's idle threads sleep
    (``OMP_WAIT_POLICY=PASSIVE``, inherited by child processes) instead of spinning at every barrier: spinning
    threads of several jobs take each other's time slices. Must run before torch is imported; a policy the user
    set is kept. Returns whether the passive policy is in effect."""
    if "OMP_WAIT_POLICY" not in os.environ and hasattr(os, "getloadavg") and os.getloadavg()[0] >= usable_cpus():
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def limit_torch_threads() -> int:
    """Keep torch's intra-op pool within the CPUs this process may use (torch counts the host's cores, not a
    container's quota); a thread count the user set (``OMP_NUM_THREADS``, ``torch.set_num_threads``) below
    that is kept. Returns the count in use."""
    import torch

    usable = usable_cpus()
    if torch.get_num_threads() > usable:
        torch.set_num_threads(usable)
    return int(torch.get_num_threads())


def thread_report(processes: int = 1, crf_workers: int | None = None) -> str:
    """One line saying which CPUs this process may use and the thread counts it chose (``--verbose``)."""
    allowed, quota = affinity_cpus(), cgroup_cpu_quota()  # read once: the line shows what the count comes from
    usable = _usable(allowed, quota)
    share = process_share(processes, usable)
    parts = [f"threads: {usable} usable CPU(s) (affinity {allowed} of {os.cpu_count()}, cgroup quota "
             f"{'none' if quota is None else f'{quota:g}'}, {psutil.cpu_count(logical=False)} physical cores)"]
    if processes > 1:
        parts.append(f"{processes} processes, {share} each")
    sleeping = "idle OpenMP and ONNX Runtime threads sleep" if passive_threads_when_busy() else (
        "idle ONNX Runtime threads sleep, OpenMP's spin briefly (machine not busy)")
    parts.append(f"torch / ONNX Runtime / OpenVINO intra-op {share} ({sleeping})")
    if crf_workers is not None:
        parts.append(f"CRF workers {crf_workers}")
    return "; ".join(parts)
