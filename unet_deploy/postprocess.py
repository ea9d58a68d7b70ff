"""Logits -> probabilities -> mask at the original image size (Pytorch-UNet's ``predict_img``)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["upsample_logits", "probabilities", "logits_to_mask", "colorize"]


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) logits to ``size`` = (H, W), as Pytorch-UNet does before argmax."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _prepare(logits: torch.Tensor | np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """float32 (N, C, H, W) logits at ``size``, on the device they came from (a GPU upsamples there and
    only the final mask or probabilities cross to the host)."""
    t = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    t = t.detach().float()
    if t.ndim == 3:
        t = t[None]
    return upsample_logits(t, size) if size is not None else t


def probabilities(logits: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """One image's (C, h, w) logits -> float32 (K, H, W) class probabilities, K = max(C, 2).

    One-class (sigmoid) models give [1 - p, p], so dense CRF and TTA treat every model alike.
    """
    t = _prepare(logits, size)
    if t.shape[1] == 1:
        p = torch.sigmoid(t[0, 0])
        return torch.stack([1 - p, p]).cpu().numpy()
    return torch.softmax(t[0], dim=0).cpu().numpy()


def logits_to_mask(logits: torch.Tensor, size: tuple[int, int] | None = None,
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
        if size is not None:
            margin = upsample_logits(margin, size)
        mask = margin[:, 0] > math.log(threshold / (1.0 - threshold))
        return mask.cpu().numpy().astype(np.uint8)
    t = _prepare(logits, size)
    if t.shape[1] == 1:
        mask = torch.sigmoid(t[:, 0]) > threshold
    elif t.shape[1] == 2:
        mask = torch.softmax(t, dim=1)[:, 1] > threshold
    else:
        mask = t.argmax(dim=1)
    dtype = np.uint8 if t.shape[1] <= 256 else np.int32
    return mask.cpu().numpy().astype(dtype)


def colorize(mask: np.ndarray, values: list) -> np.ndarray:
    """Class indices (H, W) -> the pixel values written to disk (uint8 grey or (H, W, 3) colours)."""
    lut = np.asarray(values)
    if lut.ndim == 1:
        if lut.max(initial=0) <= 255 and lut.min(initial=0) >= 0:
            return lut.astype(np.uint8)[mask]
        return lut.astype(np.int32)[mask]
    return lut.astype(np.uint8)[mask]
