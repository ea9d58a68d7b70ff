"""Dice: Carvana's metric is the mean over images of the per-image Dice coefficient."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["dice_score", "image_dice", "dice_per_image", "multiclass_dice_per_image", "dice_loss", "EPS"]

EPS = 1e-6


def dice_score(pred: np.ndarray, target: np.ndarray) -> float:
    """(2|A∩B| + eps) / (|A| + |B| + eps) for two binary masks; empty vs empty is 1."""
    a = np.asarray(pred).astype(bool)
    b = np.asarray(target).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    inter = np.logical_and(a, b).sum(dtype=np.float64)
    return float((2.0 * inter + EPS) / (a.sum(dtype=np.float64) + b.sum(dtype=np.float64) + EPS))


def image_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """One image's dice between class-index masks: binary foreground, or the mean over classes 1..K-1."""
    if max(n_classes, 2) > 2:
        return float(np.mean([dice_score(pred == c, truth == c) for c in range(1, n_classes)]))
    return dice_score(pred > 0, truth > 0)


def dice_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image binary dice for (N, H, W) masks (bool or 0/1): returns (N,) float64."""
    pred = pred.reshape(pred.shape[0], -1).to(torch.float64)
    target = target.reshape(target.shape[0], -1).to(torch.float64)
    inter = (pred * target).sum(1)
    return (2 * inter + EPS) / (pred.sum(1) + target.sum(1) + EPS)


def multiclass_dice_per_image(pred: Tensor, target: Tensor, n_classes: int) -> Tensor:
    """Per-image dice averaged over foreground classes 1..K-1 (class indices (N, H, W)); (N,)."""
    if n_classes <= 2:
        return dice_per_image(pred > 0, target > 0)
    scores = [dice_per_image(pred == c, target == c) for c in range(1, n_classes)]
    return torch.stack(scores, 1).mean(1)


def dice_loss(probs: Tensor, onehot: Tensor) -> Tensor:
    """Soft dice loss, 1 - mean dice over images and classes; ``probs``/``onehot`` are (N, C, H, W)."""
    dims = (2, 3)
    inter = (probs * onehot).sum(dims)
    sums = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + EPS) / (sums + EPS)
    return 1 - dice.mean()
