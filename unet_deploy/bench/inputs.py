"""The benchmark's inputs (a synthetic Carvana-like image, as an array or a JPEG) and the end-to-end
pipeline it times: decode -> preprocess -> model -> post-process (-> dense CRF)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unet_deploy.fileio import atomic_path
from unet_deploy.images.crf import dense_crf
from unet_deploy.images.image_io import load_image, preprocess
from unet_deploy.images.postprocess import logits_to_mask, probabilities
from unet_deploy.images.synth import render_car

__all__ = ["synthetic_image", "write_jpeg", "end_to_end"]


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic Carvana-like uint8 (H, W, 3) image: a car on a studio background
    (:func:`unet_deploy.images.synth.render_car`)."""
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(render_car(rng, width, height)[0], dtype=np.uint8)


def write_jpeg(image: np.ndarray, path: str | Path, quality: int = 90) -> Path:
    """Save a uint8 RGB image as JPEG (atomically) -- the end-to-end benchmarks decode it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="JPEG", quality=quality)
    return path


def end_to_end(backend: Any, image_path: str | Path, scale: float, threshold: float = 0.5,
               crf: bool = False) -> np.ndarray:
    """decode -> preprocess -> model -> post-process (-> dense CRF): the mask at the original size."""
    image = load_image(image_path)
    batch = preprocess(image, scale)[None]
    logits = backend(batch)
    size = image.shape[:2]
    if not crf:
        return logits_to_mask(logits, size, threshold)[0]
    return dense_crf(image, probabilities(logits[0], size))
