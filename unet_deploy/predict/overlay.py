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


def _tints(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tint per class: its palette colour, or the palette colour farthest from the class's mean colour
    when that one is closer than ``MIN_TINT_DISTANCE`` (a red car under a red tint)."""
    n = int(mask.max(initial=0)) + 1
    tints = PALETTE[np.arange(n) % len(PALETTE)]  # a copy, one row per class present
    for c in range(1, n):
        under = rgb[mask == c]
        if not len(under):
            continue
        mean = under.reshape(-1, 3).mean(axis=0)
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


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (H, W, 1|3) with each foreground class tinted and outlined; uint8 (H, W, 3).

    Readable on any colour: the tint contrasts with the mean colour under each class (:func:`_tints`), and
    every boundary is drawn as a white line on the foreground side beside a black line on the background
    side.
    """
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*mask.shape, 1), 3, 2)
    out = rgb.astype(np.float32)
    classes = np.clip(mask.astype(np.int64), 0, None)
    fg = classes > 0
    colours = _tints(out, classes)[classes]
    out = np.where(fg[..., None], (1 - alpha) * out + alpha * colours, out)
    edge = _edges(classes)
    out[edge & fg] = 255.0
    out[edge & ~fg] = 0.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


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
