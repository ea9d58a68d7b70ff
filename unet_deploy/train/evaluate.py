"""Evaluation at the original resolution: what ``unet-deploy evaluate`` reports."""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from unet_deploy.config import InferenceConfig
from unet_deploy.errors import UserError
from unet_deploy.images.crf import CRFParams, crf_map, model_crf
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
from unet_deploy.predict.masks import crf_image, crf_probabilities
from unet_deploy.runtime.tiling import Tiling, choose_tiling, whole_or_tiled

__all__ = ["predicted_masks", "evaluate_model"]


def _predictions(backend, pairs: Sequence[Pair], scale: float | None, mask_values: Sequence | None,
                 threshold: float | None, tile: int | None, tile_overlap: int | None
                 ) -> Iterator[tuple[Pair, np.ndarray, Any, np.ndarray, float]]:
    """(pair, decoded image, logits, true class indices, threshold) per image: the body of
    :func:`predicted_masks`."""
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
        yield p, image, whole_or_tiled(backend, image, scale, chosen), truth, threshold


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
    for p, image, logits, truth, threshold_used in _predictions(backend, pairs, scale, mask_values, threshold,
                                                                tile, tile_overlap):
        yield p, logits_to_mask(logits, image.shape[:2], threshold_used)[0], truth


def _with_crf(stream: Iterator[tuple[Pair, np.ndarray, Any, np.ndarray, float]], params: CRFParams, workers: int
              ) -> Iterator[tuple[Pair, np.ndarray, np.ndarray, np.ndarray]]:
    """(pair, mask without CRF, mask with it, truth) per image of :func:`_predictions`' ``stream``."""
    waiting: collections.deque[tuple[Pair, np.ndarray, np.ndarray]] = collections.deque()

    def feed() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for p, image, logits, truth, threshold in stream:
            size = image.shape[:2]
            waiting.append((p, logits_to_mask(logits, size, threshold)[0], truth))
            yield crf_image(image), crf_probabilities(logits, size, threshold)

    for refined in crf_map(feed(), params, workers=workers):
        p, plain, truth = waiting.popleft()
        yield p, plain, refined, truth


def evaluate_model(backend, pairs: Sequence[Pair], scale: float | None = None,
                   mask_values: Sequence | None = None, threshold: float | None = None,
                   progress: Callable[[int], None] | None = None, tile: int | None = None,
                   tile_overlap: int | None = None, crf: bool = False, crf_params: CRFParams | None = None,
                   crf_workers: int = 1) -> dict[str, Any]:
    """Carvana's metric: mean over images of per-image dice at the original resolution.

    ``backend`` is any :class:`unet_deploy.runtime.Backend`; see :func:`predicted_masks` (``tile``,
    ``tile_overlap``: ``--tile``, ``--tile-overlap``). With ``crf`` the masks of ``predict --crf`` are scored
    too (``crf_params``, else the model's choice, else the defaults; :func:`unet_deploy.images.crf.model_crf`)
    in ``crf_workers`` processes: ``dice_crf`` and ``per_image_crf`` (equal to the plain scores when the CRF
    stays off for this model), ``crf`` (the parameters used, or None) and ``crf_note`` (why it is off).
    """
    n_classes = backend.config.model.n_classes
    stream = _predictions(backend, pairs, scale, mask_values, threshold, tile, tile_overlap)
    params, note = model_crf(backend.config.inference.crf, crf_params) if crf else (None, None)
    scored = (_with_crf(stream, params, crf_workers) if params is not None else
              ((p, m, m, t) for p, m, t in predicted_masks(backend, pairs, scale, mask_values, threshold, tile,
                                                           tile_overlap)))
    scores: dict[str, float] = {}
    refined: dict[str, float] = {}
    for i, (p, plain, with_crf, truth) in enumerate(scored):
        scores[p.id] = image_dice(plain, truth, n_classes)
        refined[p.id] = scores[p.id] if with_crf is plain else image_dice(with_crf, truth, n_classes)
        if progress:
            progress(i + 1)
    result: dict[str, Any] = {"dice": _mean(scores), "n": len(scores), "per_image": scores}
    if crf:
        result.update(dice_crf=_mean(refined), per_image_crf=refined, crf=params.to_dict() if params else None,
                      crf_note=note)
    return result


def _mean(scores: dict[str, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else float("nan")
