"""One training epoch: the loss, the optimizer step per batch, then validation, the learning-rate
schedule, the checkpoints and the epoch's log line."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unet_deploy.distributed import all_reduce_sum, broadcast_buffers
from unet_deploy.errors import UserError
from unet_deploy.images.dice import dice_loss
from unet_deploy.train.checkpointing import save_epoch
from unet_deploy.train.state import Progress, TrainRun
from unet_deploy.train.validation import autocast, validate

__all__ = ["segmentation_loss", "train_step", "run_epoch", "finish_epoch"]


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


def train_step(run: TrainRun, progress: Progress, batch: dict[str, Any]) -> tuple[float, int]:
    """Forward, loss, backward, clipped optimizer step (and a per-batch schedule step); (loss, images)."""
    cfg, device = run.cfg, run.device
    x = batch["image"].to(device, non_blocking=True)
    y = batch["mask"].to(device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss_weight_key = cfg.hooks.get("loss_weight_key")
    w = batch[loss_weight_key].to(device) if loss_weight_key else None
    with autocast(device, cfg.amp):
        logits = run.net(x)
    loss = segmentation_loss(logits, y, run.model_cfg.n_classes, w)
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at epoch {progress.epoch} step {progress.global_step}; lower "
                        "-l/--learning-rate" + (" or drop --amp" if cfg.amp else ""))
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.step_per_batch:
        run.scheduler.step()
    progress.global_step += 1
    return loss.item(), x.shape[0]


def run_epoch(run: TrainRun, progress: Progress, bar: Any) -> tuple[float, int]:
    """Train epoch ``progress.epoch`` (until ``--max-steps``); (summed loss, batches), means over ranks."""
    cfg, env, data = run.cfg, run.env, run.data
    data.sampler.set_epoch(progress.epoch)
    run.net.train()
    task = bar.start_epoch(progress.epoch, cfg.epochs, len(data.sampler) * env.world)
    epoch_loss, n_batches, t0 = 0.0, 0, time.perf_counter()
    for batch in data.train_loader:
        loss, n_images = train_step(run, progress, batch)
        n_batches += 1
        epoch_loss += loss
        progress.images_seen += n_images * env.world
        elapsed = progress.train_time + time.perf_counter() - t0
        bar.advance(task, n_images * env.world, loss, progress.images_seen / max(elapsed, 1e-9))
        if progress.out_of_steps(cfg):
            break
    progress.train_time += time.perf_counter() - t0
    if env.enabled:  # mean loss over all ranks; validate rank 0's model (what gets saved)

        sums = all_reduce_sum(torch.tensor([epoch_loss, n_batches], dtype=torch.float64), env)
        epoch_loss, n_batches = float(sums[0]) / env.world, round(float(sums[1]) / env.world)
        broadcast_buffers(run.model)
    return epoch_loss, n_batches


def finish_epoch(run: TrainRun, progress: Progress, epoch_loss: float, n_batches: int) -> None:
    """Validate, step a plateau schedule, record the epoch, write the checkpoints, log one line."""
    cfg, epoch = run.cfg, progress.epoch
    last_dice = validate(run.model, run.data.val_loader, run.model_cfg.n_classes, run.device, run.env, cfg.amp) \
        if run.data.val_pairs else float("nan")
    progress.last_dice = last_dice
    if not run.step_per_batch:
        run.scheduler.step(last_dice if not math.isnan(last_dice) else -epoch_loss)
    improved = (not math.isnan(last_dice) and last_dice > progress.best_dice) or (
        math.isnan(last_dice) and epoch == cfg.epochs)
    if improved:
        progress.best_dice = last_dice if not math.isnan(last_dice) else progress.best_dice
    row = {"epoch": epoch, "loss": epoch_loss / max(n_batches, 1), "val_dice": last_dice,
           "lr": run.optimizer.param_groups[0]["lr"], "img_per_s": progress.images_per_second}
    progress.history.append(row)
    save_epoch(run, progress, improved)
    run.say(f"epoch {epoch}/{cfg.epochs}: loss {row['loss']:.4f}  val dice {last_dice:.4f}  "
            f"lr {row['lr']:.2e}  {row['img_per_s']:.1f} img/s" + ("  (best)" if improved else ""))
