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
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from unet_deploy.runtime.registry import spec

__all__ = ["affinity_cpus", "usable_cpus", "cgroup_cpu_quota", "process_share", "share_cores", "limit_torch_threads",
           "thread_report", "CpuSample", "cpu_sample", "IMPORTED", "free_cpus_since", "WaitChoice", "wait_choice",
           "too_few_free", "processes_would_help",
           "passive_threads_when_busy"]

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


@dataclass(frozen=True)
class CpuSample:
    """A reading of the clocks that tell how busy the machine is: the wall clock, the CPU time of this process
    and of its finished child processes, and the idle time of the CPUs it may run on (``/proc/stat``), all in
    seconds."""

    wall: float
    own: float
    idle: float


def cpu_sample() -> CpuSample | None:
    """The clocks now; None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        allowed = {f"cpu{n}" for n in os.sched_getaffinity(0)}
        lines = Path("/proc/stat").read_text().splitlines()
    except (OSError, AttributeError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = sum(int(f[4]) + int(f[5]) for f in (line.split() for line in lines) if f and f[0] in allowed)
    own = os.times()
    return CpuSample(time.monotonic(), own.user + own.system + own.children_user + own.children_system, idle / tick)


def free_cpus_since(start: CpuSample | None, window_s: float = 0.1) -> float | None:
    """How many CPUs other processes left to this one since ``start`` (idle time plus the CPU time of this
    process and its finished children, per second of wall time), waiting until ``window_s`` has passed; None
    where the clocks cannot be read."""
    if start is None:
        return None
    time.sleep(max(0.0, start.wall + window_s - time.monotonic()))
    now = cpu_sample()
    if now is None or now.wall <= start.wall:
        return None
    return ((now.idle - start.idle) + (now.own - start.own)) / (now.wall - start.wall)


#: The clocks when this module was imported (the CLI imports it first): the CLI's own start-up is the window
#: in which it reads how busy the machine is, at no cost.
IMPORTED = cpu_sample()


def too_few_free(free: float, need: int) -> bool:
    """The busy rule: other processes left fewer CPUs ``free`` than ``need`` (the threads to run), less 0.5."""
    return free < need - 0.5


@dataclass(frozen=True)
class WaitChoice:
    """What :func:`passive_threads_when_busy` read and chose: the CPUs other processes left ``free`` (None: no
    reading), the threads this process needs, whether idle OpenMP threads sleep, and whether the user set
    the policy."""

    free: float | None
    need: int
    usable: int
    passive: bool
    user_set: bool

    @property
    def busy(self) -> bool:
        return self.free is not None and too_few_free(self.free, self.need)

    def line(self) -> str:
        seen = "no reading of the CPUs' idle time" if self.free is None else (
            f"{self.free:.1f} of {self.usable} CPUs free at start")
        return (f"idle OpenMP threads {'sleep' if self.passive else 'spin briefly'} "
                f"({'OMP_WAIT_POLICY set' if self.user_set else seen})")


_CHOICE: list[WaitChoice] = []  # the last choice, for --verbose and wait_choice()


def passive_threads_when_busy(start: CpuSample | None = None) -> bool:
    """On a busy machine, make OpenMP's idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``, inherited by child
    processes) instead of spinning at every barrier: spinning threads of several jobs take each other's time
    slices (measured in ``benchmarks/train-threads.json``, explained in ``docs/threads.md``).

    Busy means other processes left fewer CPUs free than this process's threads need, less 0.5 (its share of
    :func:`usable_cpus`: all of them, or under torchrun a ``LOCAL_WORLD_SIZE``-th, as its sibling ranks start
    at the same moment), between ``start`` (taken when the CLI was imported) and now (at least 0.1 s): a
    reading of the moment, unlike the load average, which takes a minute to rise and stays up after a job
    ends. On a quiet machine the idle threads spin briefly (libgomp's default), which is faster for small
    layers. Must run before torch is imported; a policy the user set is kept. Returns whether the passive
    policy is in effect."""
    free = free_cpus_since(start if start is not None else cpu_sample())
    usable = usable_cpus()
    need = process_share(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), usable)  # torchrun: this rank's share
    user_set = "OMP_WAIT_POLICY" in os.environ
    if not user_set and free is not None and too_few_free(free, need):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    _CHOICE[:] = [WaitChoice(free, need, usable, passive, user_set)]
    return passive


def wait_choice() -> WaitChoice:
    """The last :func:`passive_threads_when_busy` choice (made now, over 0.1 s, if none was made)."""
    if not _CHOICE:
        passive_threads_when_busy()
    return _CHOICE[0]


def processes_would_help() -> bool:
    """Whether training in processes of one thread beats one process of threads here: 2 or more usable CPUs
    that other jobs keep busy (``benchmarks/train-threads.json``; quiet, both are as fast)."""
    return usable_cpus() >= 2 and wait_choice().busy


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
    parts.append(f"torch / ONNX Runtime / OpenVINO intra-op {share}")
    parts.append(f"{wait_choice().line()}, ONNX Runtime's sleep")
    if crf_workers is not None:
        parts.append(f"CRF workers {crf_workers}")
    return "; ".join(parts)
