"""Tiled inference: an image too large for one network call runs as overlapping tiles whose logits are
blended back into one (1, C, H, W) array, so memory grows with the tile, not with the image.

* :func:`axis_plan` / :func:`plan_tiles` -- the tile plan. Per axis of length ``L``, with largest tile side
  ``N`` and overlap ``M``: the fewest tiles that cover it, ``k = ceil((L - M) / (N - M))``, all of one side
  ``s = ceil((L + (k - 1) M) / k)`` rounded up to a multiple of 16 while that stays within ``N`` (the
  U-Net pools 2x four times: such tiles meet the network as a whole image of that size would), spread
  evenly with the first at 0 and the last flush with the edge; the others start on a multiple of 16 when
  the overlap allows it, so their pooling grid is the whole image's. Every tile of an image has the same shape,
  so tiles batch. An axis no longer than ``N`` is one tile: the whole axis.
* :func:`blend_weights` -- a Gaussian per tile axis (sigma = 0.125 x side, MONAI's sliding-window
  default), floored at 1e-3 of its peak. Tile borders see zero padding instead of context; the Gaussian
  lowers their say wherever another tile sees the pixel closer to its own centre. The weights of a tile
  are the outer product of its two axis weights, so the sum over all tiles at a pixel is the product of
  two 1-D sums: no (H, W) weight map is kept (:class:`Stitcher`).
* :func:`tiled_logits` -- runs the tiles through any :class:`~unet_deploy.runtime.Backend` in batches of
  up to ``batch_size`` (float32 NCHW, numpy or torch out) and returns the blended float32 logits.
  Blending logits (not probabilities) is what MONAI does with a network's raw output, and it keeps every
  later step (threshold, argmax, flip TTA, dense CRF on the stitched probabilities) unchanged.
* :func:`choose_tiling` -- the tiling an image gets: ``--tile`` as given, or chosen automatically (one
  notice line) when the whole image's estimated memory exceeds what this process can get.

Memory of a tiled image: the decoded image, the scaled uint8 image, the (C, H, W) float32 logits buffer
and one batch of tiles through the network. Dense CRF runs on the stitched probabilities at the image's
size: its memory still grows with the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.images.image_io import resize_image, to_input

__all__ = ["ALIGN", "MIN_TILE", "SIGMA_SCALE", "AxisPlan", "TilePlan", "Tiling", "axis_plan", "plan_tiles",
           "default_overlap", "check_tiling", "blend_weights", "Stitcher", "TiledRun", "tiled_logits",
           "whole_or_tiled", "choose_tiling"]

#: Tile sides are rounded up to a multiple of this (four 2x poolings) while they stay within ``--tile``.
ALIGN = 16
#: The smallest ``--tile``: the U-Net needs 16 input pixels per side.
MIN_TILE = 16
#: Gaussian sigma as a fraction of the tile side (MONAI's ``sigma_scale`` default).
SIGMA_SCALE = 0.125
#: Blending weights are floored at this fraction of their peak (MONAI clamps to a small positive value).
WEIGHT_FLOOR = 1e-3


def default_overlap(tile: int) -> int:
    """``--tile-overlap`` when not given: an eighth of the tile rounded down to 16 px, at least 16 px, and
    at most half the tile (640 -> 80, 1024 -> 128, 256 -> 32)."""
    return min(max(ALIGN, tile // 8 // ALIGN * ALIGN), tile // 2)


def check_tiling(tile: int | None, overlap: int | None) -> None:
    """One-line :class:`UserError` for a ``--tile`` below 16 or an overlap that is negative or not below
    the tile."""
    if tile is not None and tile < MIN_TILE:
        raise UserError(f"--tile {tile}: give the largest tile side in model-input pixels, {MIN_TILE} or more "
                        "(e.g. --tile 640), or leave --tile out to predict whole images")
    if overlap is not None and overlap < 0:
        raise UserError(f"--tile-overlap {overlap}: use 0 or more pixels (default: an eighth of --tile)")
    if tile is not None and overlap is not None and overlap >= tile:
        raise UserError(f"--tile-overlap {overlap}: must be smaller than --tile {tile}; use e.g. "
                        f"--tile-overlap {default_overlap(tile)}")


@dataclass(frozen=True)
class Tiling:
    """``--tile`` and ``--tile-overlap``: the largest tile side and the least overlap, model-input pixels."""

    tile: int
    overlap: int

    @classmethod
    def of(cls, tile: int | None, overlap: int | None = None) -> Tiling | None:
        """The checked tiling of the flags; None when ``tile`` is None (whole images)."""
        check_tiling(tile, overlap)
        if tile is None:
            return None
        return cls(tile, default_overlap(tile) if overlap is None else overlap)

    def flags(self) -> str:
        return f"--tile {self.tile} --tile-overlap {self.overlap}"


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis: their common ``side`` and where each starts."""

    length: int
    side: int
    starts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.starts)


