"""Loading: decoding input images on a few threads ahead of the network, in input order.

A job that already failed (planned with an ``error``), whose output a resumed run can reuse, or whose file
cannot be decoded becomes a :class:`Loaded` without an image; the stages after pass it on to its result.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_deploy.errors import UserError, first_line
from unet_deploy.images.image_io import load_image
from unet_deploy.predict.records import Job
from unet_deploy.predict.resume import read_existing

__all__ = ["Loaded", "ImageLoader", "ordered_map"]


@dataclass
class Loaded:
    """One job after loading: its decoded ``image``, or its ``error``, or the mask an earlier run left."""

    job: Job
    image: np.ndarray | None = None
    error: str | None = None
    skipped_mask: np.ndarray | None = None

    def decoded(self) -> np.ndarray:
        """The decoded image of a job that loaded (one with an error or a skipped mask has none)."""
        if self.image is None:
            raise ValueError(f"{self.job.path}: no decoded image ({self.error or 'output skipped'})")
        return self.image


class ImageLoader:
    """Turns a job into a :class:`Loaded` (thread-safe: it only reads files)."""

    def __init__(self, channels: int, values: Sequence[Any], skip_existing: bool, fingerprint: str):
        self.channels = channels
        self.values = values
        self.skip_existing = skip_existing
        self.fingerprint = fingerprint

    def __call__(self, job: Job) -> Loaded:
        if job.error:
            return Loaded(job, error=job.error)
        if self.skip_existing:
            existing = read_existing(job, self.values, self.fingerprint)
            if existing is not None:
                return Loaded(job, skipped_mask=existing)
        try:
            return Loaded(job, image=load_image(job.path, self.channels))
        except UserError as e:
            return Loaded(job, error=str(e))
        except (OSError, ValueError, MemoryError) as e:
            return Loaded(job, error=f"{job.path}: cannot read image ({first_line(e)})")


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``map(fn, items)`` on ``threads`` threads, in order, with a bounded read-ahead."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="unet-load") as pool:
        pending: collections.deque[cf.Future[Any]] = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
