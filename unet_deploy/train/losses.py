"""Mask boundaries: edge-weighted loss maps, boundary bands, boundary accuracy, LR schedules.

Distances are exact Euclidean distances from OpenCV's ``cv2.distanceTransform`` (``DIST_MASK_PRECISE``);
OpenCV comes with albumentations. It gives the same distances as ``scipy.ndimage.distance_transform_edt``
in less time, which matters because with geometric augmentation the map has to be recomputed for every
augmented mask in the DataLoader worker.
Without geometric augmentation :class:`EdgeWeight` caches maps by mask content, so each mask's map
is computed once.

Boundary pixels are the pixels whose class differs from one of their 4 neighbours -- both sides of an
edge, so a straight edge gives a 2-pixel-wide line. The picture's own border is not a boundary.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from unet_deploy.errors import UserError

__all__ = ["boundary_pixels", "distance_to_boundary", "edge_weight_map", "boundary_band", "boundary_accuracy",
           "EdgeWeight", "warmup_cosine", "WarmupCosineLR"]


def boundary_pixels(mask: np.ndarray) -> np.ndarray:
    """bool HxW: True where a pixel's label differs from its right, left, upper or lower neighbour."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    edge = np.zeros(m.shape, dtype=bool)
    dh = m[:, 1:] != m[:, :-1]
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    dv = m[1:, :] != m[:-1, :]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    return edge


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
    """float32 HxW: Euclidean distance in pixels to the nearest boundary pixel (0 on the boundary).

    A mask with a single label has no boundary: every distance is ``inf``.
    """
    import cv2

    edge = boundary_pixels(mask)
    if not edge.any():
        return np.full(edge.shape, np.inf, dtype=np.float32)
    src = np.where(edge, 0, 255).astype(np.uint8)
    return cv2.distanceTransform(src, cv2.DIST_L2, cv2.DIST_MASK_PRECISE).astype(np.float32, copy=False)


def edge_weight_map(mask_index: np.ndarray, width_px: float, weight: float) -> np.ndarray:
    """Per-pixel loss weights, float32 HxW: ``1 + (weight - 1) * exp(-d^2 / (2 * width_px^2))``.

    ``d`` is :func:`distance_to_boundary`: boundary pixels get ``weight``, pixels ``width_px`` away
    about ``1 + 0.61 (weight - 1)``, and from ``3 * width_px`` on the weight is 1. The map is not
    normalised: :func:`unet_deploy.train.segmentation_loss` divides the weighted cross-entropy by the
    sum of the weights, so only the ratio edge : interior matters, and the loss keeps the scale of
    the unweighted one. ``weight == 1`` gives all ones.
    """
    if width_px <= 0:
        raise ValueError(f"width_px must be > 0, got {width_px}")
    if weight < 1:
        raise ValueError(f"weight must be >= 1, got {weight}")
    mask_index = np.asarray(mask_index)
    if weight == 1:
        return np.ones(mask_index.shape, dtype=np.float32)
    d = distance_to_boundary(mask_index)
    with np.errstate(over="ignore", invalid="ignore"):
        w = 1.0 + (weight - 1.0) * np.exp(-(d.astype(np.float32) ** 2) / (2.0 * float(width_px) ** 2))
    return np.nan_to_num(w, nan=1.0, posinf=1.0).astype(np.float32, copy=False)


def boundary_band(mask: np.ndarray, width: int) -> np.ndarray:
    """bool HxW: the ``width`` pixels on each side of every boundary (distance < ``width``)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return distance_to_boundary(mask) < width


def boundary_accuracy(pred: np.ndarray, truth: np.ndarray, width: int = 3) -> float:
    """Fraction of the pixels in ``truth``'s boundary band that ``pred`` labels correctly.

    Dice barely moves when a large object's outline is a pixel off; this measures exactly the pixels
    that edge weighting and CRF are meant to fix. ``nan`` when ``truth`` has no boundary.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} sizes differ")
    band = boundary_band(truth, width)
    n = int(band.sum())
    if n == 0:
        return float("nan")
    return float((pred[band] == truth[band]).sum() / n)


class EdgeWeight:
    """The training ``extras`` hook: ``mask_index -> {key: float32 tensor HxW}`` from :func:`edge_weight_map`.

    ``cache_bytes > 0`` keeps up to that many bytes of maps keyed by a hash of the mask's bytes (use it
    when masks are not augmented: each mask's map is then computed once per worker); 0 disables it.
    """

    def __init__(self, width_px: float, weight: float, key: str = "weight", cache_bytes: int = 0):
        edge_weight_map(np.zeros((2, 2), dtype=np.uint8), width_px, weight)  # validate the arguments
        self.width_px, self.weight, self.key = float(width_px), float(weight), key
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cached = 0
        self.hits = self.misses = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"], state["_cached"] = OrderedDict(), 0
        return state

    def _map(self, mask: np.ndarray) -> np.ndarray:
        if self.cache_bytes <= 0:
            return edge_weight_map(mask, self.width_px, self.weight)
        m = np.ascontiguousarray(mask)
        key = hashlib.blake2b(m.tobytes(), digest_size=16, person=str(m.shape).encode()[:16]).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        w = edge_weight_map(m, self.width_px, self.weight)
        self._cache[key] = w
        self._cached += w.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return w

    def __call__(self, mask_index: np.ndarray) -> dict[str, Any]:
        return {self.key: torch.from_numpy(self._map(mask_index).copy())}


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0):
    """Per-step LR schedule: linear warm-up over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * lr`` at ``total_steps``; a ``torch.optim.lr_scheduler.LambdaLR``.

    During warm-up the factor goes ``1/(w+1), 2/(w+1), ..., 1``, so the first step already learns.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    warmup = min(warmup_steps, total_steps - 1) if total_steps > 1 else 0
    decay = max(total_steps - warmup, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        t = min((step - warmup) / decay, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return WarmupCosineLR(optimizer, factor)


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """The ``LambdaLR`` made by :func:`warmup_cosine`; refuses to load another scheduler's state."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "lr_lambdas" not in state_dict:
            raise UserError("-f/--load: that checkpoint was trained with --schedule plateau; resume it with "
                            "--schedule plateau")
        super().load_state_dict(state_dict)
