"""The HTTP application (Starlette): routes, admission control, auth, request ids, errors and the access log.

Every answer carries ``X-Request-ID``; every error is ``{"error": "<one line>"}`` with its status code.
A prediction is admitted only while fewer than ``queue + max_batch`` are admitted (else 503 with
``Retry-After`` before its body is read), so memory stays bounded whatever the number of clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..predict.overlay import overlay_image
from ..predict.write import mask_values_image
from ..rle import rle_encode
from .decode import HTTPError, decode_image
from .engine import Engine
from .metrics import CONTENT_TYPE, Metrics
from .options import ServeOptions
from .page import PAGE

__all__ = ["ServerState", "build_app", "FORMATS"]

access_log = logging.getLogger("unet_deploy.serve.access")
FORMATS = ("png", "rle", "json", "overlay")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class ServerState:
    """What the routes share in one server process."""

    engine: Engine
    metrics: Metrics
    options: ServeOptions
    model_info: dict[str, Any]
    values: list[Any]
    draining: bool = False
    admitted: int = 0
    started: float = field(default_factory=time.time)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _authorized(state: ServerState, request: Request) -> bool:
    if state.options.token is None:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.options.token.encode())


def endpoint(state: ServerState, name: str, handler: Handler, *, auth: bool = True) -> Handler:
    """Wrap a route: request id, auth (401), errors as one-line JSON, metrics and the access log."""

    async def wrapped(request: Request) -> Response:
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        start = time.perf_counter()
        try:
            if auth and not _authorized(state, request):
                response: Response = _error(401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                            {"WWW-Authenticate": "Bearer"})
            else:
                response = await handler(request)
        except HTTPError as e:
            response = _error(e.status, e.message, e.headers)
        except Exception as e:  # noqa: BLE001 - one bad request never takes the server down
            logging.getLogger(__name__).exception("request %s failed", request_id)
            response = _error(500, f"internal error ({type(e).__name__}); see the server log, request {request_id}")
        seconds = time.perf_counter() - start
        response.headers["X-Request-ID"] = request_id
        response.headers["X-Response-Ms"] = f"{seconds * 1000:.1f}"  # time in the handler, upload included
        state.metrics.observe_request(name, response.status_code, seconds)
        client = request.client.host if request.client else "-"
        access_log.info('%s %s "%s %s" %d %s %.1fms', request_id, client, request.method, request.url.path,
                        response.status_code, response.headers.get("content-length", "-"), seconds * 1000)
        return response

    return wrapped


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPError(413, f"upload of {int(length):,} bytes is over the limit of {limit:,} (--max-upload-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"upload is over the limit of {limit:,} bytes (--max-upload-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _upload(request: Request, limit: int) -> bytes:
    """The image bytes: the multipart field ``file`` (or the first file), or the raw body."""
    body = await _read_body(request, limit)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=8) as form:
            item = form.get("file") or next((v for v in form.values() if hasattr(v, "read")), None)
            if item is None or not hasattr(item, "read"):
                raise HTTPError(400, "multipart upload without a file: send the image as field 'file'")
            return bytes(await item.read())
    except HTTPError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed multipart body is the client's error
        raise HTTPError(400, f"malformed multipart body ({type(e).__name__})") from None


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


def _encode(state: ServerState, fmt: str, image: np.ndarray, mask: np.ndarray, ms: float) -> Response:
    if fmt in ("png", "overlay"):
        pixels = mask_values_image(mask, state.values) if fmt == "png" else Image.fromarray(overlay_image(image, mask))
        buffer = io.BytesIO()
        pixels.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png", headers={"X-Inference-Ms": f"{ms:.1f}"})
    rle = rle_encode(mask)
    if fmt == "rle":
        return Response(rle + "\n", media_type="text/plain", headers={"X-Inference-Ms": f"{ms:.1f}"})
    counts = np.bincount(mask.ravel(), minlength=len(state.values))
    return JSONResponse({"width": int(mask.shape[1]), "height": int(mask.shape[0]), "rle": rle,
                         "class_fractions": [round(float(c) / mask.size, 6) for c in counts],
                         "mask_values": state.values, "ms": round(ms, 1)})


async def _predict(state: ServerState, request: Request) -> Response:
    opts = state.options
    if state.draining:
        raise HTTPError(503, "shutting down: send the request to another instance", {"Retry-After": "5"})
    if state.admitted >= opts.capacity:
        raise HTTPError(503, f"busy: {state.admitted} requests admitted (--queue {opts.queue}); retry shortly",
                        {"Retry-After": "1"})
    fmt = request.query_params.get("format", "png")
    if fmt not in FORMATS:
        raise HTTPError(400, f"format={fmt}: use one of {', '.join(FORMATS)}")
    state.admitted += 1
    state.metrics.in_flight.labels(state.metrics.worker).inc()
    try:
        settings = state.engine.settings(_threshold(request), _flag(request, "crf"), _flag(request, "tta"))
        data = await _upload(request, opts.max_upload_bytes)
        loop = asyncio.get_running_loop()
        channels = state.engine.backend.config.model.n_channels
        image = await loop.run_in_executor(state.engine.cpu, decode_image, data, channels, opts.max_pixels)
        del data
        start = time.perf_counter()
        mask = await _within_deadline(request, state.engine.predict(image, settings), opts.timeout_s)
        ms = (time.perf_counter() - start) * 1000
        return await loop.run_in_executor(state.engine.cpu, _encode, state, fmt, image, mask, ms)
    finally:
        state.admitted -= 1
        state.metrics.in_flight.labels(state.metrics.worker).dec()


async def _within_deadline(request: Request, work: Awaitable[np.ndarray], timeout_s: float) -> np.ndarray:
    """``work``'s result; 504 past ``timeout_s``; cancelled (its queued input dropped) when the client leaves."""
    task = asyncio.ensure_future(work)
    deadline = time.perf_counter() + timeout_s
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=min(0.05, max(deadline - time.perf_counter(), 0)))
            if done:
                return task.result()
            if time.perf_counter() >= deadline:
                raise HTTPError(504, f"not done within {timeout_s:g} s (--timeout-s); the server is overloaded")
            if await request.is_disconnected():
                raise HTTPError(499, "client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def build_app(state: ServerState) -> Starlette:
    """The routes: ``/`` (page), ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/model``, ``POST /v1/predict``."""

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive", "uptime_s": round(time.time() - state.started, 1)})

    async def readyz(request: Request) -> Response:
        if state.draining:
            return _error(503, "shutting down")
        if not state.engine.ready:
            return _error(503, "warming up: the model has not answered yet")
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def model(request: Request) -> Response:
        return Response(json.dumps(state.model_info, indent=2), media_type="application/json")

    async def predict(request: Request) -> Response:
        return await _predict(state, request)

    routes = [Route("/", endpoint(state, "page", page, auth=False)),
              Route("/healthz", endpoint(state, "healthz", healthz, auth=False)),
              Route("/readyz", endpoint(state, "readyz", readyz, auth=False)),
              Route("/metrics", endpoint(state, "metrics", metrics)),
              Route("/v1/model", endpoint(state, "model", model)),
              Route("/v1/predict", endpoint(state, "predict", predict), methods=["POST"])]
    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such endpoint" if status == 404 else f"{request.method} is not allowed here"
        return _error(status, f"{message}: {request.url.path} (see GET / for the page, POST /v1/predict)")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
