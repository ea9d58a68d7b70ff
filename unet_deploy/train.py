"""Training and evaluation loops (AMP, resume, Ctrl-C safe, torch.distributed-ready).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs DistributedDataParallel: each rank takes
``batch_size / world_size`` images of every global batch, so a run of global batch B sees exactly the
batches a single-process run with batch B sees (both draw their order from one seeded permutation).
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_checkpoint, save_checkpoint
from .config import DeployConfig, InferenceConfig, ModelConfig
from .data import (
    MIN_SIDE,
    Pair,
    check_min_size,
    discover_mask_values,
    find_pairs,
    load_image,
    load_mask,
    mask_to_index,
    preprocess_mask,
    resize_image,
    to_input,
)
from .errors import UserError
from .metrics import dice_loss, multiclass_dice_per_image
from .resources import check_train_memory

__all__ = ["TrainConfig", "SegmentationDataset", "train", "evaluate_model", "predicted_masks", "split_pairs", "DistEnv",
           "dist_env", "TrainResult"]


# ----------------------------------------------------------------------------------------- data
class SegmentationDataset(Dataset):
    """Image/mask pairs -> {"image": float32 (C,h,w), "mask": int64 (h,w), "id": str} at ``scale``.

    ``transform(image_uint8_hwc, mask_hw) -> (image, mask)`` runs on the resized uint8 arrays (training
    augmentation); ``extras(mask_index) -> dict`` may add per-sample tensors (e.g. loss weight maps).
    """

    def __init__(self, pairs: Sequence[Pair], scale: float, mask_values: Sequence, n_channels: int = 3,
                 transform: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
                 extras: Callable[[np.ndarray], dict[str, Any]] | None = None):
        self.pairs = list(pairs)
        self.scale = scale
        self.mask_values = list(mask_values)
        self.n_channels = n_channels
        self.transform = transform
        self.extras = extras

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pairs[i]
        image = resize_image(load_image(p.image, self.n_channels), self.scale)
        mask = preprocess_mask(load_mask(p.mask), self.scale)
        index = mask_to_index(mask, self.mask_values, p.mask)
        if self.transform is not None:
            image, index = self.transform(image, index)
        sample = {"image": torch.from_numpy(to_input(image)),
                  "mask": torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)), "id": p.id}
        if self.extras is not None:
            sample.update(self.extras(index))
        return sample


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = {tuple(s["image"].shape) for s in samples}
    if len(sizes) > 1:
        raise UserError(f"images in one batch have different sizes {sorted(sizes)} (e.g. {samples[0]['id']}); "
                        "use --batch-size 1 or resize the data set to one size")
    out: dict[str, Any] = {"id": [s["id"] for s in samples]}
    for key in samples[0]:
        if key != "id":
            out[key] = torch.stack([s[key] for s in samples])
    return out


def split_pairs(pairs: Sequence[Pair], val_percent: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Seeded random split, ``int(n * val_percent / 100)`` validation pairs (at least one if asked)."""
    if not 0 <= val_percent < 100:
        raise UserError(f"-v/--validation {val_percent}: must be a percentage in [0, 100)")
    n_val = int(len(pairs) * val_percent / 100)
    if val_percent > 0 and n_val == 0 and len(pairs) >= 2:
        n_val = 1
    if len(pairs) - n_val < 1:
        raise UserError(f"only {len(pairs)} image(s): nothing left to train on; add data or lower -v")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    val = [pairs[i] for i in order[:n_val]]
    train = [pairs[i] for i in order[n_val:]]
    return train, val


