"""What bounds a server process's work and memory, whatever its clients do:

* uploads being received at once (``--max-uploads``): one more gets 503 before its body is read;
* requests admitted to the model queue (``--queue`` + ``--max-batch``): taken only once the body is in;
* decoded pixels (``--pixel-budget``): an image is admitted by the size its header states, before it is
  decoded, and its pixels stay counted until the last thread that works on it has returned, so memory
  freed late (a request answered 504 while its decode still runs) is still counted.

:class:`Jobs` runs one request's steps on the worker threads and knows when none is left running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from unet_deploy.serve.decode import HTTPError
from unet_deploy.serve.options import ServeOptions

__all__ = ["Limits", "Jobs", "busy"]

T = TypeVar("T")


def busy(message: str) -> HTTPError:
    """503 with ``Retry-After``. A body left unread must still arrive within ``--read-timeout-s``, or the
    connection is closed (:mod:`unet_deploy.serve.protocol`)."""
    return HTTPError(503, f"busy: {message}; retry shortly", {"Retry-After": "1"})


class Limits:
    """The counters of one server process (the event loop's thread only)."""

    def __init__(self, options: ServeOptions):
        self.options = options
        self.uploads = 0  #: requests receiving their body
        self.admitted = 0  #: requests past their upload, not yet answered
        self.pixels = 0  #: decoded pixels of admitted images whose work is not over

    @contextlib.contextmanager
    def uploading(self) -> Iterator[None]:
        """One upload being received; 503 (and the connection closed) when ``--max-uploads`` are."""
        if self.uploads >= self.options.max_uploads:
            raise busy(f"{self.uploads} uploads are being received (--max-uploads {self.options.max_uploads})")
        self.uploads += 1
        try:
            yield
        finally:
            self.uploads -= 1

    def queue_full(self) -> HTTPError | None:
        """The 503 of a full model queue, or None."""
        if self.admitted < self.options.capacity:
            return None
        return busy(f"{self.admitted} requests admitted (--queue {self.options.queue})")

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """One request in the model queue until it is answered; 503 when the queue is full."""
        refused = self.queue_full()
        if refused is not None:
            raise refused
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def reserve(self, jobs: Jobs, pixels: int) -> None:
        """Count ``pixels`` decoded pixels for ``jobs``'s request until its work is over (:meth:`Jobs.finish`);
        503 when they do not fit in what ``--pixel-budget`` has left."""
        budget = self.options.pixel_budget
        if self.pixels + pixels > budget:
            raise busy(f"the images in work hold {self.pixels:,} of {budget:,} decoded pixels (--pixel-budget) "
                       f"and this one has {pixels:,}")
        self.pixels += pixels
        jobs.on_over(lambda: self._release(pixels))

    def _release(self, pixels: int) -> None:
        self.pixels -= pixels


class Jobs:
    """One request's steps on worker threads (and processes). :meth:`run` awaits a step; when the request is
    cancelled (504, a client that left) a step already running still runs to its end, and the callbacks of
    :meth:`on_over` run once :meth:`finish` was called and no step is running any more."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.running = 0
        self.finished = False
        self.callbacks: list[Callable[[], None]] = []

    async def run(self, executor: cf.Executor, fn: Callable[..., T], *args: Any) -> T:
        future = executor.submit(fn, *args)
        self.running += 1
        future.add_done_callback(self._done_in_thread)
        return await asyncio.wrap_future(future)

    def _done_in_thread(self, _: cf.Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (the server stopped): nothing to release
            self.loop.call_soon_threadsafe(self._step_over)

    def _step_over(self) -> None:
        self.running -= 1
        self._maybe_over()

    def on_over(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        """The request is answered: once its last running step returns, its resources are released."""
        self.finished = True
        self._maybe_over()

    def _maybe_over(self) -> None:
        if self.finished and not self.running:
            callbacks, self.callbacks = self.callbacks, []
            for callback in callbacks:
                callback()
