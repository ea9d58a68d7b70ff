"""Batching and the model: consecutive images of one network-input size run as one batch.

Before the first image of each size runs, :func:`unet_deploy.runtime.tiling.choose_tiling` decides
whether it runs whole or in tiles (``--tile``, or automatically with a one-line notice when the whole image
cannot fit in memory) and refuses a size that cannot fit either way (one line, before the model starts).
An image of more than one tile runs on its own: its tiles are the batch (up to ``--batch-size`` per call)
and its blended logits come out as one image's. An out-of-memory error from the model is one line for the
run (:func:`unet_deploy.runtime.resources.raise_if_out_of_memory`), other model errors fail the batch's files only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from unet_deploy.errors import UserError, first_line
from unet_deploy.images.image_io import resize_image, to_input
from unet_deploy.predict.load import Loaded
from unet_deploy.predict.records import PredictOptions
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.resources import raise_if_out_of_memory
from unet_deploy.runtime.tiling import Tiling, choose_tiling, plan_tiles, tiled_logits

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
        self.tiling = Tiling.of(options.tile, options.tile_overlap)
        self.checked: dict[tuple[int, ...], Tiling | None] = {}  #: image shape -> its tiling (memory checked)

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
        tiling = self._check_memory(item)
        try:
            scaled = resize_image(item.decoded(), self.scale)
        except UserError as e:
            yield from self._flush()
            yield item, None, str(e)
            return
        if min(scaled.shape[:2]) < MIN_SIDE:
            yield from self._flush()
            yield item, None, (f"{item.job.path}: too small for the U-Net at scale {self.scale} "
                               f"({scaled.shape[1]}x{scaled.shape[0]} px after scaling, needs {MIN_SIDE} or more "
                               "per side); use a larger --scale")
            return
        if tiling is not None and plan_tiles(scaled.shape[0], scaled.shape[1], tiling.tile, tiling.overlap).count > 1:
            yield from self._flush()
            yield self._tiled(item, scaled, tiling)
            return
        x = to_input(scaled)  # one tile (or none asked): the whole image, exactly as untiled
        del scaled
        if self.batch and (self.batch[0][1].shape != x.shape or len(self.batch) >= self.options.batch_size):
            yield from self._flush()
        self.batch.append((item, x))

    def _check_memory(self, item: Loaded) -> Tiling | None:
        """Issue 12: refuse what cannot fit, before the model runs; issue 15: tile what cannot fit whole
        (once per image shape)."""
        shape = item.decoded().shape
        if shape not in self.checked:
            opts = self.options
            batch = min(opts.batch_size, self.n_jobs)
            self.checked[shape] = choose_tiling(
                self.backend, shape[1], shape[0], self.scale, tiling=self.tiling, batch=batch, tta=opts.tta,
                label=str(item.job.path), overlap=opts.tile_overlap, auto=opts.auto_tile,
                notice=lambda line: print(line, file=sys.stderr, flush=True))
        return self.checked[shape]

    def _tiled(self, item: Loaded, scaled: np.ndarray, tiling: Tiling) -> Inferred:
        """One image of several tiles: its tiles in batches of ``--batch-size`` -> its blended logits."""
        plan = plan_tiles(scaled.shape[0], scaled.shape[1], tiling.tile, tiling.overlap)
        try:
            return item, tiled_logits(self.backend, scaled, plan, self.options.batch_size), None
        except Exception as e:  # noqa: BLE001 - as _flush: out of memory is one line for the run
            h, w = plan.shape
            return item, None, self._failure(e, f"{min(self.options.batch_size, plan.count)} tile(s) of "
                                                f"{w}x{h} px", str(item.job.path))

    @staticmethod
    def _failure(e: Exception, what: str, path: str) -> str:
        """The one-line error of a failed model call (out of memory: raised for the whole run)."""
        raise_if_out_of_memory(e, f"running the model on {what}")
        if not isinstance(e, (RuntimeError, MemoryError, ValueError)):
            raise e
        return f"{path}: inference failed ({first_line(e)[:200]}); try a smaller --batch-size or --scale"

    def _flush(self) -> Iterator[Inferred]:
        if not self.batch:
            return
        items = list(self.batch)
        self.batch.clear()
        try:
            logits = self.backend.native(np.stack([x for _, x in items]))  # numpy from ORT: no torch
        except Exception as e:  # noqa: BLE001 - out of memory (issue 12): one line for the run, not per file
            what = f"{len(items)} image(s) of {items[0][1].shape[2]}x{items[0][1].shape[1]} px"
            for item, _ in items:
                yield item, None, self._failure(e, what, str(item.job.path))
            return
        for i, (item, _) in enumerate(items):
            yield item, logits[i:i + 1], None
