"""One ``POST /v1/predict``, from its arrival to its answer, under one deadline (``--timeout-s`` from the
arrival: 504 within it, the work dropped):

upload (``--max-uploads`` at once, within ``--read-timeout-s``) -> admitted to the model queue (``--queue``)
-> the image's header (format, size) -> its decoded pixels admitted (``--pixel-budget``) -> decode -> the
model and post-processing (:class:`~unet_deploy.serve.engine.Engine`) -> the answer encoded.

A full queue is answered 503 at once, before the body is read, and again after it if the queue filled
meanwhile; every other refusal comes before the step it protects.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Awaitable, Callable
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from unet_deploy.images.overlay import overlay_image
from unet_deploy.images.postprocess import mask_values_image
from unet_deploy.images.rle import rle_encode
from unet_deploy.serve.decode import HTTPError, ImageHeader, decode_image, peek_size, probe_image, too_large
from unet_deploy.serve.engine import RequestSettings
from unet_deploy.serve.limits import Jobs
from unet_deploy.serve.upload import Deadlines, Upload, receive_upload

if TYPE_CHECKING:
    from unet_deploy.serve.app import ServerState

__all__ = ["FORMATS", "predict_request", "probe_upload", "refuse_early", "admitted", "within_deadline"]

FORMATS = ("png", "rle", "json", "overlay")
#: a file shorter than this is not a whole image whatever its first bytes claim: Pillow says what is wrong
PEEK_MIN_BYTES = 64
#: a request's steps after its upload: (upload, jobs) -> the answer
Work = Callable[[Upload, Jobs], Awaitable[Response]]


def _flag(request: Request, name: str) -> bool | None:
    text = request.query_params.get(name)
    if text is None or text == "":
        return None
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise HTTPError(400, f"{name}={text}: use 1/0 or true/false")


def _threshold(request: Request) -> float | None:
    text = request.query_params.get("threshold")
    try:
        return float(text) if text else None
    except ValueError:
        raise HTTPError(400, f"threshold={text}: use a number in [0, 1]") from None


def _encode(values: list[Any], fmt: str, image: np.ndarray, mask: np.ndarray, ms: float) -> Response:
    if fmt in ("png", "overlay"):
        pixels = mask_values_image(mask, values) if fmt == "png" else Image.fromarray(overlay_image(image, mask))
        buffer = io.BytesIO()
        pixels.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"X-Inference-Ms": f"{ms:.1f}"})
    rle = rle_encode(mask)
    if fmt == "rle":
        return Response(rle + "\n", media_type="text/plain", headers={"X-Inference-Ms": f"{ms:.1f}"})
    counts = np.bincount(mask.ravel(), minlength=len(values))
    return JSONResponse({"width": int(mask.shape[1]), "height": int(mask.shape[0]), "rle": rle,
                         "class_fractions": [round(float(c) / mask.size, 6) for c in counts],
                         "mask_values": values, "ms": round(ms, 1)})


async def probe_upload(state: ServerState, file: IO[bytes], size: int, jobs: Jobs) -> ImageHeader:
    """The header of an uploaded image file of ``size`` bytes, read before anything is decoded (415, 413, 400:
    :func:`~unet_deploy.serve.decode.probe_image`)."""
    max_pixels = state.options.max_pixels
    file.seek(0)
    peeked = peek_size(file.read(30))  # constant work: an oversized PNG/GIF/BMP/WebP refused here
    if peeked is not None and size >= PEEK_MIN_BYTES and peeked[0] * peeked[1] > max_pixels:
        raise too_large(*peeked, max_pixels)
    # Pillow on a thread even for a small file: a PNG's compressed text chunks alone may take milliseconds
    return await jobs.run(state.engine.cpu, probe_image, file, max_pixels, state.engine.scale)


async def _answer(state: ServerState, upload: Upload, fmt: str, settings: RequestSettings, jobs: Jobs) -> Response:
    """The steps after the upload, each admitted before it runs; ``jobs`` runs the thread steps."""
    engine, loop = state.engine, asyncio.get_running_loop()
    header = await probe_upload(state, upload.file, upload.size, jobs)
    state.limits.reserve(jobs, header.pixels)
    channels = engine.backend.config.model.n_channels
    image = await jobs.run(engine.cpu, decode_image, upload.file, channels, header)
    start = loop.time()
    mask = await engine.predict(image, settings, jobs)
    ms = (loop.time() - start) * 1000
    return await jobs.run(engine.cpu, _encode, state.values, fmt, image, mask, ms)


def refuse_early(state: ServerState) -> None:
    """503 at once, before anything of the request is read: the server is draining, or its queue is full."""
    if state.draining:
        raise HTTPError(503, "shutting down: send the request to another instance", {"Retry-After": "5"})
    refused = state.limits.queue_full()  # a full queue: 503 at once, the upload never read
    if refused is not None:
        raise refused


async def admitted(state: ServerState, request: Request, arrived: float, work: Work, *,
                   multipart: bool = True) -> Response:
    """The path of every prediction request once its parameters are checked (``/v1/predict`` and the Open
    Inference Protocol's ``infer``): the upload (``--max-uploads``, within ``--read-timeout-s``), a place in
    the model queue, then ``work(upload, jobs)`` within ``--timeout-s`` of ``arrived``.

    Args:
        state: the server's shared state.
        request: the request, its body not read yet.
        arrived: when it arrived (event-loop time).
        work: the steps after the upload; ``jobs`` runs their thread steps (the upload is closed, and the
            pixels reserved for them released, once the last of those has returned).
        multipart: a ``multipart/form-data`` body holds the file (field ``file``); else the body is taken raw.

    Returns:
        ``work``'s answer.
    """
    opts, limits = state.options, state.limits
    deadlines = Deadlines(arrived + opts.read_timeout_s, arrived + opts.timeout_s, opts.read_timeout_s,
                          opts.timeout_s, state.stopping)
    with limits.uploading():
        upload = await receive_upload(request, opts.max_upload_bytes, deadlines, multipart=multipart)
    jobs = Jobs()
    jobs.on_over(upload.close)
    try:
        with limits.admit():
            state.metrics.in_flight.labels(state.metrics.worker).inc()
            try:
                return await within_deadline(request, lambda: work(upload, jobs), deadlines.answer, opts.timeout_s,
                                             state.cut)
            finally:
                state.metrics.in_flight.labels(state.metrics.worker).dec()
    finally:
        jobs.finish()


async def predict_request(state: ServerState, request: Request) -> Response:
    """``POST /v1/predict``: see the module docstring."""
    arrived = asyncio.get_running_loop().time()
    refuse_early(state)
    fmt = request.query_params.get("format", "png")
    if fmt not in FORMATS:
        raise HTTPError(400, f"format={fmt}: use one of {', '.join(FORMATS)}")
    settings = state.engine.settings(_threshold(request), _flag(request, "crf"), _flag(request, "tta"))
    return await admitted(state, request, arrived, lambda upload, jobs: _answer(state, upload, fmt, settings, jobs))


async def within_deadline(request: Request, work: Callable[[], Awaitable[Response]], deadline: float,
                          timeout_s: float, cut: asyncio.Event) -> Response:
    """``work()``'s answer; 504 at ``deadline`` (event-loop time), 503 once ``cut`` is set (the end of the
    shutdown's grace); cancelled (its queued input dropped, its remaining steps never started) then or when
    the client leaves."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=min(0.05, max(deadline - loop.time(), 0)))
            if done:
                return task.result()
            if loop.time() >= deadline:
                raise HTTPError(504, f"not done within {timeout_s:g} s (--timeout-s) of its arrival; the server "
                                     "is overloaded")
            if cut.is_set():
                raise HTTPError(503, "shutting down: not finished within --grace-s; send it to another instance",
                                {"Retry-After": "5", "Connection": "close"})
            if await request.is_disconnected():
                raise HTTPError(499, "client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
