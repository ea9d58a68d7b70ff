"""SIGTERM handled as Ctrl-C: what a scheduler (Slurm, Kubernetes, systemd) sends to stop a job runs the same
clean-up as Ctrl-C (``predict`` keeps its journal and shuts its CRF workers down, ``train`` saves
``interrupted.pth``, atomic writes remove their temporary files), instead of the process vanishing mid-write.

:func:`sigterm_as_interrupt` makes SIGTERM raise :class:`KeyboardInterrupt` in the main thread;
:func:`exit_code` is 143 (128 + SIGTERM) after one, else 130 (Ctrl-C). Worker processes that their parent
manages (CRF, data loading) ignore both signals: the parent stops them; a CRF worker also ends when its
parent is gone (:func:`exit_with_parent`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType

__all__ = ["sigterm_as_interrupt", "exit_code", "ignore_stop_signals", "exit_with_parent"]

_received: list[int] = []


def _raise(sig: int, frame: FrameType | None) -> None:
    _received.append(sig)
    raise KeyboardInterrupt(f"signal {signal.Signals(sig).name}")


def sigterm_as_interrupt() -> None:
    """From now on, SIGTERM raises KeyboardInterrupt where it lands, as Ctrl-C does (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


def exit_code() -> int:
    """The exit code of an interrupted command: 143 after SIGTERM, 130 after Ctrl-C."""
    return 128 + signal.SIGTERM if signal.SIGTERM in _received else 130


def ignore_stop_signals() -> None:
    """In a worker process its parent manages: Ctrl-C and SIGTERM reach the parent, which stops the worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """In a worker process: end it within ``poll_s`` once its parent is gone (killed with SIGKILL, say), rather
    than live on as an orphan waiting for work that never comes."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
