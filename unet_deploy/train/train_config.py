"""What to train (:class:`TrainConfig`), what training returns (:class:`TrainResult`), and the one-line
checks of the option values."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unet_deploy.distributed import DistEnv
from unet_deploy.errors import UserError
from unet_deploy.images.image_io import Pair

__all__ = ["TrainConfig", "TrainResult", "check_config"]


@dataclass
class TrainConfig:
    data: Path = Path("data")
    images_dir: Path | None = None
    masks_dir: Path | None = None
    mask_suffix: str = "_mask"
    epochs: int = 5
    batch_size: int = 1
    learning_rate: float = 1e-5
    load: Path | None = None
    scale: float = 0.5
    validation: float = 10.0
    n_classes: int = 2
    bilinear: bool = False
    base_channels: int = 64
    amp: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    checkpoint_dir: Path = Path("checkpoints")
    optimizer: str = "rmsprop"  # rmsprop (Pytorch-UNet's), adamw, adam
    weight_decay: float = 1e-8
    momentum: float = 0.999
    grad_clip: float = 1.0
    sync_bn: bool = False
    channels_last: bool = False
    progress: bool = True
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests, experiments)
    hooks: dict[str, Any] = field(default_factory=dict)  # transform / extras / loss_weight / scheduler
    explicit: tuple[str, ...] = ()  # fields/flags the user set on the command line (checked against -f)
    # the training recipe (unet_deploy.train.quality.resolve_recipe): when set, the optimizer, learning rate,
    # weight decay and the hooks come from it; stored in checkpoints, and taken from them on -f resume
    # (flags named in ``explicit`` win)
    recipe: dict[str, Any] | None = None

    @property
    def imgs(self) -> Path:
        return Path(self.images_dir) if self.images_dir else Path(self.data) / "imgs"

    @property
    def masks(self) -> Path:
        return Path(self.masks_dir) if self.masks_dir else Path(self.data) / "masks"


@dataclass
class TrainResult:
    best_dice: float
    last_dice: float
    epochs_run: int
    images_per_second: float
    best_path: Path
    last_path: Path
    history: list[dict[str, float]]
    interrupted: bool = False
    val_pairs: list[Pair] = field(default_factory=list)  #: the validation images (``--crf auto`` uses them)


def check_config(cfg: TrainConfig, env: DistEnv) -> None:
    """One-line errors for option values that would otherwise fail deep inside torch."""
    if cfg.epochs < 1:
        raise UserError(f"-e/--epochs {cfg.epochs}: must be >= 1")
    if cfg.batch_size < 1 or cfg.batch_size % env.world:
        raise UserError(f"-b/--batch-size {cfg.batch_size}: must be a positive multiple of the "
                        f"{env.world} processes (it is the global batch)")
    if cfg.learning_rate <= 0:
        raise UserError(f"-l/--learning-rate {cfg.learning_rate}: must be > 0")
    if not 0 < cfg.scale <= 4:
        raise UserError(f"-s/--scale {cfg.scale}: must be in (0, 4]")
    if cfg.n_classes < 1:
        raise UserError(f"-c/--classes {cfg.n_classes}: must be >= 1 (1 = one sigmoid output)")
    if cfg.base_channels < 2 or cfg.base_channels % 2:
        raise UserError(f"--base-channels {cfg.base_channels}: must be an even number >= 2 (64 = Pytorch-UNet)")
    if cfg.workers < 0:
        raise UserError(f"--workers {cfg.workers}: must be >= 0")
    if not 0 <= cfg.validation < 100:
        raise UserError(f"-v/--validation {cfg.validation}: must be a percentage in [0, 100)")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise UserError(f"--max-steps {cfg.max_steps}: must be >= 1")
