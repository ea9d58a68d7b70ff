"""``--workers N``: N server processes on one listening socket, each with its own model, queue and metrics.

This process binds the port and starts N spawned workers (``multiprocessing``; the socket is passed to each),
each in its own session, so a Ctrl-C in the terminal reaches this process only. It then:

* restarts a worker that dies (a crash, a dead batching task, the OOM killer) after a backoff of 1 s, doubled
  after each quick death up to :data:`MAX_BACKOFF_S`, back to 1 s once a worker has lived a minute; a worker
  that ends with exit code 2 (a user error: the model file, a flag) is not restarted: the server stops;
* passes the first SIGTERM or SIGINT on to every worker as SIGTERM (each drains within ``--grace-s``) and
  exits 0 when every one drained cleanly; a second signal of either kind stops them all at once (exit 1).

A worker whose supervisor is gone drains and exits (:class:`~unet_deploy.serve.server.DrainingServer`).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

from unet_deploy.serve.options import ServeOptions

__all__ = ["supervise", "MAX_BACKOFF_S"]

MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  #: a worker that lived this long resets the backoff
USER_ERROR = 2


def _worker(options: ServeOptions, sock: socket.socket, parent: int) -> None:
    """One worker process: its own session (terminal signals go to the supervisor), model, app and server."""
    os.setsid()
    from unet_deploy.errors import UserError
    from unet_deploy.serve.server import DrainingServer, load_state, log_access

    log_access()
    try:
        server = DrainingServer(load_state(options), announce=False, parent=parent)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR)
    server.run(sockets=[sock])
    sys.exit(server.exit_code)


@dataclass
class _Slot:
    """One worker place: its process, when it started, and when a dead one may start again."""

    process: BaseProcess | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = 0.0  #: None: not to be restarted
    exit_codes: list[int] = field(default_factory=list)


class _Supervisor:
    def __init__(self, options: ServeOptions, sock: socket.socket):
        self.options, self.sock = options, sock
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot() for _ in range(options.workers)]
        self.signals: list[int] = []
        self.gave_up = False

    def _start(self, slot: _Slot) -> None:
        process = self.context.Process(target=_worker, args=(self.options, self.sock, os.getpid()),
                                       name="unet-deploy-serve-worker")
        process.start()
        slot.process, slot.started, slot.restart_at = process, time.monotonic(), None

    def _reap(self, slot: _Slot, now: float) -> None:
        """A worker that ended: schedule its restart (not while stopping, not after a user error)."""
        assert slot.process is not None
        code = slot.process.exitcode if slot.process.exitcode is not None else -1
        slot.exit_codes.append(code)
        pid, slot.process = slot.process.pid, None
        if self.signals:
            return
        if code == USER_ERROR:
            print(f"worker {pid} stopped on a user error (exit code {code}); stopping the server", file=sys.stderr,
                  flush=True)
            self.gave_up = True
            self.on_signal(signal.SIGTERM, None)
            return
        lived = now - slot.started
        if lived >= STABLE_S:
            slot.backoff = 1.0
        wait, slot.backoff = slot.backoff, min(slot.backoff * 2, MAX_BACKOFF_S)
        print(f"worker {pid} ended with exit code {code} after {lived:.0f} s; starting a new one in {wait:g} s",
              file=sys.stderr, flush=True)
        slot.restart_at = now + wait

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        forward = signal.SIGTERM  # the first drains; the second makes each worker stop at once
        for slot in self.slots:
            if slot.process is not None and slot.process.is_alive() and slot.process.pid is not None:
                os.kill(slot.process.pid, forward)
        if len(self.signals) > 1:
            print("stopping every worker now (second signal)", file=sys.stderr, flush=True)

    def run(self) -> int:
        while True:
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and not slot.process.is_alive():
                    slot.process.join()
                    self._reap(slot, now)
                if slot.process is None and slot.restart_at is not None and now >= slot.restart_at \
                        and not self.signals:
                    self._start(slot)
            if self.signals and all(s.process is None for s in self.slots):
                break
            time.sleep(0.1)
        if self.gave_up:
            return USER_ERROR
        last = [s.exit_codes[-1] if s.exit_codes else 0 for s in self.slots]
        return 0 if len(self.signals) == 1 and all(code == 0 for code in last) else 1


def supervise(options: ServeOptions) -> int:
    """Run ``options.workers`` server processes until SIGTERM/SIGINT; the exit code (0 after a clean drain)."""
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((options.host, options.port))
    sock.set_inheritable(True)
    print(f"serving {options.model} at http://{options.host}:{sock.getsockname()[1]}/ with {options.workers} "
          "worker processes, each with its own model, queue and metrics | Ctrl-C or SIGTERM drains and stops",
          flush=True)
    supervisor = _Supervisor(options, sock)
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        return supervisor.run()
    finally:
        sock.close()
