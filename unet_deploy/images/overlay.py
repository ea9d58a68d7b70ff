"""Overlays: the input image with each predicted class tinted and outlined, written or shown on screen."""

from __future__ import annotations

import os
import sys

import numpy as np

__all__ = ["overlay_image", "display_available", "show_overlay"]

#: Overlay tint per class (class 0 = background stays untinted); a class whose pixels are close to its tint
#: on average (a green car) gets the palette colour farthest from them instead.
PALETTE = np.array([[0, 0, 0], [0, 255, 0], [255, 0, 255], [0, 90, 255], [255, 200, 0], [0, 220, 220],
                    [255, 0, 0], [255, 128, 0], [128, 0, 255], [128, 255, 0]], dtype=np.float32)
MIN_TINT_DISTANCE = 200.0  #: RGB distance between a class's mean colour and its tint, at least (if any can)


#: rows of the image per block of :func:`overlay_image` (its float32 temporaries stay a few MiB)
_BLOCK_PIXELS = 1 << 16


def _class_means(rgb: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel count, mean RGB) per class 0..n-1, from exact sums over blocks of rows (what
    ``rgb[mask == c].mean(0)`` gives, without a copy of the pixels)."""
    counts = np.zeros(n, np.int64)
    sums = np.zeros((n, 3), np.float64)  # sums of uint8 values: exact integers in float64
    rows = max(1, _BLOCK_PIXELS // max(mask.shape[1], 1))
    for r0 in range(0, mask.shape[0], rows):
        flat = mask[r0:r0 + rows].reshape(-1)
        counts += np.bincount(flat, minlength=n)[:n]
        for k in range(3):
            sums[:, k] += np.bincount(flat, weights=rgb[r0:r0 + rows, :, k].reshape(-1), minlength=n)[:n]
    return counts, sums / np.maximum(counts, 1)[:, None]


def _tints(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tint per class: its palette colour, or the palette colour farthest from the class's mean colour
    when that one is closer than ``MIN_TINT_DISTANCE`` (a red car under a red tint)."""
    n = int(mask.max(initial=0)) + 1
    tints = PALETTE[np.arange(n) % len(PALETTE)]  # a copy, one row per class present
    counts, means = _class_means(rgb, mask, n)
    for c in range(1, n):
        if not counts[c]:
            continue
        mean = means[c]
        distance = np.linalg.norm(PALETTE[1:] - mean, axis=1)
        if np.linalg.norm(tints[c] - mean) < MIN_TINT_DISTANCE:
            tints[c] = PALETTE[1 + int(distance.argmax())]
    return tints


def _edges(mask: np.ndarray) -> np.ndarray:
    """True where a pixel's class differs from one of its 4 neighbours (both sides of every boundary)."""
    edge = np.zeros(mask.shape, dtype=bool)
    vertical = mask[1:] != mask[:-1]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def _overlay_rows(rgb: np.ndarray, classes: np.ndarray, edge: np.ndarray, tints: np.ndarray,
                  alpha: float) -> np.ndarray:
    out = rgb.astype(np.float32)
    fg = classes > 0
    colours = tints[classes]
    out = np.where(fg[..., None], (1 - alpha) * out + alpha * colours, out)
    out[edge & fg] = 255.0
    out[edge & ~fg] = 0.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (H, W, 1|3) with each foreground class tinted and outlined; uint8 (H, W, 3).

    Readable on any colour: the tint contrasts with the mean colour under each class (:func:`_tints`), and
    every boundary is drawn as a white line on the foreground side beside a black line on the background
    side. Worked a block of rows at a time: its memory is the output's, whatever the image's size.
    """
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*mask.shape, 1), 3, 2)
    classes = np.clip(mask, 0, None) if np.issubdtype(mask.dtype, np.signedinteger) else mask
    tints = _tints(rgb, classes)
    height = mask.shape[0]
    out = np.empty((*mask.shape, 3), np.uint8)
    rows = max(1, _BLOCK_PIXELS // max(mask.shape[1], 1))
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        lo, hi = max(r0 - 1, 0), min(r1 + 1, height)  # one row of context each side: the edges see across
        edge = _edges(classes[lo:hi])[r0 - lo: r0 - lo + (r1 - r0)]
        out[r0:r1] = _overlay_rows(rgb[r0:r1], classes[r0:r1].astype(np.int64), edge, tints, alpha)
    return out


def display_available() -> bool:
    """True where a window can be opened (never on a headless Linux box)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def show_overlay(title: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Show the input and its overlay side by side in a window (blocks until it is closed)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].set_title(f"{title}: input")
    axes[0].imshow(image.squeeze())
    axes[1].set_title("overlay")
    axes[1].imshow(overlay_image(image, mask))
    for ax in axes:
        ax.axis("off")
    plt.show()
    plt.close(fig)
