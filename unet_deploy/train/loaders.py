"""Training data: image/mask pairs -> the seeded train/validation split -> datasets and loaders.

Under ``torchrun`` each rank takes ``batch_size / world_size`` images of every global batch
(:class:`EpochSampler`) and every ``world_size``-th validation image.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unet_deploy.config import ModelConfig
from unet_deploy.distributed import DistEnv
from unet_deploy.errors import UserError
from unet_deploy.images.image_io import (
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
from unet_deploy.signals import ignore_stop_signals
from unet_deploy.train.train_config import TrainConfig

__all__ = ["SegmentationDataset", "collate", "split_pairs", "EpochSampler", "seed_everything", "TrainData",
           "load_pairs", "make_loaders"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


def load_pairs(cfg: TrainConfig, model_cfg: ModelConfig, loaded: Any, resume: dict[str, Any] | None,
               say: Callable[[str], None]) -> tuple[list[Pair], list]:
    """The data set's pairs and mask values (a resumed checkpoint's values win), checked against the model."""
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
    return pairs, mask_values


@dataclass
class TrainData:
    """The split and this rank's loaders; ``local_batch`` is this rank's share of the global batch."""

    pairs: list[Pair]
    mask_values: list
    train_pairs: list[Pair]
    val_pairs: list[Pair]
    sampler: EpochSampler
    train_loader: DataLoader
    val_loader: DataLoader
    local_batch: int


def _seed_worker(base: int, worker_id: int) -> None:
    ignore_stop_signals()  # Ctrl-C / SIGTERM to the process group: the training process stops its loaders
    seed_everything(base + worker_id)


def make_loaders(cfg: TrainConfig, env: DistEnv, device: str, model_cfg: ModelConfig, pairs: list[Pair],
                 mask_values: list) -> TrainData:
    """Split the pairs (seeded) and build this rank's training and validation loaders."""
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
    # worker w of rank r is seeded with seed * 1000 + r * 100 + w + 1
    worker_init = partial(_seed_worker, cfg.seed * 1000 + env.rank * 100 + 1)
    loader_kw: dict[str, Any] = {"num_workers": cfg.workers, "collate_fn": collate,
                                 "pin_memory": device.startswith("cuda"), "worker_init_fn": worker_init,
                                 "persistent_workers": cfg.workers > 0}
    train_loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, **loader_kw)
    val_loader = DataLoader(val_set, batch_size=local_batch, shuffle=False, **loader_kw)
    return TrainData(pairs, mask_values, train_pairs, val_pairs, sampler, train_loader, val_loader, local_batch)
