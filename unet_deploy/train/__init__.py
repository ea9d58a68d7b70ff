"""Training and evaluation loops (AMP, resume, Ctrl-C safe, torch.distributed-ready).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same loop runs DistributedDataParallel: each rank takes
``batch_size / world_size`` images of every global batch, so a run of global batch B sees exactly the
batches a single-process run with batch B sees (both draw their order from one seeded permutation).

::

    config          TrainConfig, TrainResult, option checks
    data            split_pairs, SegmentationDataset, EpochSampler, loaders
    setup           architecture (new or -f), resumed settings, the model on its device (DDP)
    optim           optimizer, schedule, recipe-driven settings, resumed optimizer state
    state           TrainRun (what a run trains with), Progress (how far it got)
    epoch           segmentation_loss, one training step, one epoch and its end
    validation      validation dice
    checkpointing   last.pth / best.pth / interrupted.pth
    loop            train(): start -> prepare -> fit -> finish
    evaluate        predicted_masks, evaluate_model (original resolution)
"""

from __future__ import annotations

from unet_deploy.distributed import DistEnv, all_reduce_sum, dist_env, init_distributed
from unet_deploy.train.checkpointing import ensure_writable_dir
from unet_deploy.train.epoch import segmentation_loss
from unet_deploy.train.evaluate import evaluate_model, predicted_masks
from unet_deploy.train.loaders import EpochSampler, SegmentationDataset, collate, seed_everything, split_pairs
from unet_deploy.train.loop import train
from unet_deploy.train.train_config import TrainConfig, TrainResult
from unet_deploy.train.validation import validate

__all__ = ["TrainConfig", "SegmentationDataset", "train", "evaluate_model", "predicted_masks", "split_pairs", "DistEnv",
           "dist_env", "TrainResult", "EpochSampler", "segmentation_loss", "validate", "ensure_writable_dir",
           "collate", "seed_everything", "init_distributed", "all_reduce_sum"]
