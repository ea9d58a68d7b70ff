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

from typing import TYPE_CHECKING

from unet_deploy import lazy_exports

if TYPE_CHECKING:  # the real names, for type checkers and IDEs
    from unet_deploy.distributed import DistEnv, all_reduce_sum, dist_env, init_distributed
    from unet_deploy.train.checkpointing import ensure_writable_dir
    from unet_deploy.train.epoch import segmentation_loss
    from unet_deploy.train.evaluate import evaluate_model, predicted_masks
    from unet_deploy.train.loaders import EpochSampler, SegmentationDataset, collate, seed_everything, split_pairs
    from unet_deploy.train.loop import train
    from unet_deploy.train.train_config import TrainConfig, TrainResult
    from unet_deploy.train.validation import validate

#: name -> the module that defines it, imported on first use: ``from unet_deploy.train.quality import …`` (the
#: CLI's help texts) does not load torch.
_HOMES = {
    **dict.fromkeys(["DistEnv", "all_reduce_sum", "dist_env", "init_distributed"], "unet_deploy.distributed"),
    "ensure_writable_dir": "checkpointing",
    "segmentation_loss": "epoch",
    **dict.fromkeys(["evaluate_model", "predicted_masks"], "evaluate"),
    **dict.fromkeys(["EpochSampler", "SegmentationDataset", "collate", "seed_everything", "split_pairs"], "loaders"),
    "train": "loop",
    **dict.fromkeys(["TrainConfig", "TrainResult"], "train_config"),
    "validate": "validation",
}

__all__ = ["DistEnv", "EpochSampler", "SegmentationDataset", "TrainConfig", "TrainResult", "all_reduce_sum",
           "collate", "dist_env", "ensure_writable_dir", "evaluate_model", "init_distributed", "predicted_masks",
           "seed_everything", "segmentation_loss", "split_pairs", "train", "validate"]

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
