"""Logits -> probabilities -> mask at the original image size (Pytorch-UNet's ``predict_img``).

Every function takes torch tensors (kept on their device: a GPU upsamples there and only the final mask
or probabilities cross to the host) or numpy arrays (worked in numpy, without importing torch: the ONNX
Runtime CPU path starts in a fraction of the time). Both give the same result: the numpy bilinear resize
computes what ``F.interpolate(mode="bilinear", align_corners=False)`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = ["upsample_logits", "probabilities", "logits_to_mask", "colorize", "resize_bilinear", "MASK_FORMATS",
           "mask_values_image"]


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 per output position, as PyTorch's bilinear resize with
    ``align_corners=False`` computes them (half-pixel centres, clamped at the first pixel)."""
    scale = np.float32(n_in / n_out)
    src = (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of float (..., h, w) arrays to ``size`` = (H, W), numpy only."""
    h, w = x.shape[-2:]
    out = np.asarray(x, dtype=np.float32)
    if h != size[0]:
        i0, i1, wt = _axis_weights(h, size[0])
        wt = wt[:, None]
        out = out[..., i0, :] * (1 - wt) + out[..., i1, :] * wt
    if w != size[1]:
        i0, i1, wt = _axis_weights(w, size[1])
        out = out[..., i0] * (1 - wt) + out[..., i1] * wt
    return out


#: output pixels per block of :func:`_upsampled_above` (its float32 temporaries stay a few MiB)
_BLOCK_PIXELS = 1 << 18


def _upsampled_above(margin: np.ndarray, size: tuple[int, int], cut: float) -> np.ndarray:
    """``resize_bilinear(margin, size) > cut`` as uint8 (N, H, W), a block of output rows at a time: the same
    arithmetic per pixel, without the full-size float32 temporaries (a large image's mask costs its own
    bytes, not five times four)."""
    h, w = margin.shape[-2:]
    out = np.empty((margin.shape[0], *size), np.uint8)
    i0, i1, wt = _axis_weights(h, size[0]) if h != size[0] else (None, None, None)
    rows = max(1, _BLOCK_PIXELS // max(size[1], 1))
    for r0 in range(0, size[0], rows):
        r1 = min(size[0], r0 + rows)
        if i0 is None or i1 is None or wt is None:
            block = margin[:, r0:r1, :]
        else:
            weight = wt[r0:r1, None]
            block = margin[:, i0[r0:r1], :] * (1 - weight) + margin[:, i1[r0:r1], :] * weight
        out[:, r0:r1] = resize_bilinear(block, (r1 - r0, size[1])) > cut
    return out


def _is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def upsample_logits(logits: Any, size: tuple[int, int]) -> Any:
    """Bilinear resize of (N, C, h, w) logits to ``size`` = (H, W), as Pytorch-UNet does before argmax."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    if _is_numpy(logits):
        return resize_bilinear(logits, size)
    import torch.nn.functional as F  # torch tensors only: the ONNX Runtime path passes numpy

    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _prepare(logits: Any, size: tuple[int, int] | None) -> Any:
    """float32 (N, C, H, W) logits at ``size``: a numpy array stays numpy, a tensor stays on its device."""
    if _is_numpy(logits):
        t = np.asarray(logits, dtype=np.float32)
    else:
        t = logits.detach().float()
    if t.ndim == 3:
        t = t[None]
    return upsample_logits(t, size) if size is not None else t


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)  # no overflow warnings for large |x|


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def probabilities(logits: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image's (C, h, w) logits -> float32 (K, H, W) class probabilities, K = max(C, 2).

    One-class (sigmoid) models give [1 - p, p], so dense CRF and TTA treat every model alike.
    """
    t = _prepare(logits, size)
    if _is_numpy(t):
        if t.shape[1] == 1:
            p = _sigmoid(t[0, 0])
            return np.stack([1 - p, p])
        return _softmax(t[0], axis=0)
    import torch  # torch tensors only: the ONNX Runtime path passes numpy

    if t.shape[1] == 1:
        pt = torch.sigmoid(t[0, 0])
        return torch.stack([1 - pt, pt]).cpu().numpy()
    return torch.softmax(t[0], dim=0).cpu().numpy()


def _host(x: Any) -> np.ndarray:
    return x if _is_numpy(x) else x.cpu().numpy()


def logits_to_mask(logits: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None,
                   threshold: float = 0.5) -> np.ndarray:
    """(N, C, h, w) logits -> (N, H, W) class indices (uint8 below 256 classes).

    Binary models: foreground where its probability exceeds ``threshold`` (C == 1: sigmoid; C == 2:
    softmax of class 1, which at 0.5 is the argmax). More classes: argmax, ``threshold`` does not apply.
    """
    classes = int(logits.shape[-3])
    if classes <= 2 and 0.0 < threshold < 1.0:
        # Decide on one margin: sigmoid(z) > t and softmax(z)[1] > t both mean margin > logit(t), with
        # margin = z (one class) or z1 - z0 (two). Bilinear resizing is linear, so resizing the margin equals
        # the margin of the resized logits: half the full-resolution work and no sigmoid/softmax there.
        t = _prepare(logits, None)
        margin = t[:, :1] if classes == 1 else t[:, 1:2] - t[:, :1]
        cut = math.log(threshold / (1.0 - threshold))
        if size is not None and _is_numpy(margin):
            return _upsampled_above(margin[:, 0], size, cut)
        if size is not None:
            margin = upsample_logits(margin, size)
        mask = margin[:, 0] > cut
        return _host(mask).astype(np.uint8)
    t = _prepare(logits, size)
    dtype = np.uint8 if t.shape[1] <= 256 else np.int32
    if _is_numpy(t):
        if t.shape[1] == 1:
            return (_sigmoid(t[:, 0]) > threshold).astype(dtype)
        if t.shape[1] == 2:
            return (_softmax(t, axis=1)[:, 1] > threshold).astype(dtype)
        return t.argmax(axis=1).astype(dtype)
    import torch  # torch tensors only: the ONNX Runtime path passes numpy

    if t.shape[1] == 1:
        mask = torch.sigmoid(t[:, 0]) > threshold
    elif t.shape[1] == 2:
        mask = torch.softmax(t, dim=1)[:, 1] > threshold
    else:
        mask = t.argmax(dim=1)
    return mask.cpu().numpy().astype(dtype)


def colorize(mask: np.ndarray, values: list) -> np.ndarray:
    """Class indices (H, W) -> the pixel values written to disk (uint8 grey or (H, W, 3) colours)."""
    lut = np.asarray(values)
    if lut.ndim == 1:
        if lut.max(initial=0) <= 255 and lut.min(initial=0) >= 0:
            return lut.astype(np.uint8)[mask]
        return lut.astype(np.int32)[mask]
    return lut.astype(np.uint8)[mask]


#: Mask file suffix -> the format Pillow writes it in.
MASK_FORMATS = {".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def mask_values_image(mask: np.ndarray, values: Sequence[Any]) -> Image.Image:
    """Class indices (H, W) -> an image of the class ``values`` (L for 0-255 grey values, RGB for colours)."""
    pixels = colorize(mask, list(values))
    if pixels.ndim == 3:
        return Image.fromarray(pixels, mode="RGB")
    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels, mode="L")
    return Image.fromarray(pixels.astype(np.int32), mode="I")
