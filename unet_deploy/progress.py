"""Progress bars (rich): shown on a terminal, quiet in logs and CI."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["TrainProgress", "file_progress", "console", "err_console"]

console = Console()
err_console = Console(stderr=True)


class TrainProgress:
    """Per-epoch bar with loss and img/s; a no-op when disabled or when stderr is no terminal."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Progress | None = None

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.1f} img/s"),
                TimeRemainingColumn(), console=err_console, transient=True)
            self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start_epoch(self, epoch: int, epochs: int, total: int) -> Any:
        if self._progress is None:
            return None
        return self._progress.add_task("train", total=total, epoch=f"{epoch}/{epochs}", loss=0.0, ips=0.0)

    def advance(self, task: Any, n: int, loss: float, ips: float) -> None:
        if self._progress is not None and task is not None:
            self._progress.update(task, advance=n, loss=loss, ips=ips)


def file_progress(enabled: bool = True) -> Progress:
    """A bar for runs over many files (predict, evaluate)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err_console, transient=True, disable=not (enabled and sys.stderr.isatty()))
