"""The state a training run carries through its steps: what it trains with (:class:`TrainRun`, fixed
once set up) and how far it got (:class:`Progress`, updated by every step)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_deploy.config import DeployConfig, ModelConfig
from unet_deploy.distributed import DistEnv
from unet_deploy.train.loaders import TrainData
from unet_deploy.train.train_config import TrainConfig

__all__ = ["TrainRun", "Progress"]


@dataclass
class TrainRun:
    """Everything one run trains with: the options, this process, the model, its optimizer and the data."""

    cfg: TrainConfig
    env: DistEnv
    device: str
    say: Callable[[str], None]
    model_cfg: ModelConfig
    data: TrainData
    model: nn.Module  # the U-Net itself: what is validated and saved
    net: nn.Module  # what the training step calls: ``model``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step_per_batch: bool  # the scheduler steps per batch (recipe schedules), else per epoch (plateau)
    scaler: torch.amp.GradScaler
    deploy: DeployConfig  # stored in every checkpoint
    ckpt_dir: Path

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pth"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pth"

    @property
    def interrupted_path(self) -> Path:
        return self.ckpt_dir / "interrupted.pth"


@dataclass
class Progress:
    """How far training got: ``epoch`` is the one running (or, before the first, the one before it)."""

    epoch: int
    best_dice: float
    global_step: int
    images_seen: int = 0
    train_time: float = 0.0
    last_dice: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images_seen / max(self.train_time, 1e-9)

    def out_of_steps(self, cfg: TrainConfig) -> bool:
        """``--max-steps`` reached."""
        return bool(cfg.max_steps and self.global_step >= cfg.max_steps)
