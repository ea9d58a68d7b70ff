"""Optimizer and learning-rate schedule: built from the options or the training recipe, and restored from
a ``-f`` checkpoint (explicit flags given with ``-f`` win over the stored values)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from unet_deploy.errors import UserError
from unet_deploy.train.quality import merge_stored_recipe, options_from_record, recipe_hooks
from unet_deploy.train.train_config import TrainConfig

__all__ = ["build_optimizer", "build_scheduler", "apply_stored_recipe", "apply_recipe", "load_optimizer_state",
           "restore_progress", "schedule_name"]


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, foreach=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise UserError(f"--optimizer {cfg.optimizer}: use rmsprop, adamw or adam")


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> tuple[Any, bool]:
    """(scheduler, steps per batch?): the hooks' schedule over the whole run, else plateau on validation dice."""
    make_scheduler = cfg.hooks.get("scheduler")
    if make_scheduler is not None:
        return make_scheduler(optimizer, cfg.epochs * steps_per_epoch), True
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", patience=5), False


def schedule_name(cfg: TrainConfig) -> str:
    return (cfg.recipe or {}).get("schedule", "cosine" if cfg.hooks.get("scheduler") else "plateau")


def apply_stored_recipe(cfg: TrainConfig, resume: dict[str, Any], say: Callable[[str], None]) -> None:
    """-f resume: take the checkpoint's stored recipe, except for the flags given explicitly now."""
    if cfg.recipe is None or not resume.get("recipe"):
        return  # an API run without a recipe, or an older checkpoint: the given values apply
    cfg.recipe, changed = merge_stored_recipe(cfg.recipe, resume["recipe"], cfg.explicit)
    cfg.optimizer, cfg.learning_rate = cfg.recipe["optimizer"], cfg.recipe["learning_rate"]
    cfg.weight_decay = cfg.recipe["weight_decay"]
    say(f"resume: using the checkpoint's training recipe ({cfg.recipe['recipe']})"
        + (f"; overridden on the command line: {', '.join(changed)}" if changed else ""))


def apply_recipe(cfg: TrainConfig, say: Callable[[str], None]) -> None:
    """The recipe's hooks (augmentation, loss weights, schedule) into ``cfg.hooks``; one line describing it."""
    if cfg.recipe is None:
        return

    cfg.hooks, cfg.recipe = recipe_hooks(cfg.recipe, cfg.explicit, cfg.seed, cfg.max_steps, say)
    say(f"training options: recipe {cfg.recipe['recipe']}, {cfg.optimizer} lr {cfg.learning_rate:g} "
        f"weight decay {cfg.weight_decay:g}, {options_from_record(cfg.recipe).describe()}")


def load_optimizer_state(cfg: TrainConfig, resume: dict[str, Any], optimizer, scheduler) -> None:
    """Restore the optimizer/scheduler state; explicit -l / --weight-decay / --schedule given with -f win."""
    optimizer.load_state_dict(resume["optimizer"])
    stored = resume.get("recipe") or {}
    if resume.get("scheduler") and hasattr(scheduler, "load_state_dict") and not (
            "schedule" in cfg.explicit and stored.get("schedule") not in (None, schedule_name(cfg))):
        scheduler.load_state_dict(resume["scheduler"])
    for g in optimizer.param_groups:
        if "learning_rate" in cfg.explicit:  # keep the schedule's progress, rescaled to the new base rate
            base = g.get("initial_lr", g["lr"])
            g["lr"] = cfg.learning_rate * (g["lr"] / base if base > 0 else 1.0)
            g["initial_lr"] = cfg.learning_rate
        if "weight_decay" in cfg.explicit:
            g["weight_decay"] = cfg.weight_decay
    if "learning_rate" in cfg.explicit and hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)


def restore_progress(cfg: TrainConfig, resume: dict[str, Any] | None, loaded: Any, optimizer, scheduler,
                     say: Callable[[str], None]) -> tuple[int, float, int]:
    """(first epoch, best dice so far, optimizer steps so far): a resumed run's, else a fresh start's."""
    if resume is not None:
        load_optimizer_state(cfg, resume, optimizer, scheduler)
        start_epoch = int(resume.get("epoch", 0)) + 1
        best_dice = float(resume.get("best_dice", -1.0))
        global_step = int(resume.get("global_step", 0))
        say(f"resuming from {cfg.load} at epoch {start_epoch} (best dice so far {best_dice:.4f})")
        return start_epoch, best_dice, global_step
    if loaded is not None:
        say(f"fine-tuning from {cfg.load} ({loaded.kind} weights, fresh optimizer)")
    return 1, -1.0, 0
