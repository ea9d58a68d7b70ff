"""Batching and the model: consecutive images of one network-input size run as one batch.

Before the first image of each size runs, :func:`unet_deploy.resources.check_predict_memory` refuses a
size that cannot fit in memory (one line, before the model starts); an out-of-memory error from the model
is one line for the run (:func:`unet_deploy.resources.raise_if_out_of_memory`), other model errors fail
the batch's files only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..backends import Backend
from ..data import preprocess
from ..errors import UserError, first_line
from ..resources import check_predict_memory, raise_if_out_of_memory
from .load import Loaded
from .records import PredictOptions

__all__ = ["MIN_SIDE", "BatchedModel", "Inferred"]

MIN_SIDE = 16  #: four 2x poolings need at least 16 input pixels per side

#: One loaded job after the model: (loaded, its logits as a batch of one or None, error or None).
Inferred = tuple[Loaded, Any, "str | None"]


class BatchedModel:
    """Runs ``backend`` on loaded jobs in batches of same-size inputs; yields :data:`Inferred` in order."""

    def __init__(self, backend: Backend, options: PredictOptions, scale: float, n_jobs: int):
        self.backend = backend
        self.options = options
        self.scale = scale
        self.n_jobs = n_jobs  #: the run's size: no batch is ever larger (memory check)
        self.batch: list[tuple[Loaded, np.ndarray]] = []
        self.checked: set[tuple[int, ...]] = set()  #: image shapes the memory check passed

    def run(self, loaded: Iterable[Loaded]) -> Iterator[Inferred]:
        for item in loaded:
            yield from self._add(item)
        yield from self._flush()

    def _add(self, item: Loaded) -> Iterator[Inferred]:
        """Queue ``item`` (running the queued batch first when it is full or of another size), or yield it
        at once with its error (the queued batch first, to keep the order)."""
        if item.error is not None or item.skipped_mask is not None:
            yield from self._flush()
            yield item, None, item.error
            return
        self._check_memory(item)
        try:
            x = preprocess(item.decoded(), self.scale)
        except UserError as e:
            yield from self._flush()
            yield item, None, str(e)
            return
        if min(x.shape[1:]) < MIN_SIDE:
            yield from self._flush()
            yield item, None, (f"{item.job.path}: too small for the U-Net at scale {self.scale} "
                               f"({x.shape[2]}x{x.shape[1]} px after scaling, needs {MIN_SIDE} or more "
                               "per side); use a larger --scale")
            return
        if self.batch and (self.batch[0][1].shape != x.shape or len(self.batch) >= self.options.batch_size):
            yield from self._flush()
        self.batch.append((item, x))

    def _check_memory(self, item: Loaded) -> None:
        """Issue 12: refuse what cannot fit, before the model runs (once per image shape)."""
        shape = item.decoded().shape
        if shape not in self.checked:
            self.checked.add(shape)
            check_predict_memory(self.backend, shape[1], shape[0], self.scale,
                                 min(self.options.batch_size, self.n_jobs), self.options.tta, str(item.job.path))

    def _flush(self) -> Iterator[Inferred]:
        if not self.batch:
            return
        items = list(self.batch)
        self.batch.clear()
        try:
            logits = self.backend.native(np.stack([x for _, x in items]))  # numpy from ORT: no torch
        except Exception as e:  # noqa: BLE001 - out of memory (issue 12): one line for the run, not per file
            raise_if_out_of_memory(e, f"running the model on {len(items)} image(s) of "
                                      f"{items[0][1].shape[2]}x{items[0][1].shape[1]} px")
            if not isinstance(e, (RuntimeError, MemoryError, ValueError)):
                raise
            msg = first_line(e)[:200]
            for item, _ in items:
                yield item, None, (f"{item.job.path}: inference failed ({msg}); try a smaller "
                                   "--batch-size or --scale")
            return
        for i, (item, _) in enumerate(items):
            yield item, logits[i:i + 1], None
