"""``--crf auto``: choose dense-CRF parameters for a model on its validation images, and keep the CRF off
when no choice helps there.

The search is small and bounded in time: the model runs once per image; then a fixed list of candidates
(:func:`candidates`: Pytorch-UNet's values under the scale rule of :mod:`unet_deploy.images.crf`, and
variations of the reach, the colour std-dev and the weights) is scored by mean dice, most likely first,
until the list or the time budget ends. The best candidate is kept only when it raises mean dice by at
least :data:`MIN_GAIN` and lowers no image by more than :data:`MAX_IMAGE_LOSS`: a CRF that does not help on
validation images is not trusted on new ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.images.crf import CRFChoice, CRFParams, crf_map
from unet_deploy.images.dice import image_dice
from unet_deploy.images.image_io import Pair, load_image, load_mask, mask_to_index
from unet_deploy.images.postprocess import logits_to_mask
from unet_deploy.predict.masks import crf_image, crf_probabilities
from unet_deploy.runtime.tiling import whole_or_tiled

__all__ = ["MIN_GAIN", "MAX_IMAGE_LOSS", "MAX_IMAGES", "BUDGET_S", "candidates", "tune_crf", "store_crf",
           "ValidationSet", "auto_crf"]

#: The chosen CRF must raise mean validation dice by at least this much to be turned on.
MIN_GAIN = 2e-4
#: ... and lower no validation image's dice by more than this.
MAX_IMAGE_LOSS = 0.005
#: At most this many validation images are used (the first ones, in name order).
MAX_IMAGES = 16
#: Default time budget of the search in seconds (the model's one pass over the images not included).
BUDGET_S = 60.0
#: Below this many pixels in all, the CRF runs in this process: a pool per candidate costs more than it saves.
IN_PROCESS_PIXELS = 8_000_000


def candidates() -> list[CRFParams]:
    """The parameter sets tried, most likely first: the defaults (scaled to each image), then a shorter and
    a longer reach, a narrower and a wider colour std-dev, lighter weights, and mixes of the two first."""
    base = CRFParams()
    s = base.gauss_sxy, base.bilat_sxy

    def reach(f: float, **kw: Any) -> CRFParams:
        return replace(base, gauss_sxy=s[0] * f, bilat_sxy=s[1] * f, **kw)

    return [base, reach(0.5), reach(2.0), replace(base, bilat_srgb=10.0), replace(base, bilat_srgb=40.0),
            replace(base, gauss_compat=1.0, bilat_compat=3.0), reach(0.5, gauss_compat=1.0, bilat_compat=3.0),
            reach(0.25, gauss_compat=1.0, bilat_compat=3.0), reach(0.5, bilat_srgb=10.0),
            reach(2.0, gauss_compat=1.0, bilat_compat=3.0)]


@dataclass
class ValidationSet:
    """What the search scores: per image its RGB (as the CRF takes it), the CRF's input probabilities, the
    true class indices and the dice of the mask without CRF."""

    images: list[np.ndarray]
    probs: list[np.ndarray]
    truths: list[np.ndarray]
    plain: list[float]
    n_classes: int

    @classmethod
    def predict(cls, backend: Any, pairs: Sequence[Pair], mask_values: Sequence[Any] | None = None
                ) -> ValidationSet:
        """Run ``backend`` once over ``pairs`` (at the model's scale and threshold, as ``predict`` does)."""
        inf, n_classes = backend.config.inference, backend.config.model.n_classes
        values = list(mask_values if mask_values is not None else inf.mask_values or [0, 1])
        out = cls([], [], [], [], n_classes)
        for p in pairs:
            image = load_image(p.image, backend.config.model.n_channels)
            truth = mask_to_index(load_mask(p.mask), values, p.mask)
            logits = whole_or_tiled(backend, image, inf.scale, None)
            size = image.shape[:2]
            out.images.append(crf_image(image))
            out.probs.append(crf_probabilities(logits, size, inf.threshold))
            out.truths.append(truth)
            out.plain.append(image_dice(logits_to_mask(logits, size, inf.threshold)[0], truth, n_classes))
        return out

    def scores(self, params: CRFParams, workers: int = 1) -> list[float]:
        """Per-image dice with the CRF of ``params``."""
        masks = crf_map(zip(self.images, self.probs, strict=True), params, workers=workers)
        return [image_dice(m, t, self.n_classes) for m, t in zip(masks, self.truths, strict=True)]


def _acceptable(plain: Sequence[float], scores: Sequence[float]) -> bool:
    gain = float(np.mean(scores)) - float(np.mean(plain))
    worst = max(a - b for a, b in zip(plain, scores, strict=True))
    return gain >= MIN_GAIN and worst <= MAX_IMAGE_LOSS


def tune_crf(data: ValidationSet, budget_s: float = BUDGET_S, workers: int = 1,
             log: Callable[[str], None] | None = None) -> CRFChoice:
    """Score :func:`candidates` on ``data`` within ``budget_s`` seconds (at least the first is scored) and
    return the choice: the best acceptable candidate (``helps``), else the best one scored (not ``helps``).

    Args:
        data: the validation images, predicted once (:meth:`ValidationSet.predict`).
        budget_s: time budget of the search; the candidate running when it ends is the last.
        workers: CRF processes.
        log: gets one line per candidate scored.

    Returns:
        The :class:`CRFChoice` to store with the model.
    """
    start = time.perf_counter()
    plain = float(np.mean(data.plain))
    if sum(t.size for t in data.truths) < IN_PROCESS_PIXELS:
        workers = 1
    best: tuple[float, CRFParams, bool] | None = None
    for params in candidates():
        scores = data.scores(params, workers)
        mean, ok = float(np.mean(scores)), _acceptable(data.plain, scores)
        if log:
            log(f"crf auto: {params.to_dict()} -> dice {mean:.4f} (without {plain:.4f})")
        if best is None or (ok, mean) > (best[2], best[0]):
            best = (mean, params, ok)
        if time.perf_counter() - start > budget_s:
            break
    assert best is not None
    return CRFChoice(best[1], best[2], best[0], plain, len(data.plain))


def store_crf(checkpoint: str | Path, choice: CRFChoice) -> Path:
    """Record ``choice`` in the checkpoint's config (``inference.crf``), rewriting the file atomically; exports
    made from it embed it, and ``predict --crf`` reads it from either."""
    import torch  # the training path: torch is loaded already

    from unet_deploy.fileio import atomic_path

    path = Path(checkpoint)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    payload.setdefault("config", {}).setdefault("inference", {})["crf"] = choice.to_dict()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def auto_crf(checkpoint: str | Path, val_pairs: Sequence[Pair], budget_s: float = BUDGET_S, workers: int = 1,
             log: Callable[[str], None] | None = None, device: str = "cpu") -> CRFChoice:
    """``train --crf auto``: choose the CRF of ``checkpoint`` on (at most :data:`MAX_IMAGES` of) its validation
    images ``val_pairs`` and store it there (:func:`store_crf`).

    Args:
        checkpoint: the model to choose for (``best.pth``), rewritten with the choice.
        val_pairs: its validation images, never its training images.
        budget_s: time budget of the search (:func:`tune_crf`).
        workers: CRF processes.
        log: gets one line per candidate scored.
        device: where the model runs over the images (the training's device).

    Returns:
        The stored :class:`CRFChoice`.
    """
    from unet_deploy.runtime.loader import load_backend  # torch: the training path has it loaded

    backend = load_backend(checkpoint, "torch", device)
    pairs = sorted(val_pairs, key=lambda p: p.id)[:MAX_IMAGES]
    choice = tune_crf(ValidationSet.predict(backend, pairs), budget_s, workers, log)
    store_crf(checkpoint, choice)
    return choice
