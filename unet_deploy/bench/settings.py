"""What a benchmark run measures (:class:`BenchSettings`), its defaults and checks, and the command that
repeats it."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from unet_deploy.bench.variants import BENCH_BACKENDS, default_backends, parse_variant
from unet_deploy.errors import UserError
from unet_deploy.names import check_scale
from unet_deploy.runtime.devices import resolve_device
from unet_deploy.runtime.registry import is_export_file
from unet_deploy.runtime.tiling import check_tiling

__all__ = ["SCHEMA", "QUICK_ENV", "CARVANA_SIZE", "QUICK_SIZE", "QUICK_BASE_CHANNELS", "SEED_BASE_CHANNELS",
           "DEFAULT_SCALES", "BenchSettings", "quick_from_env", "default_counts", "resolve_settings",
           "reproduce_command"]

#: Schema of a benchmark report (``--json``).
SCHEMA = "unet-deploy.benchmark/1"
#: Environment variable that switches benchmarks to quick mode (small width, small image).
QUICK_ENV = "UNET_DEPLOY_BENCH_QUICK"
#: (width, height) of a Carvana image; scale 0.5 gives Pytorch-UNet's 959x640 input.
CARVANA_SIZE = (1918, 1280)
#: (width, height) of the quick-mode source image.
QUICK_SIZE = (240, 160)
QUICK_BASE_CHANNELS = 8
SEED_BASE_CHANNELS = 64
DEFAULT_SCALES = (0.5, 1.0)


def quick_from_env() -> bool:
    """True when ``UNET_DEPLOY_BENCH_QUICK`` is set to 1/true/yes/on."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class BenchSettings:
    """What to benchmark. ``None`` fields get mode- and device-dependent defaults in
    :func:`resolve_settings` (quick mode: width 8 on a 240x160 image, warmup 1, runs 5; CPU: warmup 1,
    runs 3 at full width; CUDA: warmup 10, runs 50)."""

    checkpoint: Path | None = None
    backends: tuple[str, ...] = field(default_factory=default_backends)  # openvino when installed
    scales: tuple[float, ...] = DEFAULT_SCALES
    device: str = "auto"
    runs: int | None = None
    warmup: int | None = None
    base_channels: int | None = None
    bilinear: bool = False
    quick: bool = False
    threads: int | None = None
    image_size: tuple[int, int] | None = None  # (width, height) of the source image
    seed: int = 0
    timeout_s: float = 3600.0  # per case (fresh process)
    stages: int = 0  # > 0: also time prediction's stages and the pipeline on this many images
    stages_crf: bool = False  # ... with dense CRF
    roofline: bool = False  # also report the CPU's theoretical and best-layer peaks and each backend against them
    tile: int | None = None  # --tile: measure tiled vs whole-image prediction instead (bench/tiled.py)
    tile_overlap: int | None = None  # --tile-overlap (default: an eighth of the tile)
    check_recommendation: bool = False  # run the recommended commands once (bench/recommend_check.py)


def default_counts(device: str, quick: bool) -> tuple[int, int]:
    """(warmup, runs): a full-width U-Net takes seconds per Carvana image on a small CPU."""
    if device.startswith("cuda"):
        return 10, 50
    if quick:
        return 1, 5
    return 1, 3


def resolve_settings(settings: BenchSettings) -> BenchSettings:
    """Validate ``settings`` and fill in the defaults; bad values raise a one-line :class:`UserError`."""
    quick = settings.quick or quick_from_env()
    backends = _backend_names(settings.backends, settings.device)
    scales = tuple(dict.fromkeys(float(s) for s in settings.scales))
    if not scales:
        raise UserError("--scales: give at least one scale, e.g. --scales 0.5 1.0")
    for s in scales:
        check_scale(s, "--scales")
    device = resolve_device(settings.device)
    default_warmup, default_runs = default_counts(device, quick)
    runs = settings.runs if settings.runs is not None else default_runs
    warmup_runs = settings.warmup if settings.warmup is not None else default_warmup
    _check_counts(runs, warmup_runs, settings.threads)
    base = settings.base_channels or (QUICK_BASE_CHANNELS if quick else SEED_BASE_CHANNELS)
    if base < 1:
        raise UserError(f"--base-channels {base}: use a positive width (64 = Pytorch-UNet)")
    size = settings.image_size or (QUICK_SIZE if quick else CARVANA_SIZE)
    _check_checkpoint(settings.checkpoint)
    _check_scaled_size(scales, size)
    check_tiling(settings.tile, settings.tile_overlap)
    return replace(settings, quick=quick, backends=backends, scales=scales, device=device, runs=runs,
                   warmup=warmup_runs, base_channels=base, image_size=(int(size[0]), int(size[1])))


