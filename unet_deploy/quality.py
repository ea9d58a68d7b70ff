"""Training-quality options (augmentation, edge-weighted loss, LR schedule) as ``TrainConfig.hooks``.

``unet-deploy train`` and ``unet-deploy experiment`` both describe a run with :class:`QualityOptions`
and hand :meth:`QualityOptions.hooks` to :class:`unet_deploy.train.TrainConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .augment import AugmentConfig, build_transform
from .errors import UserError
from .losses import EdgeWeight, warmup_cosine

__all__ = ["QualityOptions", "SCHEDULES", "EDGE_CACHE_BYTES"]

SCHEDULES = ("plateau", "cosine")
EDGE_CACHE_BYTES = 256 * 2**20  # per DataLoader process, for edge maps of un-augmented masks


@dataclass(frozen=True)
class QualityOptions:
    """``augment``: what to randomise; ``edge_weight`` (1 = off) and ``edge_width`` (pixels at the training
    scale) shape the per-pixel loss weights; ``schedule`` is ``plateau`` (Pytorch-UNet's
    ReduceLROnPlateau on validation dice, per epoch) or ``cosine`` (``warmup_steps`` of linear warm-up,
    then cosine decay to ``min_lr_ratio`` of the learning rate, per step)."""

    augment: AugmentConfig = field(default_factory=AugmentConfig)
    edge_weight: float = 1.0
    edge_width: float = 3.0
    schedule: str = "plateau"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def validate(self) -> QualityOptions:
        self.augment.validate()
        if self.edge_weight < 1:
            raise UserError(f"--edge-weight {self.edge_weight}: must be >= 1 (1 = off, 5 = edges weigh 5x)")
        if self.edge_width <= 0:
            raise UserError(f"--edge-width {self.edge_width}: must be > 0 pixels")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule {self.schedule}: use {' or '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps}: must be >= 0")
        if self.warmup_steps and self.schedule != "cosine":
            raise UserError(f"--warmup-steps {self.warmup_steps}: add --schedule cosine (plateau has none)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio {self.min_lr_ratio}: must be in [0, 1]")
        return self

    def hooks(self, seed: int, max_steps: int | None = None) -> dict[str, Any]:
        """The ``TrainConfig.hooks`` dict; empty when every option is off (plain Pytorch-UNet training)."""
        self.validate()
        out: dict[str, Any] = {}
        transform = build_transform(self.augment, seed)
        if transform is not None:
            out["transform"] = transform
        if self.edge_weight > 1:
            cache = 0 if self.augment.geometric else EDGE_CACHE_BYTES
            out["extras"] = EdgeWeight(self.edge_width, self.edge_weight, key="weight", cache_bytes=cache)
            out["loss_weight_key"] = "weight"
        if self.schedule == "cosine":
            warmup, ratio = self.warmup_steps, self.min_lr_ratio

            def scheduler(optimizer, total_steps: int):
                total = min(total_steps, max_steps) if max_steps else total_steps
                return warmup_cosine(optimizer, max(total, 1), warmup, ratio)

            out["scheduler"] = scheduler
        return out

    def describe(self) -> str:
        parts = []
        a = self.augment
        if a.active:
            parts.append(f"augment(hflip {a.hflip:g}, vflip {a.vflip:g}, scale ±{a.scale:g}, "
                         f"shift ±{a.shift:g}, rotate ±{a.rotate:g}°, warp p {a.geometric_p:g}, "
                         f"jitter b/c/s/h "
                         f"{a.brightness:g}/{a.contrast:g}/{a.saturation:g}/{a.hue:g} p {a.color_p:g})")
        if self.edge_weight > 1:
            parts.append(f"edge weight {self.edge_weight:g} within ~{self.edge_width:g} px")
        if self.schedule == "cosine":
            parts.append(f"cosine schedule, {self.warmup_steps} warm-up steps")
        return ", ".join(parts) or "no augmentation, unweighted loss, plateau schedule"

