"""Estimates before big work: one line when a predict, train or benchmark run is likely to need more than
:data:`BIG_BYTES` of memory or more than :data:`BIG_SECONDS` per image on the CPU, with what makes it smaller.

Time per image is the network's floating-point work over an assumed CPU rate::

    seconds = FLOP_PER_PIXEL[up] * base_channels^2 * H * W * (3 when training) / (CPU_GFLOPS_PER_CORE * 1e9 * cores)

``FLOP_PER_PIXEL`` (transposed / bilinear up-sampling) is what
:func:`unet_deploy.bench.roofline.network_work` counts per network-input pixel, divided by base_channels^2
(widths 8 to 64 agree within 2 %). ``CPU_GFLOPS_PER_CORE`` is a measured, busy-machine rate, so the estimate
errs on the long side: issue 25's ``predict big.jpg -s 4`` (a 1918x1280 photo, 7672x5120 px network input,
base-16 bilinear, eager torch) did its 3.0 TFLOP in 204 s on a 2-core AMD EPYC VM at load average about 3,
7.4 GFLOP/s per core. Memory is :mod:`unet_deploy.runtime.resources`' estimate. GPU runs get no line (their
memory is the device's and their speed another matter). Importing this module never imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from unet_deploy.images.image_io import open_image, scaled_size
from unet_deploy.runtime.resources import (
    _model_fields,
    _on_gpu,
    _predict_needed,
    estimate_inference_bytes,
    estimate_training_bytes,
    format_bytes,
)

__all__ = ["BIG_BYTES", "BIG_SECONDS", "FLOP_PER_PIXEL", "CPU_GFLOPS_PER_CORE", "estimate_seconds",
           "format_seconds", "predict_estimate_line", "train_estimate_line", "benchmark_estimate_line"]

#: A run past this much memory ...
BIG_BYTES = 2 << 30
#: ... or this many seconds per image gets one line with its estimate before it starts.
BIG_SECONDS = 60.0
#: Network FLOP per input pixel per base_channels^2: (transposed, bilinear) up-sampling.
FLOP_PER_PIXEL = (360.0, 300.0)
#: The CPU rate assumed per usable core, in GFLOP/s (a busy 2-core EPYC VM's eager torch rate; see above).
CPU_GFLOPS_PER_CORE = 7.4


def _cores() -> int:
    from unet_deploy.runtime.cpu_share import usable_cpus

    return usable_cpus()


def estimate_seconds(model: Any, height: int, width: int, images: int = 1, training: bool = False,
                     cores: int | None = None) -> float:
    """Seconds the CPU takes for ``images`` network inputs of ``height`` x ``width`` (``training``: a
    forward and backward pass, three times the forward work) on ``cores`` cores (default: the usable ones)."""
    base, _, _, bilinear = _model_fields(model)
    flop = FLOP_PER_PIXEL[1 if bilinear else 0] * base * base * height * width * images * (3 if training else 1)
    return flop / (CPU_GFLOPS_PER_CORE * 1e9 * max(1, cores or _cores()))


def format_seconds(seconds: float) -> str:
    """``45 s``, ``3.4 min``, ``2.1 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _is_big(needed: float, seconds: float) -> bool:
    return needed > BIG_BYTES or seconds > BIG_SECONDS


def _smaller_scale(scale: float, needed: float, seconds: float) -> float:
    """The scale (rounded down to 0.05, at least 0.05) at which both estimates drop under the limits: both grow
    with scale^2."""
    ratio = min(BIG_BYTES / max(needed, 1.0), BIG_SECONDS / max(seconds, 1e-9), 1.0)
    return max(0.05, math.floor(scale * math.sqrt(ratio) * 20) / 20)


def predict_estimate_line(backend: Any, width: int, height: int, scale: float, batch: int = 1, tta: bool = False,
                          tile: int | None = None, label: str = "") -> str | None:
    """One line when predicting a ``width`` x ``height`` image at ``scale`` (with ``tile``: in tiles) is big,
    else None (and None on a GPU)."""
    if _on_gpu(getattr(backend, "device", "cpu")):
        return None
    needed, w, h, images = _predict_needed(backend, width, height, scale, batch, tta, tile)
    cores = _cores()
    seconds = estimate_seconds(backend.config.model, h, w, 2 if tta else 1, cores=cores)
    if not _is_big(needed, seconds):
        return None
    fixes = [f"-s/--scale {_smaller_scale(scale, needed, seconds):g}"]
    if tile is None and needed > BIG_BYTES:
        fixes.append("--tile 512 (memory of a tile; large images are tiled automatically when they do not fit)")
    if tta:
        fixes.append("dropping --tta")
    return (f"estimate: {label + ': ' if label else ''}{width}x{height} px at scale {scale:g} ({w}x{h} px network "
            f"input{', in tiles of ' + str(tile) + ' px' if tile else ''}) needs about {format_bytes(needed)} and "
            f"{format_seconds(seconds)} per image on {cores} CPU core(s); smaller: {' or '.join(fixes)}")


def train_estimate_line(model: Any, image: str | Path, scale: float, batch: int, n_params: int = 0,
                        device: str = "cpu") -> str | None:
    """One line when a training step (``image``'s size at ``scale``, ``batch`` images) is big, else None."""
    if _on_gpu(device):
        return None
    with open_image(image) as img:
        full_width, full_height = img.size
    width, height = scaled_size(full_width, full_height, scale)
    needed = estimate_training_bytes(model, height, width, batch, n_params)
    cores = _cores()
    seconds = estimate_seconds(model, height, width, training=True, cores=cores)
    if not _is_big(needed, seconds):
        return None
    return (f"estimate: training on {width}x{height} px images (scale {scale:g}), batches of {batch}, needs about "
            f"{format_bytes(needed)} and {format_seconds(seconds)} per image per epoch on {cores} CPU core(s); "
            f"smaller: -s/--scale {_smaller_scale(scale, needed, seconds):g}, a smaller -b/--batch-size or "
            "--base-channels")


def benchmark_estimate_line(model: Any, size: tuple[int, int], scales: tuple[float, ...], device: str = "cpu"
                            ) -> str | None:
    """One line when the largest case of a benchmark (the source ``size`` (W, H) at the largest of ``scales``,
    eager torch) is big, else None."""
    if _on_gpu(device) or not scales:
        return None
    scale = max(scales)
    w, h = scaled_size(size[0], size[1], scale)
    needed = estimate_inference_bytes(model, h, w, 1, "torch", "fp32", size[0] * size[1])
    cores = _cores()
    seconds = estimate_seconds(model, h, w, cores=cores)
    if not _is_big(needed, seconds):
        return None
    return (f"estimate: the largest case ({w}x{h} px, scale {scale:g}, eager torch) needs about "
            f"{format_bytes(needed)} and {format_seconds(seconds)} per model call on {cores} CPU core(s), times "
            f"the warm-up and timed runs of each backend; smaller: --scales "
            f"{_smaller_scale(scale, needed, seconds):g}, --quick or --base-channels 16")
