"""The CPU's real clock while the benchmark's cores are busy, timed rather than read.

Virtual machines often report only a base frequency ("AMD EPYC", ``cpu MHz: 2445``) while the cores run
boosted, so a peak computed from the reported MHz would be wrong by a third or more. :func:`measure_clock`
times a chain of *dependent* integer additions (``add rax, rdx`` repeated: each one needs the previous
result, and an integer add has a latency of one cycle on every x86-64 core since the first), so the chain
takes one cycle per addition and additions / seconds = cycles / second. The loop is a few bytes of
x86-64 machine code in an executable anonymous memory page, called through :mod:`ctypes` (which releases
the GIL, so one copy runs on each of the benchmark's threads at once: the all-core clock, not the
one-core boost). Each copy is timed by its thread's CPU time, so other processes that preempt it on a busy
machine do not lower the result (time stolen by a hypervisor still does). No compiler is needed at run time.

Where that cannot run (not x86-64, or the OS refuses a writable + executable page), the clock the OS
reports is used instead and labelled as such (``method``).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unet_deploy.runtime.cpu_share import affinity_cpus

__all__ = ["ADDS_PER_ITERATION", "measure_clock", "reported_ghz", "add_chain_code"]

#: Dependent additions per loop iteration (the loop's own ``dec``/``jnz`` run beside them, off the chain).
ADDS_PER_ITERATION = 200
MEASURED = "measured: dependent integer-add chain (x86-64 machine code), all benchmark threads busy"


def add_chain_code(adds: int = ADDS_PER_ITERATION) -> bytes:
    """``long f(long n)``: ``n`` iterations of ``adds`` dependent ``add rax, rdx`` (System V ABI: n in rdi)."""
    head = bytes.fromhex("4831c0" "ba01000000")  # xor rax, rax; mov edx, 1
    body = bytes.fromhex("4801d0") * adds  # add rax, rdx (x adds): one chain, one cycle each
    back = -(len(body) + 3 + 6)  # from the end of jnz back to the loop start
    tail = bytes.fromhex("48ffcf" "0f85") + back.to_bytes(4, "little", signed=True) + bytes.fromhex("c3")
    return head + body + tail  # dec rdi; jnz loop; ret


def _machine_code_ok() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and sys.platform.startswith(("linux", "darwin"))


def _time_add_chain(threads: int, iterations: int, repeats: int) -> list[float]:
    """GHz samples: ``repeats`` rounds of ``threads`` concurrent calls of the add chain, each timed alone.
    Raises OSError where the machine code cannot run here."""
    if not _machine_code_ok():
        raise OSError(f"no x86-64 machine code on {platform.machine()} / {sys.platform}")
    code = add_chain_code()
    page = mmap.mmap(-1, mmap.PAGESIZE * (1 + len(code) // mmap.PAGESIZE),
                     prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)  # OSError where W+X is refused
    try:
        page.write(code)
        anchor = ctypes.c_char.from_buffer(page)
        chain = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(ctypes.addressof(anchor))
        chain(1000)  # the first call faults the page in
        samples = []
        for _ in range(repeats):
            samples += _concurrent(chain, iterations, threads)
        del chain, anchor  # release the buffer export before the page is unmapped
    finally:
        page.close()
    return [ADDS_PER_ITERATION * iterations / s / 1e9 for s in samples]


def _concurrent(call: Callable[[int], Any], arg: int, threads: int) -> list[float]:
    """CPU seconds each of ``threads`` threads spent in one ``call(arg)``, all started together (CPU time,
    not wall time: on a busy machine the loop is preempted, but it only counts cycles while it runs)."""
    gate = threading.Barrier(threads)
    seconds = [0.0] * threads

    def run(i: int) -> None:
        gate.wait()
        t0 = time.thread_time()  # this thread's CPU time: other work sharing the core does not count
        call(arg)
        seconds[i] = time.thread_time() - t0

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return seconds


def reported_ghz() -> float | None:
    """The clock the OS reports (Linux: the mean ``cpu MHz`` of /proc/cpuinfo; else psutil), or None."""
    with contextlib.suppress(OSError, ValueError):
        mhz = [float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.lower().startswith("cpu mhz")]
        if mhz:
            return sum(mhz) / len(mhz) / 1e3
    with contextlib.suppress(Exception):
        import psutil

        freq = psutil.cpu_freq()
        if freq is not None and (freq.max or freq.current):
            return float(freq.max or freq.current) / 1e3
    return None


def measure_clock(threads: int | None = None, repeats: int = 5, sample_s: float = 0.04) -> dict[str, Any]:
    """The clock in GHz with ``threads`` cores busy (default: every usable core): the median of ``repeats``
    rounds of about ``sample_s`` each (well under a second in all), the method, and the reported clock.
    Falls back to the reported clock (``method`` says so) where the machine code cannot run."""
    if not threads:
        threads = affinity_cpus()
    reported = reported_ghz()
    try:
        probe = _time_add_chain(threads, 2000, 1)  # also wakes the cores up from idle
        iterations = max(1000, int(sample_s * max(probe) * 1e9 / ADDS_PER_ITERATION))
        samples = _time_add_chain(threads, iterations, repeats)
    except (OSError, ValueError, AttributeError, TypeError) as e:  # no W+X page, no ctypes/mmap support
        method = "reported by the OS (not measured: " + (str(e).splitlines() or ["machine code refused"])[0] + ")"
        return {"ghz": reported, "method": method, "measured": False, "reported_ghz": reported,
                "samples": [], "threads": threads}
    return {"ghz": statistics.median(samples), "method": MEASURED, "measured": True, "reported_ghz": reported,
            "samples": [round(s, 4) for s in samples], "threads": threads}
