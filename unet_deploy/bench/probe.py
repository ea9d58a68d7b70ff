"""One benchmark case (a backend x input): measured in this process (:func:`run_case`) or in a fresh one
(:func:`run_case_isolated`, which runs :mod:`unet_deploy.bench.worker`) so backends do not share allocator
caches, thread pools or imported libraries.

The process records its resident memory after imports, loads the backend, warms up while a thread samples
memory, then times ``runs`` calls (CUDA is synchronised around each call).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from unet_deploy import runtime as backends
from unet_deploy.bench.inputs import end_to_end
from unet_deploy.bench.isolated import run_in_fresh_process
from unet_deploy.bench.peak_memory import PeakSampler, maxrss_bytes, memory_result, reset_peak_rss
from unet_deploy.bench.variants import Variant, parse_variant
from unet_deploy.runtime.registry import REGISTRY

__all__ = ["WORKER_MODULE", "CaseSpec", "images_per_s", "latency_stats", "load_variant", "run_case",
           "run_case_isolated"]

#: The module a fresh case process runs (``python -m``).
WORKER_MODULE = "unet_deploy.bench.worker"


@dataclass(frozen=True, kw_only=True)
class CaseSpec:
    """One backend x input measurement. ``input`` is a .npy float32 NCHW batch (mode "model") or an image
    file (modes "e2e" and "e2e-crf", with ``scale``). ``runs=0`` measures memory only."""

    backend: str
    model_path: str
    device: str
    input: str
    scale: float = 1.0
    mode: str = "model"
    runs: int = 3
    warmup: int = 1
    threads: int | None = None
    logits_out: str | None = None  # save the first output's logits here (.npy), for parity
    variant: str | None = None  # e.g. "torch-bf16-cl": precision and fast-path options of the backend


def images_per_s(ms: float, batch: int = 1) -> float:
    """Images per second of a call taking ``ms`` milliseconds on ``batch`` images."""
    return 1000.0 * batch / ms if ms > 0 else float("inf")


def latency_stats(times_s: Sequence[float], batch: int = 1) -> dict[str, Any]:
    """p50/p90/mean/min/max in milliseconds; images per second at the median (``images_per_s`` =
    1000 / p50 x batch, the number the table shows) and at the mean (``images_per_s_mean``)."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    mean, p50 = float(ms.mean()), float(np.percentile(ms, 50))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "mean_ms": mean,
            "min_ms": float(ms.min()), "max_ms": float(ms.max()), "runs": len(ms), "batch": batch,
            "images_per_s": images_per_s(p50, batch), "images_per_s_mean": images_per_s(mean, batch),
            "times_ms": [float(t) for t in ms]}


def load_variant(model_path: str | Path, v: Variant, device: str, threads: int | None) -> Any:
    """Load the model file as variant ``v`` (its runtime, precision and fast-path options); ``threads`` are
    ONNX Runtime's (torch's are set for the whole process)."""
    return backends.load_backend(model_path, v.backend, device, v.options(threads))


def run_case(spec: CaseSpec) -> dict[str, Any]:
    """Measure one case in THIS process: memory growth over the current baseline, then latency.

    Memory numbers are only meaningful in a fresh process (see :func:`run_case_isolated`); the baseline is
    taken here, after the heavy imports. Exactly ``spec.warmup`` untimed calls run before the ``spec.runs``
    timed ones (with no warm-up, the first timed call also supplies the parity logits).
    """
    cuda = spec.device.startswith("cuda")
    _prepare_baseline(spec, cuda)
    batch = _load_batch(spec)
    base = {"rss": psutil.Process().memory_info().rss, "maxrss": maxrss_bytes(),
            "exact": not cuda and reset_peak_rss()}  # the import-time peak must not hide the model's

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(spec.device)

    def once() -> Any:
        if spec.mode == "model":
            return backend(batch)
        return end_to_end(backend, spec.input, spec.scale, crf=spec.mode == "e2e-crf")

    with PeakSampler(spec.device if cuda else None) as sampler:
        base["device"] = sampler.peak_device
        t0 = time.perf_counter()
        backend = load_variant(spec.model_path, parse_variant(spec.variant or spec.backend), spec.device,
                               spec.threads)
        load_s = time.perf_counter() - t0
        sampler.sample()
        for i in range(spec.warmup):
            out = once()
            sync()
            if i == 0:
                _save_logits(spec, out)
    # Timed runs (memory sampling stopped, so it cannot disturb them); ru_maxrss still sees any peak.
    times = _timed_runs(spec, once, sync)
    sampler.sample()  # memory still held after the runs (e.g. an arena grown by an unwarmed first call)
    result = {"backend": spec.variant or spec.backend, "runtime": spec.backend, "mode": spec.mode,
              "device": spec.device, "scale": spec.scale, "precision": backend.precision,
              "provider": backend.provider, "load_s": load_s, "warmup_calls": spec.warmup,
              **memory_result(spec.device, sampler, base)}
    if spec.runs:
        result["latency"] = latency_stats(times, int(batch.shape[0]) if spec.mode == "model" else 1)
    return result


def _prepare_baseline(spec: CaseSpec, cuda: bool) -> None:
    """Import the runtime, set torch's threads and create the CUDA context before the memory baseline:
    they are part of the process, not of the model's memory."""
    importlib.import_module(REGISTRY[spec.backend].runtime_module)  # part of the process, not of the model
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if cuda:
        torch.zeros(1, device=spec.device)
        torch.cuda.synchronize(spec.device)
        torch.cuda.reset_peak_memory_stats(spec.device)


def _load_batch(spec: CaseSpec) -> Any:
    """The input batch of mode "model" (a .npy array); ``None`` for the end-to-end modes, which read
    ``spec.input`` as an image file on each call."""
    if spec.mode == "model":
        return np.load(spec.input)
    if spec.mode not in ("e2e", "e2e-crf"):
        raise ValueError(f"unknown benchmark mode {spec.mode!r}")
    return None


def _timed_runs(spec: CaseSpec, once: Callable[[], Any], sync: Callable[[], None]) -> list[float]:
    """Seconds of each of the ``spec.runs`` timed calls (with no warm-up the first one gives the logits)."""
    times: list[float] = []
    for i in range(spec.runs):
        sync()
        t0 = time.perf_counter()
        out = once()
        sync()
        times.append(time.perf_counter() - t0)
        if i == 0 and spec.warmup == 0:
            _save_logits(spec, out)
    return times


def _save_logits(spec: CaseSpec, out: Any) -> None:
    """The first model call's logits, for parity against eager (model mode only)."""
    if spec.logits_out and spec.mode == "model":
        np.save(spec.logits_out, out.detach().cpu().numpy())


def run_case_isolated(spec: CaseSpec, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run :func:`run_case` in a fresh ``python -m unet_deploy.bench.worker`` process and return its result."""
    return run_in_fresh_process(WORKER_MODULE, asdict(spec), f"benchmark case {spec.variant or spec.backend} "
                                f"scale {spec.scale:g}", timeout_s, "use fewer --runs or --quick")