def axis_plan(length: int, tile: int, overlap: int) -> AxisPlan:
    """The fewest tiles of one side (at most ``tile``) that cover ``length`` with ``overlap`` or more
    between neighbours, evenly spread, the last flush with the end (see the module docstring)."""
    check_tiling(tile, overlap)
    if length <= tile:
        return AxisPlan(length, length, (0,))
    k = math.ceil((length - overlap) / (tile - overlap))
    side = -(-(length + (k - 1) * overlap) // k)
    aligned = -(-side // ALIGN) * ALIGN
    if aligned <= tile:
        side = aligned
    even = [i * (length - side) // (k - 1) for i in range(k)]
    aligned_starts = [*(a // ALIGN * ALIGN for a in even[:-1]), length - side]
    gaps = (b - a for a, b in zip(aligned_starts, aligned_starts[1:], strict=False))
    starts = aligned_starts if side - max(gaps) >= overlap else even
    return AxisPlan(length, side, tuple(starts))


@dataclass(frozen=True)
class TilePlan:
    """The tiles of an (H, W) network input: the grid of the two axis plans."""

    rows: AxisPlan
    cols: AxisPlan

    @property
    def count(self) -> int:
        return self.rows.count * self.cols.count

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of every tile."""
        return self.rows.side, self.cols.side

    def origins(self) -> Iterator[tuple[int, int]]:
        """(y0, x0) of every tile, row by row."""
        for y in self.rows.starts:
            for x in self.cols.starts:
                yield y, x

    def describe(self) -> str:
        return f"{self.count} tiles of {self.cols.side}x{self.rows.side} px ({self.cols.count}x{self.rows.count})"


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TilePlan:
    """The tile plan of an ``height`` x ``width`` network input (one tile when it fits in ``tile``)."""
    return TilePlan(axis_plan(height, tile, overlap), axis_plan(width, tile, overlap))


def blend_weights(side: int, full: bool = False) -> np.ndarray:
    """float32 Gaussian weights of one tile axis (sigma = 0.125 x side, peak 1, floor 1e-3); ``full``: the
    axis is one tile covering everything, weighted 1."""
    if full:
        return np.ones(side, np.float32)
    centre = (side - 1) / 2.0
    sigma = max(SIGMA_SCALE * side, 1e-6)
    w = np.exp(-0.5 * ((np.arange(side) - centre) / sigma) ** 2)
    return np.maximum(w, WEIGHT_FLOOR).astype(np.float32)


class Stitcher:
    """Accumulates weighted tile logits into one float32 (C, H, W) buffer and normalises by the separable
    weight sums (two 1-D arrays instead of an (H, W) map)."""

    def __init__(self, plan: TilePlan, channels: int):
        self.plan = plan
        self.acc = np.zeros((channels, plan.rows.length, plan.cols.length), np.float32)
        self.wy = blend_weights(plan.rows.side, plan.rows.count == 1)
        self.wx = blend_weights(plan.cols.side, plan.cols.count == 1)
        self.sum_y = self._sums(plan.rows, self.wy)
        self.sum_x = self._sums(plan.cols, self.wx)

    @staticmethod
    def _sums(axis: AxisPlan, w: np.ndarray) -> np.ndarray:
        total = np.zeros(axis.length, np.float32)
        for s in axis.starts:
            total[s:s + axis.side] += w
        return total

    def add(self, y0: int, x0: int, logits: np.ndarray) -> None:
        """One tile's (C, h, w) logits, weighted, into the buffer at (y0, x0)."""
        h, w = self.plan.shape
        self.acc[:, y0:y0 + h, x0:x0 + w] += logits * self.wy[:, None] * self.wx[None, :]

    def result(self) -> np.ndarray:
        """The blended (1, C, H, W) logits (normalised in place, channel by channel: no full-size temporary)."""
        for channel in self.acc:
            channel /= self.sum_y[:, None]
            channel /= self.sum_x[None, :]
        return self.acc[None]


def _host(logits: Any) -> np.ndarray:
    """Logits as float32 numpy (a torch tensor is moved to the host)."""
    if isinstance(logits, np.ndarray):
        return logits.astype(np.float32, copy=False)
    return logits.detach().float().cpu().numpy()


class TiledRun:
    """:func:`tiled_logits` one batch of tiles at a time: ``step(i)`` runs batch ``i`` of ``len(run)`` and
    ``result()`` blends them. The server runs one step per model-thread call, so other requests' model calls
    take turns with a large image's tiles, and a request that is dropped stops between two steps."""

    def __init__(self, backend: Any, image: np.ndarray, plan: TilePlan, batch_size: int = 1):
        self.backend, self.image, self.plan = backend, image, plan
        origins = list(plan.origins())
        size = max(1, batch_size)
        self.groups = [origins[first:first + size] for first in range(0, len(origins), size)]
        self.stitcher: Stitcher | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def step(self, i: int) -> None:
        """Run the ``i``-th batch of tiles through the network and blend its logits in."""
        h, w = self.plan.shape
        group = self.groups[i]
        batch = np.stack([to_input(self.image[y:y + h, x:x + w]) for y, x in group])
        logits = _host(self.backend.run(batch))
        del batch
        if self.stitcher is None:
            self.stitcher = Stitcher(self.plan, int(logits.shape[1]))
        for (y, x), tile_logits in zip(group, logits, strict=True):
            self.stitcher.add(y, x, tile_logits)

    def result(self) -> np.ndarray:
        """The blended float32 logits (1, C, H, W), once every step has run."""
        assert self.stitcher is not None  # a plan has at least one tile
        return self.stitcher.result()


def tiled_logits(backend: Any, image: np.ndarray, plan: TilePlan, batch_size: int = 1) -> np.ndarray:
    """Blended float32 logits (1, C, H, W) of ``image`` (uint8 (H, W, C), already at the network's scale):
    its tiles as :func:`unet_deploy.images.image_io.to_input` makes them, through ``backend.run`` in batches of up
    to ``batch_size``."""
    run = TiledRun(backend, image, plan, batch_size)
    for i in range(len(run)):
        run.step(i)
    return run.result()


def whole_or_tiled(backend: Any, image: np.ndarray, scale: float, tiling: Tiling | None,
                   batch_size: int = 1) -> Any:
    """Logits (1, C, h, w) of one decoded image (uint8 (H, W, C)) at ``scale``: one network call on the
    whole image (exactly the untiled path) when ``tiling`` is None or the image fits in one tile, else
    :func:`tiled_logits`."""
    resized = resize_image(image, scale)
    if tiling is not None:
        plan = plan_tiles(resized.shape[0], resized.shape[1], tiling.tile, tiling.overlap)
        if plan.count > 1:
            return tiled_logits(backend, resized, plan, batch_size)
    return backend(to_input(resized)[None])


def choose_tiling(backend: Any, width: int, height: int, scale: float, *, tiling: Tiling | None, batch: int,
                  tta: bool, label: str, overlap: int | None = None, auto: bool = True,
                  notice: Callable[[str], None] | None = None) -> Tiling | None:
    """The tiling of a ``width`` x ``height`` image at ``scale``: ``tiling`` when given (its memory
    checked); else None when the whole image fits in the memory this process can get; else (``auto``) the
    largest tile that fits, announced in one ``notice`` line. Refuses (one-line UserError) what cannot fit
    either way (:func:`unet_deploy.runtime.resources.check_predict_memory`). A job likely to need more than 2 GB
    or a minute per image also gets one ``notice`` line with the estimate
    (:func:`unet_deploy.runtime.estimates.predict_estimate_line`)."""
    from unet_deploy.runtime.estimates import predict_estimate_line
    from unet_deploy.runtime.resources import auto_tile_side, check_predict_memory

    chosen: Tiling | None = tiling
    if tiling is not None:
        check_predict_memory(backend, width, height, scale, batch, tta, label, tile=tiling.tile)
    else:
        auto_side = auto_tile_side(backend, width, height, scale, batch, tta) if auto else None
        if auto_side is not None and auto_side[0] > 0:
            side, why = auto_side
            chosen = Tiling(side, min(default_overlap(side) if overlap is None else overlap, side // 2))
            if notice is not None:
                notice(f"notice: {label}: the whole {width}x{height} px image at scale {scale:g} {why}; predicting "
                       f"it in tiles of at most {side} px (as {chosen.flags()} would)")
        else:
            check_predict_memory(backend, width, height, scale, batch, tta, label, tiles_fit=auto_side is None)
    line = predict_estimate_line(backend, width, height, scale, batch, tta, chosen.tile if chosen else None, label)
    if line is not None and notice is not None:  # issue 25: a big job says so before it starts
        notice(line)
    return chosen
