"""The HTTP application (Starlette): routes, auth, request ids, errors and the access log; a prediction's
path and its limits are :mod:`unet_deploy.serve.pipeline`'s.

Every answer carries ``X-Request-ID``; every error is ``{"error": "<one line>"}`` with its status code.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from unet_deploy.serve.decode import HTTPError
from unet_deploy.serve.engine import Engine
from unet_deploy.serve.limits import Limits
from unet_deploy.serve.memory import MemoryBound
from unet_deploy.serve.oip import oip_routes
from unet_deploy.serve.options import ServeOptions
from unet_deploy.serve.page import PAGE
from unet_deploy.serve.pipeline import FORMATS, predict_request
from unet_deploy.serve.prometheus import CONTENT_TYPE, Metrics

__all__ = ["ServerState", "build_app", "FORMATS"]

access_log = logging.getLogger("unet_deploy.serve.access")
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
    limits: Limits
    draining: bool = False
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  #: set on shutdown: uploads are cut
    cut: asyncio.Event = field(default_factory=asyncio.Event)  #: set at the end of --grace-s: the rest too
    memory: MemoryBound | None = None  #: measured once the model is warm
    started: float = field(default_factory=time.time)

    @property
    def admitted(self) -> int:
        return self.limits.admitted

    def unready(self) -> str | None:
        """Why the server cannot take predictions now (``/readyz`` and ``/v2/health/ready``), or None."""
        if self.engine.broken is not None:
            return f"broken: {self.engine.broken}"
        if self.draining:
            return "shutting down"
        if not self.engine.ready:
            return "warming up: the model has not answered yet"
        return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _authorized(state: ServerState, request: Request) -> bool:
    if state.options.token is None:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.options.token.encode())


def endpoint(state: ServerState, name: str, handler: Handler, *, auth: bool = True, protocol: str = "v1") -> Handler:
    """Wrap a route: request id, auth (401), errors as one-line JSON, metrics (labelled by ``protocol``) and the
    access log."""

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
        state.metrics.observe_request(name, response.status_code, seconds, protocol)
        client = request.client.host if request.client else "-"
        access_log.info('%s %s "%s %s" %d %s %.1fms', request_id, client, request.method, request.url.path,
                        response.status_code, response.headers.get("content-length", "-"), seconds * 1000)
        return response

    return wrapped


def build_app(state: ServerState) -> Starlette:
    """The routes: ``/`` (page), ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/model``, ``POST /v1/predict``, and
    the Open Inference Protocol's ``/v2`` routes (:mod:`unet_deploy.serve.oip`)."""

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive", "uptime_s": round(time.time() - state.started, 1)})

    async def readyz(request: Request) -> Response:
        reason = state.unready()
        return _error(503, reason) if reason else JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def model(request: Request) -> Response:
        return Response(json.dumps(state.model_info, indent=2), media_type="application/json")

    async def predict(request: Request) -> Response:
        return await predict_request(state, request)

    routes = [Route("/", endpoint(state, "page", page, auth=False)),
              Route("/healthz", endpoint(state, "healthz", healthz, auth=False)),
              Route("/readyz", endpoint(state, "readyz", readyz, auth=False)),
              Route("/metrics", endpoint(state, "metrics", metrics)),
              Route("/v1/model", endpoint(state, "model", model)),
              Route("/v1/predict", endpoint(state, "predict", predict), methods=["POST"]),
              *oip_routes(state, endpoint)]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "no such endpoint" if status == 404 else f"{request.method} is not allowed here"
        return _error(status, f"{message}: {request.url.path} (see GET / for the page, POST /v1/predict, "
                              f"POST /v2/models/{state.options.model_name}/infer)")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
