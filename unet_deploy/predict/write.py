"""Writing a run's outputs: mask images (with the run's fingerprint) and overlays, each atomically."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_path
from unet_deploy.images.image_io import FINGERPRINT_KEY
from unet_deploy.images.overlay import overlay_image
from unet_deploy.images.postprocess import MASK_FORMATS, mask_values_image
from unet_deploy.predict.records import PredictOptions, PredictResult, values_text
from unet_deploy.runtime.base import Backend

__all__ = ["MASK_FORMATS", "output_values", "mask_values_image", "write_mask", "mask_fingerprint", "write_overlay",
           "write_result", "mask_format", "mask_bytes", "overlay_bytes"]


def output_values(backend: Backend, options: PredictOptions) -> list[Any]:
    """Pixel value written for each class: --mask-values, else the model's config (0/255 for binary)."""
    inf = backend.config.inference
    n_classes = backend.config.model.n_classes
    if options.mask_values is not None:
        want = max(n_classes, 2)
        if len(options.mask_values) != want:
            raise UserError(f"--mask-values {values_text(options.mask_values)}: {backend.path} predicts "
                            f"{want} classes; give exactly {want} values, one per class (background first)")
        return list(options.mask_values)
    return inf.output_values(n_classes)


def mask_format(path: str | Path) -> str:
    """The image format a mask named ``path`` is written in (PNG unless its suffix names another)."""
    return MASK_FORMATS.get(Path(path).suffix.lower(), "PNG")


def _save_mask(target: Any, fmt: str, mask: np.ndarray, values: Sequence[Any], fingerprint: str | None) -> None:
    img = mask_values_image(mask, values)
    extra: dict[str, Any] = {}
    if fingerprint is not None and fmt == "PNG":
        info = PngInfo()
        info.add_text(FINGERPRINT_KEY, fingerprint)
        extra["pnginfo"] = info
    img.save(target, format=fmt, **extra)


def write_mask(path: str | Path, mask: np.ndarray, values: Sequence[Any], fingerprint: str | None = None
               ) -> Path:
    """Write class indices ``mask`` (H, W) as an image of the class ``values``, atomically.

    ``fingerprint`` (PNG only): the run's :func:`run_fingerprint`, stored as the ``unet_deploy`` text
    chunk so that a resumed run reuses the file only when the same model and options made it.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        _save_mask(tmp, mask_format(path), mask, values, fingerprint)
    return path


def mask_bytes(mask: np.ndarray, values: Sequence[Any], fmt: str = "PNG", fingerprint: str | None = None) -> bytes:
    """The bytes :func:`write_mask` writes for a mask file in format ``fmt`` (encoded where the mask was
    predicted, e.g. on a Ray worker, and written elsewhere)."""
    buffer = io.BytesIO()
    _save_mask(buffer, fmt, mask, values, fingerprint)
    return buffer.getvalue()


def overlay_bytes(image: np.ndarray, mask: np.ndarray) -> bytes:
    """The bytes :func:`write_overlay` writes."""
    buffer = io.BytesIO()
    Image.fromarray(overlay_image(image, mask), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def mask_fingerprint(path: str | Path) -> str | None:
    """The run fingerprint stored in a mask PNG by :func:`write_mask`; None when there is none."""
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", None) or {}
            value = text.get(FINGERPRINT_KEY)
    except Exception:  # noqa: BLE001 - unreadable or not a PNG: no fingerprint
        return None
    return value if isinstance(value, str) else None


def write_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay_image(image, mask), mode="RGB").save(tmp, format="PNG")
    return path


def write_result(result: PredictResult, values: Sequence[Any], fingerprint: str, written: list[Path]) -> None:
    """Write a predicted result's mask and overlay (where its job names them), appending each path to
    ``written`` as soon as it is written; an OSError (disk full, permissions) is raised."""
    job = result.job
    mask = result.require_mask()
    if job.output is not None:
        written.append(write_mask(job.output, mask, values, fingerprint))
    if job.overlay is not None and result.image is not None:
        written.append(write_overlay(job.overlay, result.image, mask))
