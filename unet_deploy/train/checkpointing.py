"""Checkpoint writes during training: ``last.pth`` after every epoch, ``best.pth`` when validation dice
improves, ``interrupted.pth`` on Ctrl-C. Only rank 0 writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.errors import UserError
from unet_deploy.train.state import Progress, TrainRun

__all__ = ["ensure_writable_dir", "training_state", "save_epoch", "save_interrupted", "save_final_best"]


def ensure_writable_dir(folder: Path, flag: str) -> None:
    """Create ``folder`` now, so a bad output folder fails before hours of work, not after."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot create the folder ({e.strerror}); choose another path") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {folder}: folder is not writable; choose another path")


def training_state(run: TrainRun, progress: Progress, epoch_done: int) -> dict[str, Any]:
    """The ``training`` entry of a resumable checkpoint written at the end of epoch ``epoch_done``."""
    cfg = run.cfg
    return {"epoch": epoch_done, "best_dice": progress.best_dice, "global_step": progress.global_step,
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if hasattr(run.scheduler, "state_dict") else None,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()
                     if k != "hooks" and (v is None or isinstance(v, (int, float, str, bool, Path)))},
            **({"recipe": dict(cfg.recipe)} if cfg.recipe is not None else {})}


def save_epoch(run: TrainRun, progress: Progress, improved: bool) -> None:
    """End of an epoch: ``last.pth``, and ``best.pth`` too when it improved."""
    if run.env.main:
        save_checkpoint(run.last_path, run.model, run.deploy, training_state(run, progress, progress.epoch))
        if improved:
            save_checkpoint(run.best_path, run.model, run.deploy, training_state(run, progress, progress.epoch))


def save_interrupted(run: TrainRun, progress: Progress) -> None:
    """Ctrl-C: the unfinished epoch's weights to ``interrupted.pth``; say how to go on."""
    if not run.env.main:
        return
    # last.pth stays at the last finished epoch, so `-f last.pth` continues exactly; the weights
    # of the unfinished epoch go to interrupted.pth (usable for predict/export, not for resuming).
    epoch, partial, last_path = progress.epoch, run.interrupted_path, run.last_path
    save_checkpoint(partial, run.model, run.deploy, {"epoch": max(epoch - 1, 0), "interrupted_in_epoch": epoch,
                                                     "global_step": progress.global_step,
                                                     "best_dice": progress.best_dice})
    if last_path.exists():
        run.say(f"interrupted in epoch {epoch}: resume exactly with -f {last_path} (end of epoch "
                f"{epoch - 1}); the unfinished epoch's weights are in {partial}")
    else:
        run.say(f"interrupted in epoch {epoch} before any epoch finished: weights so far in {partial}; "
                "start again to train from scratch")


def save_final_best(run: TrainRun, progress: Progress) -> None:
    """No epoch improved (e.g. no validation split): ``best.pth`` is the last epoch's model."""
    if run.env.main and not run.best_path.exists() and run.last_path.exists():
        save_checkpoint(run.best_path, run.model, run.deploy, training_state(run, progress, progress.epoch))
