"""The names and limits every command shares: precisions, the scale range and the default paths (backends and
their file suffixes: :mod:`unet_deploy.runtime.registry`). Light on purpose (no torch, no numpy): the CLI and
the ONNX Runtime path import it."""

from __future__ import annotations

from pathlib import Path

from unet_deploy.errors import UserError

__all__ = ["PRECISIONS", "SCALE_MAX", "scale_in_range",
           "check_scale", "CHECKPOINT_DIR", "DEFAULT_CHECKPOINT", "EXPORT_DIR", "DEMO_DIR", "MAX_DIR_IMAGES"]

#: Every precision a model may run at (eager torch: fp32/fp16/bf16; ONNX files: fp32/fp16/int8). Which backend
#: runs which is in :mod:`unet_deploy.runtime.registry`.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

#: Input scale factors are in (0, SCALE_MAX].
SCALE_MAX = 4.0

CHECKPOINT_DIR = "checkpoints"
#: What train writes last and best, and what export/predict/evaluate read when -m is omitted.
DEFAULT_CHECKPOINT = Path(CHECKPOINT_DIR) / "best.pth"
#: Where export writes and where predict looks for the newest .onnx / .ts.
EXPORT_DIR = "exported"
#: A folder given to export/verify --images adds its first this many images (by name) to the parity inputs.
MAX_DIR_IMAGES = 4
#: Where `unet-deploy demo` writes; its model is the fallback when none is here.
DEMO_DIR = "demo"


def scale_in_range(value: float) -> bool:
    """Whether ``value`` is a usable input scale, in (0, SCALE_MAX] (NaN is not)."""
    return 0 < value <= SCALE_MAX


def check_scale(value: float, flag: str) -> float:
    """``value`` when it is in (0, 4]; otherwise a one-line :class:`UserError` naming ``flag``."""
    if not scale_in_range(value):
        raise UserError(f"{flag} {value:g}: a scale must be in (0, {SCALE_MAX:g}], e.g. 0.5")
    return value
