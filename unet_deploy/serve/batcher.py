"""Dynamic micro-batching: concurrent requests whose network inputs share a shape (and TTA setting) run as
one batch of up to ``max_batch``, the first waiting at most ``max_wait_s`` for the others.

The model runs on one dedicated thread, never on the event loop. A request whose client went away or timed
out is cancelled: if it is still queued it is dropped before its batch runs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["MicroBatcher"]

#: runs one batch: (float32 (N, C, h, w) inputs, tta) -> logits (N, K, h, w)
RunBatch = Callable[[np.ndarray, bool], Any]


@dataclass
class _Work:
    x: np.ndarray  #: one preprocessed input (C, h, w)
    tta: bool
    future: asyncio.Future[Any]
    queued_at: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple[tuple[int, ...], bool]:
        return self.x.shape, self.tta


class MicroBatcher:
    """Collects submitted inputs into batches and runs them one batch at a time on ``executor``."""

    def __init__(self, run_batch: RunBatch, max_batch: int, max_wait_s: float, executor: cf.Executor,
                 on_batch: Callable[[int], None] | None = None):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.executor = executor
        self.on_batch = on_batch or (lambda size: None)
        self.waiting: collections.deque[_Work] = collections.deque()
        self.wakeup = asyncio.Event()
        self.running = 0  #: inputs in the batch now on the model

    def submit(self, x: np.ndarray, tta: bool) -> asyncio.Future[Any]:
        """Queue one input; the future resolves to its logits (a batch of one)."""
        work = _Work(x, tta, asyncio.get_running_loop().create_future())
        self.waiting.append(work)
        self.wakeup.set()
        return work.future

    def _drop_cancelled(self) -> None:
        self.waiting = collections.deque(w for w in self.waiting if not w.future.done())

    def _take(self) -> list[_Work]:
        """Up to ``max_batch`` waiting inputs with the first one's key, in arrival order."""
        key = self.waiting[0].key
        batch = [w for w in self.waiting if w.key == key][:self.max_batch]
        taken = {id(w) for w in batch}
        self.waiting = collections.deque(w for w in self.waiting if id(w) not in taken)
        return batch

    def _ready(self) -> bool:
        key = self.waiting[0].key
        same = sum(1 for w in self.waiting if w.key == key)
        waited = time.perf_counter() - self.waiting[0].queued_at
        return same >= self.max_batch or waited >= self.max_wait_s

    async def run(self) -> None:
        """The batching loop (one task per server process)."""
        while True:
            self._drop_cancelled()
            if not self.waiting:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            if not self._ready():
                self.wakeup.clear()
                remaining = self.max_wait_s - (time.perf_counter() - self.waiting[0].queued_at)
                try:
                    await asyncio.wait_for(self.wakeup.wait(), timeout=max(remaining, 0.0))
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run(self._take())

    async def _run(self, batch: list[_Work]) -> None:
        self.running = len(batch)
        self.on_batch(len(batch))
        inputs = np.stack([w.x for w in batch])
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self.executor, self.run_batch, inputs,
                                                                      batch[0].tta)
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the error, the loop goes on
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
        else:
            for i, w in enumerate(batch):
                if not w.future.done():
                    w.future.set_result(logits[i:i + 1])
        finally:
            self.running = 0
