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

__all__ = ["usable_cpus", "cgroup_cpu_quota", "process_share", "share_cores"]

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``cpu.max`` "200000 100000" -> 2.0), or None without
    one (no cgroup file, or "max")."""
    for quota_file, period_file in (("cpu.max", None), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            text = (root / quota_file).read_text().split()
            if period_file is not None:
                text += (root / period_file).read_text().split()
        except (OSError, ValueError):
            continue
        if len(text) >= 2 and text[0] not in ("max", "-1"):
            try:
                return max(0.01, int(text[0]) / int(text[1]))
            except (ValueError, ZeroDivisionError):
                return None
        return None
    return None


def usable_cpus() -> int:
    """The CPUs this process may really use: affinity, the cgroup quota (rounded up) and the physical cores."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        allowed = min(allowed, math.ceil(quota))
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, physical))


def process_share(processes: int) -> int:
    """Each of ``processes`` processes' share of :func:`usable_cpus` (at least 1)."""
    return max(1, usable_cpus() // max(1, processes))


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
