"""The server's prediction path: the stages of ``predict`` for one decoded image at a time, with the model
call shared by concurrent requests through :class:`~unet_deploy.serve.batcher.MicroBatcher`.

decode (thread) -> preprocess (thread) -> batched model (model thread) -> mask at the image's size, or
dense CRF (process pool, predict's ``--crf-*`` parameters) -> encode (thread). An image of more than
:data:`WHOLE_MAX_PIXELS` network pixels runs as tiles of :data:`SERVE_TILE` px (or ``--tile``; or when the
whole cannot fit in memory: tiled automatically, one notice line), so no model call is larger than a
tile batch; it skips the micro-batcher, and its tile batches take turns on the model thread with the other
requests' calls, one batch per call, so a large image neither stalls the others nor runs on once its
request is dropped. Preprocessing, the model's logits and post-processing are the functions ``predict``
uses, so a served mask has the pixels ``predict`` writes for the same file (``predict --tile 1024`` for a
tiled one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.images.crf import crf_image, crf_pool, crf_probabilities, dense_crf, model_crf
from unet_deploy.images.image_io import MIN_SIDE, resize_image, to_input
from unet_deploy.images.postprocess import logits_to_mask
from unet_deploy.images.postprocess import probabilities as class_probabilities
from unet_deploy.runtime.base import Backend
from unet_deploy.runtime.cpu_share import usable_cpus
from unet_deploy.runtime.tiling import TiledRun, Tiling, choose_tiling, plan_tiles
from unet_deploy.runtime.tta import flip_tta
from unet_deploy.serve.batcher import MicroBatcher
from unet_deploy.serve.decode import HTTPError
from unet_deploy.serve.limits import Jobs
from unet_deploy.serve.options import ServeOptions

__all__ = ["Engine", "RequestSettings", "WHOLE_MAX_PIXELS", "SERVE_TILE"]

#: the most network-input pixels of an image run whole (1024x1024; 2048x2048 px at scale 0.5)
WHOLE_MAX_PIXELS = 1024 * 1024
#: the tile side (network pixels) of larger images when ``--tile`` is not given
SERVE_TILE = 1024


@dataclass(frozen=True)
class RequestSettings:
    """One request's post-processing: the server's defaults unless the request overrides them."""

    threshold: float
    crf: bool
    tta: bool


class Engine:
    """A loaded backend behind a micro-batcher, plus the pools for pre- and post-processing."""

    def __init__(self, backend: Backend, options: ServeOptions, on_batch: Any = None):
        self.backend = backend
        self.flipped = flip_tta(backend)
        self.options = options
        self.scale = backend.config.inference.scale
        self.threshold = backend.config.inference.threshold
        self.model_thread = cf.ThreadPoolExecutor(1, thread_name_prefix="model")
        self.cpu = cf.ThreadPoolExecutor(max(2, usable_cpus()), thread_name_prefix="io")
        self.crf_pool: cf.ProcessPoolExecutor | None = None
        #: the CRF of CRF requests (None: left off for this model) and a line saying why it is off
        self.crf_params, self.crf_note = model_crf(backend.config.inference.crf, options.crf_params)
        if options.max_batch is None:  # load_state fills it in (max_batch_for) before the engine is built
            raise ValueError("Engine needs ServeOptions with max_batch set: build it through serve.run.load_state")
        self.max_batch = options.max_batch
        self.batcher = MicroBatcher(self._run_batch, self.max_batch, options.max_wait_ms / 1000,
                                    self.model_thread, on_batch)
        self.ready = False
        self.broken: str | None = None  #: why the batching task ended (the server then stops)
        self.tiling = Tiling.of(options.tile, options.tile_overlap)
        self.large = self.tiling or Tiling.of(SERVE_TILE, options.tile_overlap)
        self.tilings: dict[tuple[Any, ...], Tiling | None] = {}  #: (shape, tta) -> its tiling (memory checked)

    def _run_batch(self, inputs: np.ndarray, tta: bool) -> Any:
        return (self.flipped if tta else self.backend).native(inputs)

    async def start(self) -> asyncio.Task[None]:
        """Start batching and warm the model up on a small image (``/readyz`` turns ready after it)."""
        task = asyncio.create_task(self.batcher.run())
        warm = np.full((64, 96, self.backend.config.model.n_channels), 128, np.uint8)
        await self.predict(warm, RequestSettings(self.threshold, False, self.options.tta))
        self.ready = True
        return task

    def settings(self, threshold: float | None, crf: bool | None, tta: bool | None) -> RequestSettings:
        """A request's settings, checked against what this server allows (400 otherwise)."""
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise HTTPError(400, f"threshold {threshold}: use a probability in [0, 1]")
        want_crf = (self.options.crf if crf is None else crf) and self.crf_params is not None
        if want_crf and not self.options.allow_crf:
            raise HTTPError(400, "crf: this server has no dense CRF (pip install pydensecrf2); drop crf=1")
        return RequestSettings(self.threshold if threshold is None else threshold, want_crf,
                               self.options.tta if tta is None else tta)

    def _tiling(self, image: np.ndarray, tta: bool) -> Tiling | None:
        """The tiling of an image of this shape (``--tile``; :data:`SERVE_TILE` beyond
        :data:`WHOLE_MAX_PIXELS`; automatic when the whole cannot fit in memory; or None); a shape that cannot
        fit either way is refused (413)."""
        shape = image.shape
        key = (shape, tta)
        if key not in self.tilings:
            if len(self.tilings) >= 256:  # many distinct upload sizes: forget, do not grow
                self.tilings.clear()
            network = int(self.scale * shape[0]) * int(self.scale * shape[1])
            tiling = self.large if network > WHOLE_MAX_PIXELS else self.tiling
            try:
                self.tilings[key] = choose_tiling(
                    self.backend, shape[1], shape[0], self.scale, tiling=tiling, batch=self.max_batch,
                    tta=tta, label=f"a {shape[1]}x{shape[0]} upload", overlap=self.options.tile_overlap,
                    notice=lambda line: print(line, file=sys.stderr, flush=True))
            except UserError as e:
                raise HTTPError(413, f"image too large for this server's memory: {e}") from None
        return self.tilings[key]

    def _preprocess(self, image: np.ndarray, tta: bool = False) -> tuple[np.ndarray, Any]:
        """(network input of the whole image, None) or (the scaled uint8 image, its tile plan)."""
        tiling = self._tiling(image, tta)
        scaled = resize_image(image, self.scale)
        if min(scaled.shape[:2]) < MIN_SIDE:
            raise HTTPError(400, f"image too small for the U-Net at scale {self.scale} ({scaled.shape[1]}x"
                                 f"{scaled.shape[0]} px after scaling, needs {MIN_SIDE} or more per side)")
        if tiling is not None:
            plan = plan_tiles(scaled.shape[0], scaled.shape[1], tiling.tile, tiling.overlap)
            if plan.count > 1:
                return scaled, plan
        return to_input(scaled), None

    async def _tiled(self, scaled: np.ndarray, plan: Any, tta: bool, jobs: Jobs) -> np.ndarray:
        """A tiled image's logits, one batch of tiles per model-thread call (other calls take turns)."""
        run = TiledRun(self.flipped if tta else self.backend, scaled, plan, self.max_batch)
        for i in range(len(run)):
            await jobs.run(self.model_thread, run.step, i)
        return run.result()

    async def _batched(self, x: np.ndarray, tta: bool) -> Any:
        if self.broken is not None:
            raise HTTPError(503, f"the server is stopping: {self.broken}", {"Retry-After": "5"})
        future = self.batcher.submit(x, tta)
        try:
            return await future
        except asyncio.CancelledError:
            future.cancel()  # dropped from the queue if its batch has not started
            raise

    async def predict(self, image: np.ndarray, settings: RequestSettings, jobs: Jobs | None = None) -> np.ndarray:
        """The class-index mask (H, W) of one decoded image; ``jobs`` runs its thread steps (the request's
        memory is counted until they are over)."""
        mask, _ = await self.outputs(image, settings, jobs)
        return mask

    async def outputs(self, image: np.ndarray, settings: RequestSettings, jobs: Jobs | None = None, *,
                      probabilities: bool = False, preprocessed: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The class-index mask (H, W) of one image and, when asked, its float32 class probabilities (K, H, W).

        Args:
            image: a decoded uint8 image (H, W, C), or with ``preprocessed`` a network input: float32 (C, H, W)
                at the network's size (no scaling; never tiled; no dense CRF, which needs the image).
            settings: the request's threshold, CRF and TTA.
            jobs: runs the thread steps (the request's memory is counted until they are over).
            probabilities: also return the probabilities (before CRF), as ``probabilities`` computes them.
            preprocessed: ``image`` is a network input.

        Returns:
            (mask, probabilities or None), both at the image's size.
        """
        jobs = jobs or Jobs()
        if preprocessed:
            x, plan, size = image, None, (int(image.shape[1]), int(image.shape[2]))
        else:
            x, plan = await jobs.run(self.cpu, self._preprocess, image, settings.tta)
            size = (int(image.shape[0]), int(image.shape[1]))
        if plan is not None:
            logits = await self._tiled(x, plan, settings.tta, jobs)
        else:
            logits = await self._batched(x, settings.tta)
        del x
        probs = await jobs.run(self.cpu, _probabilities, logits, size) if probabilities else None
        if not settings.crf:
            return await jobs.run(self.cpu, _mask, logits, size, settings.threshold), probs
        if preprocessed:
            raise HTTPError(400, "crf needs the image, not preprocessed pixels: send the image file, or drop crf")
        refined = await jobs.run(self.cpu, crf_probabilities, logits, size, settings.threshold)
        mask = await jobs.run(self._crf_pool(), dense_crf, crf_image(image), refined, self.crf_params)
        return mask, probs

    def _crf_pool(self) -> cf.ProcessPoolExecutor:
        if self.crf_pool is None:
            self.crf_pool = crf_pool(self.options.crf_workers)
        return self.crf_pool

    def fail(self, reason: str) -> None:
        """No model call will run any more (the batching task ended): refuse new work, answer the queued."""
        self.broken = reason
        error = HTTPError(503, f"the server is stopping: {reason}", {"Retry-After": "5"})
        for work in self.batcher.waiting:
            if not work.future.done():
                work.future.set_exception(error)
        self.batcher.waiting.clear()

    def waiting(self) -> int:
        return len(self.batcher.waiting)

    def close(self) -> None:
        self.model_thread.shutdown(wait=False, cancel_futures=True)
        self.cpu.shutdown(wait=False, cancel_futures=True)
        if self.crf_pool is not None:
            self.crf_pool.shutdown(wait=False, cancel_futures=True)


def _mask(logits: Any, size: tuple[int, int], threshold: float) -> np.ndarray:
    return logits_to_mask(logits, size, threshold)[0]


def _probabilities(logits: Any, size: tuple[int, int]) -> np.ndarray:
    return class_probabilities(logits[0], size)