class EpochSampler(torch.utils.data.Sampler[int]):
    """One seeded permutation per epoch; rank r of W takes every W-th index of each global batch.

    With W = 1 this is a plain seeded shuffle; with W > 1 the union of the ranks' local batches k is
    exactly the single-process batch k, which is what makes distributed and single runs agree.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = self._global_order()
        full = (self.n // self.batch_size) * self.batch_size  # drop the ragged last global batch
        local = self.batch_size // self.world
        for start in range(0, full, self.batch_size):
            yield from order[start + self.rank * local: start + (self.rank + 1) * local]

    def __len__(self) -> int:
        return (self.n // self.batch_size) * (self.batch_size // self.world)


# ----------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistEnv(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(env: DistEnv, device: str) -> bool:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); True if this call created it."""
    import torch.distributed as dist

    if env.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return True
    return False


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


# ---------------------------------------------------------------------------------------- config
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
    # the training recipe (unet_deploy.quality.resolve_recipe): when set, the optimizer, learning rate,
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


# ----------------------------------------------------------------------------------------- loops
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, n_classes: int,
                      pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """CE + dice (BCE + dice for one class), Pytorch-UNet's loss; optional per-pixel CE/BCE weights."""
    logits = logits.float()
    if n_classes == 1:
        t = target.float()
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], t, reduction="none")
        probs = torch.sigmoid(logits)
        onehot = t[:, None]
    else:
        per_pixel = F.cross_entropy(logits, target, reduction="none")
        probs = torch.softmax(logits, dim=1)
        onehot = F.one_hot(target, n_classes).permute(0, 3, 1, 2).float()
    if pixel_weight is not None:
        ce = (per_pixel * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-6)
    else:
        ce = per_pixel.mean()
    return ce + dice_loss(probs, onehot)


def _logits_to_index(logits: torch.Tensor, n_classes: int, threshold: float = 0.5) -> torch.Tensor:
    if n_classes == 1:
        return (torch.sigmoid(logits[:, 0].float()) > threshold).long()
    return logits.argmax(1)


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, n_classes: int, device: str, env: DistEnv,
             amp: bool = False) -> float:
    """Mean per-image dice at the network's input scale, over every rank's share of the split."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in loader:
        x = batch["image"].to(device)
        with torch.autocast(device_type=device.split(":")[0], enabled=amp,
                            dtype=torch.bfloat16 if device == "cpu" else torch.float16):
            logits = model(x)
        pred = _logits_to_index(logits, n_classes).cpu()
        d = multiclass_dice_per_image(pred, batch["mask"], max(n_classes, 2))
        total += torch.tensor([d.sum().item(), d.numel()], dtype=torch.float64)
    total = all_reduce_sum(total, env)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, foreach=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    raise UserError(f"--optimizer {cfg.optimizer}: use rmsprop, adamw or adam")


def _resolve_architecture(cfg: TrainConfig) -> tuple[ModelConfig, dict[str, Any] | None, Any]:
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


def _apply_stored_recipe(cfg: TrainConfig, resume: dict[str, Any], say: Callable[[str], None]) -> None:
    """-f resume: take the checkpoint's stored recipe, except for the flags given explicitly now."""
    from .quality import merge_stored_recipe

    if cfg.recipe is None or not resume.get("recipe"):
        return  # an API run without a recipe, or an older checkpoint: the given values apply
    cfg.recipe, changed = merge_stored_recipe(cfg.recipe, resume["recipe"], cfg.explicit)
    cfg.optimizer, cfg.learning_rate = cfg.recipe["optimizer"], cfg.recipe["learning_rate"]
    cfg.weight_decay = cfg.recipe["weight_decay"]
    say(f"resume: using the checkpoint's training recipe ({cfg.recipe['recipe']})"
        + (f"; overridden on the command line: {', '.join(changed)}" if changed else ""))


def _load_optimizer_state(cfg: TrainConfig, resume: dict[str, Any], optimizer, scheduler) -> None:
    """Restore the optimizer/scheduler state; explicit -l / --weight-decay / --schedule given with -f win."""
    optimizer.load_state_dict(resume["optimizer"])
    stored = resume.get("recipe") or {}
    if resume.get("scheduler") and hasattr(scheduler, "load_state_dict") and not (
            "schedule" in cfg.explicit and stored.get("schedule") not in (None, _schedule_name(cfg))):
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


