"""Starting and stopping a server process: load the model, build the app, run uvicorn.

SIGTERM (or Ctrl-C): new requests get 503, uploads still arriving are cut (503), the admitted requests finish,
and the process exits 0, all within ``--grace-s``: what is still running just before then is answered 503
and dropped. A second signal stops it at once (exit 1, one line). When the batching task dies, ``/readyz``
answers 503, one line says why and the process stops with exit code 1 (``--workers`` starts a new one).
``--workers N``: :mod:`unet_deploy.serve.supervisor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import warnings
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import psutil
import uvicorn
from PIL import Image
from starlette.applications import Starlette

from unet_deploy.errors import UserError, first_line
from unet_deploy.predict import PredictOptions, output_values
from unet_deploy.runtime.backend_options import options_for_model
from unet_deploy.runtime.cpu_share import share_cores
from unet_deploy.runtime.loader import load_backend
from unet_deploy.runtime.ort_session import release_large_frees
from unet_deploy.runtime.registry import backend_for_path
from unet_deploy.serve.app import ServerState, build_app
from unet_deploy.serve.engine import WHOLE_MAX_PIXELS, Engine
from unet_deploy.serve.limits import Limits
from unet_deploy.serve.memory import memory_bound
from unet_deploy.serve.options import ServeOptions, max_batch_for
from unet_deploy.serve.prometheus import Metrics
from unet_deploy.serve.protocol import guarded_protocol

__all__ = ["load_state", "serve", "model_info", "DrainingServer", "uvicorn_config"]

#: uvicorn's own limit on an idle keep-alive connection (seconds; --read-timeout-s when that is shorter)
KEEP_ALIVE_S = 5


def model_info(engine: Engine, values: list[Any]) -> dict[str, Any]:
    """``GET /v1/model``: what the model is and how it runs (the model file's name, not where it is)."""
    be, opts = engine.backend, engine.options
    mc, inf = be.config.model, be.config.inference
    return {"classes": mc.n_classes, "mask_values": values, "scale": inf.scale, "threshold": inf.threshold,
            "architecture": mc.architecture, "channels": mc.n_channels, "bilinear": mc.bilinear,
            "source_sha256": be.config.source.get("sha256"), "model_file": be.path.name, "backend": be.name,
            "provider": be.provider, "precision": be.precision, "device": be.device,
            "max_batch": opts.max_batch, "crf_default": opts.crf,
            "crf_params": dataclasses.asdict(engine.crf_params) if engine.crf_params else None,
            "tta_default": opts.tta, "tile": opts.tile,
            "tile_overlap": engine.tiling.overlap if engine.tiling else None, "max_pixels": opts.max_pixels,
            "pixel_budget": opts.pixel_budget}


def load_state(options: ServeOptions) -> ServerState:
    """Load the model and build what the routes share (in the process that serves)."""
    # the server checks --max-pixels from each header itself: Pillow's own warning would only add noise
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    release_large_frees()  # a request's large arrays go back to the system when it is answered, any backend
    given = dict(options.backend_options)
    name = options.backend or backend_for_path(options.model)
    # --workers N: each process runs on its share of the cores (ONNX Runtime / OpenVINO threads, or torch's)
    given["threads"] = share_cores(name, options.device, options.workers, given.get("threads"))
    backend_opts = options_for_model(options.model, name, **given)
    be = load_backend(options.model, options.backend, options.device, backend_opts)
    max_batch = options.max_batch or max_batch_for(be.name, be.device)
    options = dataclasses.replace(options, max_batch=max_batch)
    worker = str(os.getpid()) if options.workers > 1 else "0"
    metrics = Metrics(worker, max_batch)
    engine = Engine(be, options, on_batch=metrics.observe_batch)
    metrics.track_queue(engine.waiting)
    values = output_values(be, PredictOptions())
    return ServerState(engine, metrics, options, model_info(engine, values), values, Limits(options))


def _app_for(state: ServerState, server: DrainingServer) -> Starlette:
    app = build_app(state)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = await state.engine.start()
        task.add_done_callback(server.batching_ended)
        _measure_bound(state)
        try:
            yield
        finally:
            server.stopped = True
            task.cancel()
            state.engine.close()

    app.router.lifespan_context = lifespan
    return app


def _measure_bound(state: ServerState) -> None:
    """The memory bound from the RSS now (the model loaded and warmed up): kept, and shown by /v1/model."""
    engine, opts = state.engine, state.options
    largest = max(WHOLE_MAX_PIXELS, (opts.tile or 0) ** 2)
    state.memory = memory_bound(engine.backend, opts, psutil.Process().memory_info().rss, largest)
    state.model_info["memory_bound_mib"] = round(state.memory.total / 2**20, 1)


def uvicorn_config(app: Starlette, options: ServeOptions) -> uvicorn.Config:
    """uvicorn's settings: headers bounded (:mod:`unet_deploy.serve.protocol`), idle keep-alive connections
    closed after :data:`KEEP_ALIVE_S`, our own logging and signal handling."""
    return uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False,
                          lifespan="on", http=guarded_protocol(options.read_timeout_s),
                          timeout_keep_alive=min(KEEP_ALIVE_S, options.read_timeout_s),  # type: ignore[arg-type]
                          timeout_graceful_shutdown=max(int(options.grace_s), 1))


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains within ``--grace-s`` and exits 0 instead of
    re-raising the signal; ``exit_code`` is what the process should end with."""

    def __init__(self, state: ServerState, announce: bool = True, parent: int | None = None):
        super().__init__(uvicorn_config(_app_for(state, self), state.options))
        self.state = state
        self.announce = announce
        self.parent = parent  #: a --workers process: drain when this process is no longer the parent
        self.loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0
        self.stopped = False

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.announce and self.started:
            _announce(self.state, self)

    async def on_tick(self, counter: int) -> bool:
        if self.parent is not None and os.getppid() != self.parent and not self.state.draining:
            self.handle_exit(signal.SIGTERM, None)  # the supervisor is gone: do not serve on alone
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.state
        if state.draining:  # a second signal: stop now, without a traceback
            print(f"stopped without draining ({state.admitted} requests were still admitted)", file=sys.stderr,
                  flush=True)
            os._exit(1)
        state.draining = True
        if self.loop is None:
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        """Uploads cut at once, admitted requests given ``--grace-s`` (what still runs just before the end is
        answered 503), then uvicorn closes the connections in what is left of it."""
        state, loop = self.state, asyncio.get_running_loop()
        state.stopping.set()
        deadline = loop.time() + state.options.grace_s
        cut_at = deadline - min(0.5, state.options.grace_s / 2)
        while (state.admitted or state.limits.uploads or state.engine.waiting()) and loop.time() < cut_at:
            await asyncio.sleep(0.02)
        state.cut.set()
        while (state.admitted or state.limits.uploads) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.config.timeout_graceful_shutdown = max(deadline - loop.time(), 0.05)  # type: ignore[assignment]
        self.should_exit = True

    def batching_ended(self, task: asyncio.Task[None]) -> None:
        """The batching task's end: expected on shutdown; otherwise one line, /readyz 503, exit code 1."""
        if self.stopped:
            return
        error = None if task.cancelled() else task.exception()
        reason = f"{type(error).__name__}: {first_line(error)}" if error is not None else "it returned"
        self.state.engine.fail(f"the batching task ended ({reason})")
        print(f"error: the batching task ended ({reason}); no request can be answered, so the server stops "
              "(exit code 1)", file=sys.stderr, flush=True)
        self.exit_code = 1
        self.should_exit = True


