"""Post-processing: the model's logits -> a class mask at the input's size, optionally refined by dense
CRF; and the hand-off to flip TTA (the backend is wrapped so that every batch also runs mirrored).

For binary models (one sigmoid or two softmax outputs) a pixel is foreground when its probability exceeds
the threshold; with CRF the probabilities are first re-weighted so that the threshold maps to 0.5
(:func:`unet_deploy.images.crf.threshold_prior`). Models with more classes take the argmax.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator

import numpy as np

from unet_deploy.images.crf import CRFParams, crf_image, crf_map, crf_probabilities
from unet_deploy.images.postprocess import logits_to_mask
from unet_deploy.predict.batch import Inferred
from unet_deploy.predict.load import Loaded
from unet_deploy.predict.records import PredictOptions, PredictResult
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.tta import flip_tta

__all__ = ["with_tta", "logits_to_outputs", "to_result", "results_in_order",
           "crf_results_in_order"]


def with_tta(backend: Backend, options: PredictOptions) -> Backend:
    """``backend``, wrapped for flip TTA when ``options.tta`` asks for it."""
    return flip_tta(backend) if options.tta else backend


def logits_to_outputs(stream: Iterable[Inferred], threshold: float, crf: bool) -> Iterator[Inferred]:
    """Replace each item's logits by its class mask at the input's size (``crf``: by its probabilities,
    threshold-weighted for binary models, for :func:`unet_deploy.images.crf.crf_map`)."""
    for item, logits, error in stream:
        if logits is None:
            yield item, None, error
            continue
        size = item.decoded().shape[:2]
        if crf:
            yield item, crf_probabilities(logits, size, threshold), None
        else:
            yield item, logits_to_mask(logits, size, threshold)[0], None


def to_result(item: Loaded, mask: np.ndarray | None, error: str | None, keep_image: bool) -> PredictResult:
    """The job's result; ``keep_image``: with the decoded image (for overlays and CRF), when it succeeded."""
    if item.skipped_mask is not None:
        return PredictResult(item.job, item.skipped_mask, skipped=True)
    image = item.image if keep_image and error is None else None
    return PredictResult(item.job, mask, error, image=image)


def results_in_order(stream: Iterable[Inferred], keep_image: bool) -> Iterator[PredictResult]:
    for item, mask, error in stream:
        yield to_result(item, mask, error, keep_image)


class _CrfQueue:
    """Dense CRF keeps order (:func:`unet_deploy.images.crf.crf_map`): its n-th mask belongs to the n-th item that
    went in. Items without probabilities (failed or skipped) wait in ``pending`` and come out at their place.
    """

    def __init__(self) -> None:
        self.pending: collections.deque[tuple[Loaded, str | None]] = collections.deque()

    def feed(self, stream: Iterable[Inferred]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(image, probabilities) for CRF, remembering every item in order."""
        for item, probs, error in stream:
            self.pending.append((item, error))
            if probs is not None:
                yield crf_image(item.decoded()), probs

    def waiting(self) -> Iterator[tuple[Loaded, str | None]]:
        """The items before the next one with a CRF mask (errors and skipped outputs)."""
        while self.pending and (self.pending[0][1] is not None or self.pending[0][0].skipped_mask is not None):
            yield self.pending.popleft()


def crf_results_in_order(stream: Iterable[Inferred], params: CRFParams, workers: int, keep_image: bool
                         ) -> Iterator[PredictResult]:
    """One result per item of ``stream`` (which carries probabilities), refined by dense CRF in ``workers``
    processes, in order."""
    queue = _CrfQueue()
    masks = crf_map(queue.feed(stream), params, workers=workers)
    try:
        for mask in masks:
            for item, error in queue.waiting():
                yield to_result(item, None, error, keep_image)
            item, _ = queue.pending.popleft()
            yield to_result(item, mask, None, keep_image)
        while queue.pending:
            item, error = queue.pending.popleft()
            yield to_result(item, None, error, keep_image)
    finally:
        masks.close()