def _schedule_name(cfg: TrainConfig) -> str:
    return (cfg.recipe or {}).get("schedule", "cosine" if cfg.hooks.get("scheduler") else "plateau")


def _validate(cfg: TrainConfig) -> None:
    """One-line errors for option values that would otherwise fail deep inside torch."""
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


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train a U-Net on ``cfg.data``; writes ``last.pth`` and ``best.pth`` in ``cfg.checkpoint_dir``."""
    from .backends import resolve_device

    env = dist_env()
    device = resolve_device(cfg.device)
    if env.enabled and device.startswith("cuda"):
        device = f"cuda:{env.local_rank}"
        torch.cuda.set_device(device)
    own_group = init_distributed(env, device)
    say = log if env.main else (lambda _msg: None)
    if cfg.epochs < 1:
        raise UserError(f"-e/--epochs {cfg.epochs}: must be >= 1")
    if cfg.batch_size < 1 or cfg.batch_size % env.world:
        raise UserError(f"-b/--batch-size {cfg.batch_size}: must be a positive multiple of the "
                        f"{env.world} processes (it is the global batch)")
    if cfg.learning_rate <= 0:
        raise UserError(f"-l/--learning-rate {cfg.learning_rate}: must be > 0")
    _validate(cfg)
    seed_everything(cfg.seed)

    model_cfg, resume, loaded = _resolve_architecture(cfg)
    if resume is not None:
        saved = resume.get("args") or {}
        _apply_stored_recipe(cfg, resume, say)
        for key in ("optimizer", "scale"):
            if key in saved and saved[key] != getattr(cfg, key):
                if key == "optimizer" and key in cfg.explicit:
                    raise UserError(f"--optimizer {cfg.optimizer}: the -f checkpoint {cfg.load} was trained with "
                                    f"{saved[key]}, whose state is resumed; drop --optimizer or start without -f")
                say(f"resume: using the checkpoint's {key} = {saved[key]} (not {getattr(cfg, key)})")
                setattr(cfg, key, saved[key])
                if key == "optimizer" and cfg.recipe is not None:
                    cfg.recipe = {**cfg.recipe, "optimizer": saved[key]}
    if cfg.recipe is not None:
        from .quality import options_from_record, recipe_hooks

        cfg.hooks, cfg.recipe = recipe_hooks(cfg.recipe, cfg.explicit, cfg.seed, cfg.max_steps, say)
        say(f"training options: recipe {cfg.recipe['recipe']}, {cfg.optimizer} lr {cfg.learning_rate:g} "
            f"weight decay {cfg.weight_decay:g}, {options_from_record(cfg.recipe).describe()}")
    pairs = find_pairs(cfg.imgs, cfg.masks, cfg.mask_suffix)
    mask_values = discover_mask_values([p.mask for p in pairs])
    if loaded is not None and loaded.config.inference.mask_values and resume is not None:
        mask_values = list(loaded.config.inference.mask_values)
    n_out = max(model_cfg.n_classes, 2)
    if len(mask_values) > n_out:
        fix = (f"pass --classes {len(mask_values)}" if loaded is None else
               f"the -f checkpoint {cfg.load} has {model_cfg.n_classes} class(es): start a new model without -f")
        raise UserError(f"{cfg.masks}: masks hold {len(mask_values)} distinct values {mask_values[:8]} but the "
                        f"model has {model_cfg.n_classes} class(es); {fix}, or fix the masks")
    # training BatchNorm needs more than one value per channel at the 1/16 bottleneck
    check_min_size(pairs[0].image, cfg.scale, 2 * MIN_SIDE)
    if len(mask_values) == 1:
        say(f"warning: every mask holds only the value {mask_values[0]}; dice will be trivial")
        mask_values = sorted({0, *mask_values}) if mask_values[0] != 0 else [0, 1]
    train_pairs, val_pairs = split_pairs(pairs, cfg.validation, cfg.seed)
    if len(train_pairs) < cfg.batch_size:
        raise UserError(f"-b/--batch-size {cfg.batch_size} is larger than the {len(train_pairs)} training "
                        "images; lower it")

    hooks = cfg.hooks
    train_set = SegmentationDataset(train_pairs, cfg.scale, mask_values, model_cfg.n_channels,
                                    hooks.get("transform"), hooks.get("extras"))
    val_set = SegmentationDataset(val_pairs[env.rank::env.world], cfg.scale, mask_values, model_cfg.n_channels)
    sampler = EpochSampler(len(train_set), cfg.batch_size, cfg.seed, env.rank, env.world)
    local_batch = cfg.batch_size // env.world

    def _worker_init(worker_id: int) -> None:
        seed_everything(cfg.seed * 1000 + env.rank * 100 + worker_id + 1)

    loader_kw: dict[str, Any] = {"num_workers": cfg.workers, "collate_fn": collate,
                                 "pin_memory": device.startswith("cuda"), "worker_init_fn": _worker_init,
                                 "persistent_workers": cfg.workers > 0}
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, **loader_kw)
    val_loader = DataLoader(val_set, batch_size=local_batch, shuffle=False, **loader_kw)

    model = model_cfg.build()
    check_train_memory(model_cfg, pairs[0].image, cfg.scale, local_batch,  # issue 12: before the first epoch
                       sum(p.numel() for p in model.parameters()), device)
    if loaded is not None:
        from .checkpoint import _load_state

        _load_state(model, loaded.state_dict, loaded.path)
    if cfg.sync_bn and env.enabled:
        from .distributed import convert_sync_batchnorm

        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.startswith("cuda"):  # cuDNN autotuning (fixed training shapes), bounded workspace
        from .backends import configure_cudnn

        configure_cudnn()
    net: nn.Module = model
    if env.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[env.local_rank] if device.startswith("cuda") else None)

    optimizer = _build_optimizer(cfg, model.parameters())
    make_scheduler = hooks.get("scheduler")
    steps_per_epoch = max(len(train_loader), 1)
    if make_scheduler is not None:
        scheduler = make_scheduler(optimizer, cfg.epochs * steps_per_epoch)
        step_per_batch = True
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "max", patience=5)
        step_per_batch = False
    use_scaler = cfg.amp and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    start_epoch, best_dice, global_step = 1, -1.0, 0
    if resume is not None:
        _load_optimizer_state(cfg, resume, optimizer, scheduler)
        start_epoch = int(resume.get("epoch", 0)) + 1
        best_dice = float(resume.get("best_dice", -1.0))
        global_step = int(resume.get("global_step", 0))
        say(f"resuming from {cfg.load} at epoch {start_epoch} (best dice so far {best_dice:.4f})")
    elif loaded is not None:
        say(f"fine-tuning from {cfg.load} ({loaded.kind} weights, fresh optimizer)")

    deploy = DeployConfig(model=model_cfg, inference=InferenceConfig(scale=cfg.scale, mask_values=mask_values))
    ckpt_dir = Path(cfg.checkpoint_dir)
    last_path, best_path = ckpt_dir / "last.pth", ckpt_dir / "best.pth"
    if env.main:
        ensure_writable_dir(ckpt_dir, "--checkpoint-dir")
    loss_weight_key = hooks.get("loss_weight_key")
    history: list[dict[str, float]] = []
    images_seen, train_time = 0, 0.0
    epoch = start_epoch - 1
    last_dice = float("nan")
    interrupted = False

    def state(epoch_done: int) -> dict[str, Any]:
        return {"epoch": epoch_done, "best_dice": best_dice, "global_step": global_step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if hasattr(scheduler, "state_dict") else None,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()
                         if k != "hooks" and (v is None or isinstance(v, (int, float, str, bool, Path)))},
                **({"recipe": dict(cfg.recipe)} if cfg.recipe is not None else {})}

    from .progress import TrainProgress

    say(f"training {model_cfg.architecture} on {len(train_pairs)} images (validation {len(val_pairs)}), "
        f"scale {cfg.scale}, batch {cfg.batch_size}, device {device}"
        + (f", {env.world} processes" if env.enabled else ""))
    previous_sigint = signal.getsignal(signal.SIGINT)
    bar = TrainProgress(enabled=cfg.progress and env.main)
    try:
        with bar:
            for epoch in range(start_epoch, cfg.epochs + 1):
                sampler.set_epoch(epoch)
                net.train()
                task = bar.start_epoch(epoch, cfg.epochs, len(sampler) * env.world)
                epoch_loss, n_batches, t0 = 0.0, 0, time.perf_counter()
                for batch in train_loader:
                    x = batch["image"].to(device, non_blocking=True)
                    y = batch["mask"].to(device, non_blocking=True)
                    if cfg.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    w = batch[loss_weight_key].to(device) if loss_weight_key else None
                    with torch.autocast(device_type=device.split(":")[0], enabled=cfg.amp,
                                        dtype=torch.bfloat16 if device == "cpu" else torch.float16):
                        logits = net(x)
                    loss = segmentation_loss(logits, y, model_cfg.n_classes, w)
                    if not torch.isfinite(loss):
                        raise UserError(f"loss became {loss.item()} at epoch {epoch} step {global_step}; lower "
                                        "-l/--learning-rate" + (" or drop --amp" if cfg.amp else ""))
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    if cfg.grad_clip > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    if step_per_batch:
                        scheduler.step()
                    global_step += 1
                    n_batches += 1
                    epoch_loss += loss.item()
                    images_seen += x.shape[0] * env.world
                    elapsed = train_time + time.perf_counter() - t0
                    bar.advance(task, x.shape[0] * env.world, loss.item(), images_seen / max(elapsed, 1e-9))
                    if cfg.max_steps and global_step >= cfg.max_steps:
                        break
                train_time += time.perf_counter() - t0
                if env.enabled:  # mean loss over all ranks; validate rank 0's model (what gets saved)
                    from .distributed import broadcast_buffers

                    sums = all_reduce_sum(torch.tensor([epoch_loss, n_batches], dtype=torch.float64), env)
                    epoch_loss, n_batches = float(sums[0]) / env.world, round(float(sums[1]) / env.world)
                    broadcast_buffers(model)
                last_dice = validate(model, val_loader, model_cfg.n_classes, device, env, cfg.amp) \
                    if val_pairs else float("nan")
                if not step_per_batch:
                    scheduler.step(last_dice if not math.isnan(last_dice) else -epoch_loss)
                improved = (not math.isnan(last_dice) and last_dice > best_dice) or (
                    math.isnan(last_dice) and epoch == cfg.epochs)
                if improved:
                    best_dice = last_dice if not math.isnan(last_dice) else best_dice
                row = {"epoch": epoch, "loss": epoch_loss / max(n_batches, 1), "val_dice": last_dice,
                       "lr": optimizer.param_groups[0]["lr"],
                       "img_per_s": images_seen / max(train_time, 1e-9)}
                history.append(row)
                if env.main:
                    save_checkpoint(last_path, model, deploy, state(epoch))
                    if improved:
                        save_checkpoint(best_path, model, deploy, state(epoch))
                say(f"epoch {epoch}/{cfg.epochs}: loss {row['loss']:.4f}  val dice {last_dice:.4f}  "
                    f"lr {row['lr']:.2e}  {row['img_per_s']:.1f} img/s" + ("  (best)" if improved else ""))
                if cfg.max_steps and global_step >= cfg.max_steps:
                    break
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"{device}: out of GPU memory at scale {cfg.scale}, batch {cfg.batch_size}"
                        + ("" if cfg.amp else ", fp32") + "; use a smaller --scale or --batch-size"
                        + ("" if cfg.amp else ", or --amp (half the activation memory)")) from None
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or torchrun's) must not cut the save
        interrupted = True
        if env.main:
            # last.pth stays at the last finished epoch, so `-f last.pth` continues exactly; the weights
            # of the unfinished epoch go to interrupted.pth (usable for predict/export, not for resuming).
            partial = ckpt_dir / "interrupted.pth"
            save_checkpoint(partial, model, deploy, {"epoch": max(epoch - 1, 0), "interrupted_in_epoch": epoch,
                                                     "global_step": global_step, "best_dice": best_dice})
            if last_path.exists():
                say(f"interrupted in epoch {epoch}: resume exactly with -f {last_path} (end of epoch "
                    f"{epoch - 1}); the unfinished epoch's weights are in {partial}")
            else:
                say(f"interrupted in epoch {epoch} before any epoch finished: weights so far in {partial}; "
                    "start again to train from scratch")
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    if env.main and not interrupted and not best_path.exists() and last_path.exists():
        save_checkpoint(best_path, model, deploy, state(epoch))
    if env.enabled and not interrupted:  # on Ctrl-C or errors torchrun stops the other ranks
        import torch.distributed as dist

        dist.barrier()  # the checkpoints are on disk before any rank returns
        if own_group:
            dist.destroy_process_group()
    return TrainResult(best_dice, last_dice, len(history), images_seen / max(train_time, 1e-9),
                       best_path, last_path, history, interrupted)


def predicted_masks(backend, pairs: Sequence[Pair], scale: float | None = None,
                    mask_values: Sequence | None = None,
                    threshold: float | None = None) -> Iterator[tuple[Pair, np.ndarray, np.ndarray]]:
    """(pair, predicted class indices, true class indices) at the original resolution, per image.

    Predictions take the shared load -> preprocess -> model -> postprocess path, so they are exactly
    what ``predict`` writes. For binary models a mask written by ``predict`` (0/255) is read as well as
    the training masks' own values (e.g. Carvana's 0/1).
    """
    from .postprocess import logits_to_mask

    inf = backend.config.inference
    scale = inf.scale if scale is None else scale
    threshold = inf.threshold if threshold is None else threshold
    try:
        InferenceConfig(scale, threshold)
    except ValueError as e:
        raise UserError(f"-s/--scale or -t/--mask-threshold: {e}") from None
    n_classes = backend.config.model.n_classes
    values = list(mask_values) if mask_values is not None else (
        inf.mask_values or discover_mask_values([p.mask for p in pairs]))
    binary_alias = inf.output_values(n_classes) if max(n_classes, 2) == 2 and mask_values is None else None
    for p in pairs:
        check_min_size(p.image, scale)
        image = load_image(p.image, backend.config.model.n_channels)
        raw = load_mask(p.mask)
        try:
            truth = mask_to_index(raw, values, p.mask)
        except UserError:
            if binary_alias is None or binary_alias == values or not np.isin(raw, binary_alias).all():
                raise
            truth = mask_to_index(raw, binary_alias, p.mask)
        logits = backend(to_input(resize_image(image, scale))[None])
        yield p, logits_to_mask(logits, image.shape[:2], threshold)[0], truth


def evaluate_model(backend, pairs: Sequence[Pair], scale: float | None = None,
                   mask_values: Sequence | None = None, threshold: float | None = None,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Carvana's metric: mean over images of per-image dice at the original resolution.

    ``backend`` is any :class:`unet_deploy.backends.Backend`; see :func:`predicted_masks`.
    """
    from .metrics import image_dice

    scores: dict[str, float] = {}
    n_classes = backend.config.model.n_classes
    for i, (p, pred, truth) in enumerate(predicted_masks(backend, pairs, scale, mask_values, threshold)):
        scores[p.id] = image_dice(pred, truth, n_classes)
        if progress:
            progress(i + 1)
    return {"dice": float(np.mean(list(scores.values()))) if scores else float("nan"), "n": len(scores),
            "per_image": scores}
