"""Starting the server: load the model, build the app, run uvicorn with draining on SIGTERM.

SIGTERM (or Ctrl-C): new requests get 503, the queued and running ones finish, then the process exits 0; a
second signal stops it at once (exit 1, one line), and after ``grace_s`` it stops whatever is left.
``--workers N`` runs N processes behind one port, each loading its own model with its own queue and metrics.
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
import time
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from ..backend_options import options_for_model
from ..backends import load_backend
from ..errors import UserError
from ..predict import PredictOptions, output_values
from .app import ServerState, build_app
from .engine import Engine
from .metrics import Metrics
from .options import OPTIONS_ENV, ServeOptions, max_batch_for

__all__ = ["load_state", "create_app", "serve", "model_info"]

_STATES: list[ServerState] = []  #: the state of this process's app (the server drains it on SIGTERM)


def model_info(engine: Engine, values: list[Any]) -> dict[str, Any]:
    """``GET /v1/model``: what the model is and how it runs."""
    be = engine.backend
    mc, inf = be.config.model, be.config.inference
    return {"classes": mc.n_classes, "mask_values": values, "scale": inf.scale, "threshold": inf.threshold,
            "architecture": mc.architecture, "channels": mc.n_channels, "bilinear": mc.bilinear,
            "source_sha256": be.config.source.get("sha256"), "model_file": str(be.path), "backend": be.name,
            "provider": be.provider, "precision": be.precision, "device": be.device,
            "max_batch": engine.options.max_batch, "crf_default": engine.options.crf,
            "tta_default": engine.options.tta, "tile": engine.options.tile,
            "tile_overlap": engine.tiling.overlap if engine.tiling else None}


def load_state(options: ServeOptions) -> ServerState:
    """Load the model and build what the routes share (in the process that serves)."""
    backend_opts = options_for_model(options.model, options.backend, **options.backend_options)
    be = load_backend(options.model, options.backend, options.device, backend_opts)
    max_batch = options.max_batch or max_batch_for(be.name, be.device)
    options = dataclasses.replace(options, max_batch=max_batch)
    worker = str(os.getpid()) if options.workers > 1 else "0"
    metrics = Metrics(worker, max_batch)
    engine = Engine(be, options, on_batch=metrics.observe_batch)
    metrics.track_queue(engine.waiting)
    values = output_values(be, PredictOptions())
    return ServerState(engine, metrics, options, model_info(engine, values), values)


def _app_for(state: ServerState) -> Starlette:
    app = build_app(state)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        task = await state.engine.start()
        try:
            yield
        finally:
            task.cancel()
            state.engine.close()

    app.router.lifespan_context = lifespan
    _STATES.append(state)
    return app


def create_app() -> Starlette:
    """The app of one ``--workers`` process (uvicorn's factory): options from the environment."""
    _log_access()
    return _app_for(load_state(ServeOptions.from_env()))


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains (503 for new requests, the admitted ones
    finish) and the process then exits 0 instead of re-raising the signal."""

    def __init__(self, config: uvicorn.Config, announce: bool = True):
        super().__init__(config)
        self.announce = announce
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.announce and self.started and _STATES:
            _announce(_STATES[-1], self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = _STATES[-1] if _STATES else None
        if state is not None and state.draining:  # a second signal: stop now, without a traceback
            print(f"stopped without draining ({state.admitted} requests were still admitted)", file=sys.stderr,
                  flush=True)
            os._exit(1)
        if state is None or self.loop is None:
            self.should_exit = True
            return
        state.draining = True
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain(state)))

    async def _drain(self, state: ServerState) -> None:
        deadline = time.monotonic() + state.options.grace_s
        while (state.admitted or state.engine.waiting()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.should_exit = True


def _announce(state: ServerState, server: DrainingServer) -> None:
    opts = state.options
    port = opts.port
    with contextlib.suppress(Exception):
        port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://{opts.host}:{port}"
    info = state.model_info
    print(f"serving {info['model_file']} ({info['backend']} {info['precision']} on {info['provider']}) at {url}/ "
          f"| max batch {opts.max_batch}, wait {opts.max_wait_ms:g} ms, queue {opts.queue}, upload "
          f"{opts.max_upload_mb:g} MB, timeout {opts.timeout_s:g} s, workers {opts.workers}, "
          f"auth {'token' if opts.token else 'none'} | Ctrl-C or SIGTERM drains and stops", flush=True)


def _log_access() -> None:
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
    _log_access()
    common: dict[str, Any] = {"host": options.host, "port": options.port, "log_level": "warning",
                              "access_log": False, "timeout_graceful_shutdown": options.grace_s,
                              "lifespan": "on"}
    if options.workers == 1:
        config = uvicorn.Config(_app_for(load_state(options)), **common)
        DrainingServer(config).run()
        return 0
    return _supervise(options, common)


def _supervise(options: ServeOptions, common: dict[str, Any]) -> int:
    """``--workers N``: bind the port here, run N spawned server processes on it, pass SIGTERM on to them
    (Ctrl-C reaches them from the terminal), and exit 0 when every one drained cleanly."""
    from uvicorn._subprocess import get_subprocess  # uvicorn's own spawn helper (it passes the socket on)

    os.environ[OPTIONS_ENV] = options.to_env()
    config = uvicorn.Config("unet_deploy.serve.run:create_app", factory=True, **common)
    sock = config.bind_socket()
    print(f"serving {options.model} at http://{options.host}:{sock.getsockname()[1]}/ with {options.workers} "
          "worker processes, each with its own model, queue and metrics", flush=True)
    workers = [get_subprocess(config, DrainingServer(config, announce=False).run, [sock])
               for _ in range(options.workers)]
    for w in workers:
        w.start()

    forwarded: list[int] = []

    def forward(sig: int, frame: FrameType | None) -> None:
        if forwarded:  # once: a second signal to a worker would stop it without draining
            return
        forwarded.append(sig)
        for w in workers:
            if w.is_alive() and w.pid is not None:
                os.kill(w.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for w in workers:
        w.join()
    return 0 if all(w.exitcode == 0 for w in workers) else 1
