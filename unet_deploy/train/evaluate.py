"""Evaluation at the original resolution: what ``unet-deploy evaluate`` reports."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from unet_deploy.config import InferenceConfig
from unet_deploy.errors import UserError
from unet_deploy.images.dice import image_dice
from unet_deploy.images.image_io import (
    Pair,
    check_min_size,
    discover_mask_values,
    load_image,
    load_mask,
    mask_to_index,
)
from unet_deploy.images.postprocess import logits_to_mask
from unet_deploy.runtime.tiling import Tiling, choose_tiling, whole_or_tiled

__all__ = ["predicted_masks", "evaluate_model"]


def predicted_masks(backend, pairs: Sequence[Pair], scale: float | None = None,
                    mask_values: Sequence | None = None,
                    threshold: float | None = None, tile: int | None = None, tile_overlap: int | None = None
                    ) -> Iterator[tuple[Pair, np.ndarray, np.ndarray]]:
    """(pair, predicted class indices, true class indices) at the original resolution, per image.

    Predictions take the shared load -> preprocess -> model -> postprocess path, so they are exactly
    what ``predict`` writes (with ``tile``: in blended tiles of at most ``tile`` model-input pixels, as
    ``predict --tile``; an image whose whole does not fit in memory is tiled automatically, one notice
    line). For binary models a mask written by ``predict`` (0/255) is read as well as the training masks'
    own values (e.g. Carvana's 0/1).
    """
    tiling = Tiling.of(tile, tile_overlap)
    inf = backend.config.inference
    scale = inf.scale if scale is None else scale
    threshold = inf.threshold if threshold is None else threshold
    try:
        InferenceConfig(scale, threshold)
    except ValueError as e:
        raise UserError(f"-s/--scale or -t/--mask-threshold: {e}") from None
    n_classes = backend.config.model.n_classes
    values = list(mask_values) if mask_values is not None else (
        inf.mask_values or discover_mask_values([p.mask for p in pairs]))
    binary_alias = inf.output_values(n_classes) if max(n_classes, 2) == 2 and mask_values is None else None
    for p in pairs:
        check_min_size(p.image, scale)
        image = load_image(p.image, backend.config.model.n_channels)
        raw = load_mask(p.mask)
        try:
            truth = mask_to_index(raw, values, p.mask)
        except UserError:
            if binary_alias is None or binary_alias == values or not np.isin(raw, binary_alias).all():
                raise
            truth = mask_to_index(raw, binary_alias, p.mask)
        chosen = choose_tiling(backend, image.shape[1], image.shape[0], scale, tiling=tiling, batch=1, tta=False,
                               label=str(p.image), overlap=tile_overlap,
                               notice=lambda line: print(line, file=sys.stderr, flush=True))
        logits = whole_or_tiled(backend, image, scale, chosen)
        yield p, logits_to_mask(logits, image.shape[:2], threshold)[0], truth


def evaluate_model(backend, pairs: Sequence[Pair], scale: float | None = None,
                   mask_values: Sequence | None = None, threshold: float | None = None,
                   progress: Callable[[int], None] | None = None, tile: int | None = None,
                   tile_overlap: int | None = None) -> dict[str, Any]:
    """Carvana's metric: mean over images of per-image dice at the original resolution.

    ``backend`` is any :class:`unet_deploy.runtime.Backend`; see :func:`predicted_masks` (``tile``,
    ``tile_overlap``: ``--tile``, ``--tile-overlap``).
    """
    scores: dict[str, float] = {}
    n_classes = backend.config.model.n_classes
    for i, (p, pred, truth) in enumerate(predicted_masks(backend, pairs, scale, mask_values, threshold,
                                                                   tile, tile_overlap)):
        scores[p.id] = image_dice(pred, truth, n_classes)
        if progress:
            progress(i + 1)
    return {"dice": float(np.mean(list(scores.values()))) if scores else float("nan"), "n": len(scores),
            "per_image": scores}
