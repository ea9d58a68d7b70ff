"""Fixtures for the pytest-benchmark suites: one model (and its TorchScript/ONNX exports) per session.

Full mode (default) benchmarks the seed-width U-Net (base 64) on a 1918x1280 Carvana-sized image at
scales 0.5 and 1.0 -- minutes on a small CPU. Quick mode (``--bench-quick`` or
``UNET_DEPLOY_BENCH_QUICK=1``) uses width 8 on a 240x160 image and finishes in a few minutes at most.
``--bench-threads N`` (or ``UNET_DEPLOY_BENCH_THREADS=N``) pins torch and ONNX Runtime to N threads: on a
busy shared machine torch's spinning worker threads otherwise make eager timings erratic.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest benchmarks/` imports this checkout's package
    sys.path.insert(0, str(ROOT))

from unet_deploy import bench  # noqa: E402

THREADS_ENV = "UNET_DEPLOY_BENCH_THREADS"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("unet-deploy benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help=f"Small width and image (also: {bench.QUICK_ENV}=1).")
    group.addoption("--bench-threads", type=int, default=None,
                    help=f"CPU threads for torch and ONNX Runtime (also: {THREADS_ENV}=N; default: theirs).")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: a latency/memory benchmark case")


def bench_threads(config: pytest.Config) -> int | None:
    value = config.getoption("--bench-threads", default=None) or os.environ.get(THREADS_ENV) or None
    if value is None:
        return None
    if int(value) < 1:
        raise pytest.UsageError(f"--bench-threads / {THREADS_ENV}: use 1 or more threads, got {value}")
    return int(value)


def is_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-quick", default=False)) or bench.quick_from_env()


class BenchSession:
    """Everything the cases share: settings, model files, inputs, loaded backends, memory results."""

    def __init__(self, quick: bool, folder: Path, threads: int | None = None):
        wanted = bench.BenchSettings(quick=quick, device="cpu", threads=threads)
        self.settings = bench.resolve_settings(wanted)
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.folder = folder
        self.files = bench.prepare_models(self.settings, folder / "models")
        width, height = self.settings.image_size or bench.CARVANA_SIZE
        self.image = bench.synthetic_image(width, height, self.settings.seed)
        self.jpeg = bench.write_jpeg(self.image, folder / "car.jpg")
        self._batches: dict[float, Path] = {}
        self._backends: dict[tuple[str, str], Any] = {}
        self._memory: dict[tuple[str, str, str, float], dict[str, Any]] = {}

    def counts(self, device: str) -> tuple[int, int]:
        """(warmup rounds, timed rounds) for ``device``."""
        s = bench.resolve_settings(replace(self.settings, device=device, runs=None, warmup=None))
        return int(s.warmup or 0), int(s.runs or 1)

    def batch_path(self, scale: float) -> Path:
        if scale not in self._batches:
            from unet_deploy.images.image_io import preprocess

            path = self.folder / f"input-{scale:g}.npy"
            np.save(path, preprocess(self.image, scale)[None])
            self._batches[scale] = path
        return self._batches[scale]

    def batch(self, scale: float) -> np.ndarray:
        return np.load(self.batch_path(scale))

    def backend(self, name: str, device: str) -> Any:
        from unet_deploy.runtime import load_backend

        key = (name, device)
        if key not in self._backends:
            threads = self.settings.threads if name == "ort" else None  # torch's are set per process
            self._backends[key] = load_backend(self.files.paths[name], name, device, threads=threads)
        return self._backends[key]

    def memory(self, name: str, device: str, mode: str, scale: float) -> dict[str, Any]:
        """Peak memory of one case, measured once in a fresh process (no timing there)."""
        key = (name, device, mode, scale)
        if key not in self._memory:
            source = self.batch_path(scale) if mode == "model" else self.jpeg
            spec = bench.CaseSpec(backend=name, model_path=str(self.files.paths[name]), device=device,
                                  input=str(source), scale=scale, mode=mode, runs=0, warmup=1,
                                  threads=self.settings.threads)
            self._memory[key] = bench.run_case_isolated(spec)
        return self._memory[key]

    def describe(self) -> dict[str, Any]:
        """What every case's extra_info says about the run."""
        width, height = self.settings.image_size or bench.CARVANA_SIZE
        return {"quick": self.settings.quick, "architecture": self.files.architecture,
                "source_image": f"{width}x{height}", "threads": self.settings.threads}


@pytest.fixture(scope="session")
def bench_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BenchSession:
    config = request.config
    return BenchSession(is_quick(config), tmp_path_factory.mktemp("bench"), bench_threads(config))


def pytest_report_header(config: pytest.Config) -> str:
    mode = "QUICK (width 8, 240x160)" if is_quick(config) else "FULL (seed width 64, 1918x1280; slow on CPU)"
    return f"unet-deploy benchmarks: {mode}"