def _announce(state: ServerState, server: DrainingServer) -> None:
    opts = state.options
    port = opts.port
    with contextlib.suppress(Exception):
        port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{opts.host}:{port}"
    info = state.model_info
    print(f"serving {opts.model} ({info['backend']} {info['precision']} on {info['provider']}) at {url}/ "
          f"| max batch {opts.max_batch}, wait {opts.max_wait_ms:g} ms, queue {opts.queue}, upload "
          f"{opts.max_upload_mb:g} MB, timeout {opts.timeout_s:g} s, workers {opts.workers}, "
          f"auth {'token' if opts.token else 'none'} | Ctrl-C or SIGTERM drains and stops", flush=True)
    if state.memory is not None:
        print(state.memory.line(opts.pixel_budget), flush=True)
    if opts.crf and state.engine.crf_note:
        print(state.engine.crf_note, flush=True)


def log_access() -> None:
    """One line per request on stderr (the CLI's logging shows warnings only)."""
    log = logging.getLogger("unet_deploy.serve.access")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _check_port(host: str, port: int) -> None:
    """A one-line error, before the model loads, when the address cannot be listened on."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); pick another "
                        "--port (0: any free port) or stop the server that uses it") from None


def serve(options: ServeOptions) -> int:
    """Run the server until SIGTERM/SIGINT; the exit code (0 after a clean drain)."""
    _check_port(options.host, options.port)
    log_access()
    if options.workers == 1:
        server = DrainingServer(load_state(options))
        server.run()
        return server.exit_code
    from unet_deploy.serve.supervisor import supervise

    return supervise(options)
