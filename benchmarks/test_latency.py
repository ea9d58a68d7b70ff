"""Latency (pytest-benchmark) and peak memory (fresh process, in ``extra_info``) per backend x scale x
device, for the model alone and end to end (decode -> preprocess -> model -> post-process [-> CRF]).

Groups: ``model-{device}-{scale}``, ``e2e-{device}-{scale}`` and ``e2e-crf-{device}-{scale}``, so
pytest-benchmark compares the backends within one group. CUDA cases are skipped without a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from unet_deploy.bench import BENCH_BACKENDS, DEFAULT_SCALES, end_to_end

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _record(benchmark: Any, bench_session: Any, backend: Any, name: str, device: str, mode: str,
            scale: float) -> dict[str, Any]:
    mem = bench_session.memory(name, device, mode, scale)
    path = bench_session.files.paths[name]
    benchmark.extra_info.update(bench_session.describe())
    benchmark.extra_info.update({
        "backend": name, "mode": mode, "device": device, "scale": scale, "precision": backend.precision,
        "provider": backend.provider, "peak_mib": mem["peak_mib"], "memory_method": mem["memory_method"],
        "host_peak_mib": mem["host_peak_mib"], "file_mb": path.stat().st_size / 1e6,
    })
    return mem


@pytest.mark.bench
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", DEFAULT_SCALES)
@pytest.mark.parametrize("name", BENCH_BACKENDS)
def test_model_latency(benchmark: Any, bench_session: Any, name: str, scale: float, device: str) -> None:
    """The network alone: preprocessed float32 batch in, logits out."""
    backend = bench_session.backend(name, device)
    batch = bench_session.batch(scale)
    warmup, rounds = bench_session.counts(device)
    benchmark.group = f"model-{device}-{scale:g}"

    def call() -> torch.Tensor:
        out = backend(batch)
        _sync(device)
        return out

    logits = benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    mem = _record(benchmark, bench_session, backend, name, device, "model", scale)
    benchmark.extra_info["input"] = f"{batch.shape[3]}x{batch.shape[2]}"
    assert tuple(logits.shape) == (1, 2, batch.shape[2], batch.shape[3])
    assert torch.isfinite(logits).all()
    assert mem["peak_mib"] > 0


@pytest.mark.bench
@pytest.mark.parametrize("crf", [False, pytest.param(True, marks=pytest.mark.crf)], ids=["plain", "crf"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", DEFAULT_SCALES)
@pytest.mark.parametrize("name", BENCH_BACKENDS)
def test_end_to_end_latency(benchmark: Any, bench_session: Any, name: str, scale: float, device: str,
                            crf: bool) -> None:
    """JPEG file -> decode -> preprocess -> model -> mask at the original size (-> dense CRF)."""
    if crf:
        pytest.importorskip("pydensecrf.densecrf", reason="dense CRF needs pydensecrf2")
    backend = bench_session.backend(name, device)
    warmup, rounds = bench_session.counts(device)
    mode = "e2e-crf" if crf else "e2e"
    benchmark.group = f"{mode}-{device}-{scale:g}"
    mask = benchmark.pedantic(end_to_end, args=(backend, bench_session.jpeg, scale),
                              kwargs={"crf": crf}, rounds=rounds, warmup_rounds=warmup, iterations=1)
    mem = _record(benchmark, bench_session, backend, name, device, mode, scale)
    height, width = bench_session.image.shape[:2]
    benchmark.extra_info["input"] = f"{int(width * scale)}x{int(height * scale)}"
    assert mask.shape == (height, width)
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) <= {0, 1}
    assert mem["peak_mib"] > 0