def _backend_names(words_in: Sequence[str], device: str | None) -> tuple[str, ...]:
    """The variant names of ``--backends``, parsed for ``device``, without repeats, in table order: by
    backend (torch, torchscript, ort, openvino), then as given."""
    words = [b.strip().lower() for b in words_in if b.strip()]
    if not words:
        raise UserError("--backends: name at least one of " + ", ".join(BENCH_BACKENDS))
    device_word = str(device or "auto").lower()
    if device_word == "auto":
        device_word = resolve_device("auto")
    variants = [parse_variant(b, device_word) for b in words]
    order = {b: i for i, b in enumerate(BENCH_BACKENDS)}
    return tuple(sorted(dict.fromkeys(v.name for v in variants), key=lambda n: order[n.split("-")[0]]))


def _check_counts(runs: int, warmup: int, threads: int | None) -> None:
    """Reject fewer than 1 timed run, a negative warm-up or fewer than 1 thread."""
    if runs < 1:
        raise UserError(f"--runs {runs}: time at least 1 run")
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: use 0 or more warm-up runs")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: use 1 or more threads")


def _check_checkpoint(checkpoint: str | Path | None) -> None:
    """``-m`` takes the training checkpoint: the benchmark makes its own exports from it."""
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        if is_export_file(ckpt):
            raise UserError(f"-m {ckpt}: pass the .pth checkpoint; the benchmark exports TorchScript and "
                            "ONNX from it itself")


def _check_scaled_size(scales: Sequence[float], size: Sequence[int]) -> None:
    """Every scaled ``size`` (W, H) must stay at least 16x16, the smallest input a U-Net takes."""
    for s in scales:
        w, h = int(size[0] * s), int(size[1] * s)
        if w < 16 or h < 16:
            raise UserError(f"--scales {s:g}: a {size[0]}x{size[1]} image becomes {w}x{h}; a U-Net needs "
                            "at least 16x16 input")


def reproduce_command(settings: BenchSettings, extra: Sequence[str] = ()) -> str:
    """The ``unet-deploy benchmark`` command line that repeats this run."""
    s = settings
    args = ["unet-deploy", "benchmark"]
    if s.checkpoint:
        args += ["-m", str(s.checkpoint)]
    if s.quick:
        args.append("--quick")
    if tuple(s.backends) != default_backends():
        args += ["--backends", *s.backends]
    args += ["--scales", *(f"{x:g}" for x in s.scales), "--device", s.device]
    if s.runs is not None:
        args += ["--runs", str(s.runs)]
    if s.warmup is not None:
        args += ["--warmup", str(s.warmup)]
    if not s.checkpoint and s.base_channels and s.base_channels != (QUICK_BASE_CHANNELS if s.quick
                                                                   else SEED_BASE_CHANNELS):
        args += ["--base-channels", str(s.base_channels)]
    if not s.checkpoint and s.bilinear:
        args.append("--bilinear")
    if s.threads:
        args += ["--threads", str(s.threads)]
    if s.stages:
        args += ["--stages", str(s.stages), *(["--stages-crf"] if s.stages_crf else [])]
    if s.roofline:
        args.append("--roofline")
    if s.tile is not None:
        args += ["--tile", str(s.tile), *(["--tile-overlap", str(s.tile_overlap)] if s.tile_overlap is not None
                                          else [])]
    return shlex.join([*args, *extra])
