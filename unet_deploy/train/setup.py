"""Model setup: the architecture (new, or a ``-f`` checkpoint's), the resumed run's stored settings, and
the model on its device (memory check, loaded weights, sync BatchNorm, channels_last, DDP)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unet_deploy.checkpoint import LoadedCheckpoint, load_checkpoint, load_state
from unet_deploy.config import ModelConfig
from unet_deploy.distributed import DistEnv, convert_sync_batchnorm
from unet_deploy.errors import UserError
from unet_deploy.runtime.cpu_share import limit_torch_threads
from unet_deploy.runtime.devices import configure_cudnn
from unet_deploy.runtime.resources import check_train_memory
from unet_deploy.train.optim import apply_stored_recipe
from unet_deploy.train.train_config import TrainConfig

__all__ = ["resolve_architecture", "apply_resumed_settings", "build_model"]


def resolve_architecture(cfg: TrainConfig) -> tuple[ModelConfig, dict[str, Any] | None, LoadedCheckpoint | None]:
    """Model config, the resume state (own checkpoints) and the loaded checkpoint for ``-f``."""
    if cfg.load is None:
        return ModelConfig(3, cfg.n_classes, cfg.bilinear, cfg.base_channels), None, None
    ckpt = load_checkpoint(cfg.load)
    flags = {"n_classes": "--classes", "bilinear": "--bilinear/--transposed", "base_channels": "--base-channels"}
    for name in (n for n in cfg.explicit if n in flags):
        have, asked = getattr(ckpt.config.model, name), getattr(cfg, name)
        if have != asked:
            raise UserError(f"{flags[name]} {asked}: the -f checkpoint {cfg.load} has {have}; its architecture "
                            f"is kept when loading, so drop {flags[name].split('/')[0]} or start without -f")
    resume = ckpt.training if ckpt.kind == "unet-deploy" and ckpt.training.get("optimizer") else None
    return ckpt.config.model, resume, ckpt


def apply_resumed_settings(cfg: TrainConfig, resume: dict[str, Any], say: Callable[[str], None]) -> None:
    """-f resume: the checkpoint's recipe, optimizer, scale and batch size (an explicit --optimizer that differs
    fails; an explicit -b wins)."""
    saved = resume.get("args") or {}
    apply_stored_recipe(cfg, resume, say)
    for key in ("optimizer", "scale", "batch_size"):
        if key == "batch_size" and key in cfg.explicit:
            continue
        if key in saved and saved[key] != getattr(cfg, key):
            if key == "optimizer" and key in cfg.explicit:
                raise UserError(f"--optimizer {cfg.optimizer}: the -f checkpoint {cfg.load} was trained with "
                                f"{saved[key]}, whose state is resumed; drop --optimizer or start without -f")
            say(f"resume: using the checkpoint's {key} = {saved[key]} (not {getattr(cfg, key)})")
            setattr(cfg, key, saved[key])
            if key == "optimizer" and cfg.recipe is not None:
                cfg.recipe = {**cfg.recipe, "optimizer": saved[key]}


def build_model(cfg: TrainConfig, env: DistEnv, device: str, model_cfg: ModelConfig,
                loaded: LoadedCheckpoint | None, first_image: Path, local_batch: int) -> tuple[nn.Module, nn.Module]:
    """(model, net): the U-Net on ``device`` and what the training step calls (its DDP wrapper under torchrun)."""
    model = model_cfg.build()
    if device == "cpu":
        limit_torch_threads()  # within the CPUs this process may use (a container's quota too)
    check_train_memory(model_cfg, first_image, cfg.scale, local_batch,  # issue 12: before the first epoch
                       sum(p.numel() for p in model.parameters()), device)
    if loaded is not None:
        load_state(model, loaded.state_dict, loaded.path)
    if cfg.sync_bn and env.enabled:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.startswith("cuda"):  # cuDNN autotuning (fixed training shapes), bounded workspace

        configure_cudnn()
    net: nn.Module = model
    if env.enabled:
        net = DistributedDataParallel(model, device_ids=[env.local_rank] if device.startswith("cuda") else None)
    return model, net
