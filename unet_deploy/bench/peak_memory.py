"""Peak-memory probes of one benchmark process: a sampling thread (host RSS, CUDA memory in use), the
kernel's resettable RSS high-water mark, ``ru_maxrss``, and the growth over a baseline they add up to."""

from __future__ import annotations

import resource
import sys
import threading
from typing import Any

import psutil
import torch

__all__ = ["MIB", "PeakSampler", "reset_peak_rss", "peak_rss_bytes", "maxrss_bytes", "memory_result"]

MIB = 1024 * 1024


class PeakSampler:
    """Samples host RSS (and CUDA memory in use) in a thread; ``peak_*`` are the maxima seen."""

    def __init__(self, cuda_device: str | None, interval: float = 0.005):
        self._proc = psutil.Process()
        self._cuda = cuda_device
        self._interval = interval
        self._stop = threading.Event()
        self.peak_rss = self._proc.memory_info().rss
        self.peak_device = self._device_used() if cuda_device else 0
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _device_used(self) -> int:
        free, total = torch.cuda.mem_get_info(self._cuda)
        return int(total - free)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self._cuda:
            self.peak_device = max(self.peak_device, self._device_used())

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``VmHWM``) to its current RSS, so a later
    :func:`peak_rss_bytes` is the exact peak since now, whatever the imports before reached. False where
    the kernel does not offer it (then peaks come from sampling and ``ru_maxrss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return peak_rss_bytes() is not None
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The peak RSS (``VmHWM``) since the process started or since :func:`reset_peak_rss`; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def maxrss_bytes() -> int:
    """This process's lifetime peak RSS (``ru_maxrss``) in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_result(device: str, sampler: PeakSampler, base: dict[str, Any]) -> dict[str, Any]:
    """Peak memory growth over the process baseline ``base`` (rss, maxrss, exact, device)."""
    peak_rss = sampler.peak_rss
    maxrss = maxrss_bytes()
    if maxrss > base["maxrss"]:  # a new lifetime peak after the baseline: exact, even between samples
        peak_rss = max(peak_rss, maxrss)
    hwm = peak_rss_bytes() if base["exact"] else None
    if hwm is not None:  # exact: the kernel's high-water mark since the baseline
        peak_rss = max(peak_rss, hwm)
    result: dict[str, Any] = {"host_peak_mib": max(peak_rss - base["rss"], 0) / MIB,
                              "host_baseline_mib": base["rss"] / MIB}
    if device.startswith("cuda"):
        reserved = torch.cuda.max_memory_reserved(device)
        result["device_peak_mib"] = max(sampler.peak_device - base["device"], reserved, 0) / MIB
        result["torch_peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        result["peak_mib"] = result["device_peak_mib"]
        result["memory_method"] = "CUDA device memory in use, growth over the process baseline"
    else:
        result["peak_mib"] = result["host_peak_mib"]
        result["memory_method"] = ("peak RSS growth over a fresh process's baseline after imports"
                                   + (" (kernel high-water mark, reset at the baseline)" if hwm is not None
                                      else " (sampled every 5 ms and ru_maxrss)"))
    return result
