"""``train()``: set up a run, then train its epochs (Ctrl-C safe), then finish it.

::

    start        torchrun's environment, device and process group; option checks; seeding
    prepare      architecture [+ -f resume settings] -> recipe -> data -> model -> optimizer/schedule
                 [+ resumed state] -> the checkpoint folder                    -> TrainRun, Progress
    fit          per epoch: run_epoch (.epoch) -> finish_epoch: validate (.validation), schedule,
                 last/best.pth (.checkpointing); Ctrl-C -> interrupted.pth
    finish       best.pth if no epoch improved; wait for every rank
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import torch

from unet_deploy.config import DeployConfig, InferenceConfig
from unet_deploy.distributed import DistEnv, dist_env, finish_distributed, init_distributed, process_device
from unet_deploy.errors import UserError
from unet_deploy.progress import TrainProgress
from unet_deploy.runtime.devices import resolve_device
from unet_deploy.runtime.estimates import train_estimate_line
from unet_deploy.train.checkpointing import ensure_writable_dir, save_final_best, save_interrupted
from unet_deploy.train.epoch import finish_epoch, run_epoch
from unet_deploy.train.loaders import load_pairs, make_loaders, seed_everything
from unet_deploy.train.optim import apply_recipe, build_optimizer, build_scheduler, restore_progress
from unet_deploy.train.setup import apply_resumed_settings, build_model, resolve_architecture
from unet_deploy.train.state import Progress, TrainRun
from unet_deploy.train.train_config import TrainConfig, TrainResult, check_config

__all__ = ["train"]


def _quiet(_msg: str) -> None:
    pass


def start(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[DistEnv, str, bool, Callable[[str], None]]:
    """(environment, device, created the process group?, logger: ``log`` on rank 0, silent elsewhere)."""
    env = dist_env()
    device = process_device(env, resolve_device(cfg.device))
    own_group = init_distributed(env, device)
    say = log if env.main else _quiet
    check_config(cfg, env)
    seed_everything(cfg.seed)
    return env, device, own_group, say


def prepare(cfg: TrainConfig, env: DistEnv, device: str, say: Callable[[str], None]) -> tuple[TrainRun, Progress]:
    """Everything the epochs need, in the order that fixes the random streams (same seed, same weights)."""
    model_cfg, resume, loaded = resolve_architecture(cfg)
    if resume is not None:
        apply_resumed_settings(cfg, resume, say)
        check_config(cfg, env)  # the resumed batch size against this run's process count
    apply_recipe(cfg, say)
    pairs, mask_values = load_pairs(cfg, model_cfg, loaded, resume, say)
    data = make_loaders(cfg, env, device, model_cfg, pairs, mask_values)
    model, net = build_model(cfg, env, device, model_cfg, loaded, pairs[0].image, data.local_batch)
    estimate = train_estimate_line(model_cfg, pairs[0].image, cfg.scale, data.local_batch,
                                   sum(p.numel() for p in model.parameters()), device)
    if estimate is not None:  # issue 25: a big run says so before its first epoch
        say(estimate)
    optimizer = build_optimizer(cfg, model.parameters())
    scheduler, step_per_batch = build_scheduler(cfg, optimizer, max(len(data.train_loader), 1))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.startswith("cuda"))
    start_epoch, best_dice, global_step = restore_progress(cfg, resume, loaded, optimizer, scheduler, say)
    deploy = DeployConfig(model=model_cfg, inference=InferenceConfig(scale=cfg.scale, mask_values=mask_values))
    ckpt_dir = Path(cfg.checkpoint_dir)
    if env.main:
        ensure_writable_dir(ckpt_dir, "--checkpoint-dir")
    run = TrainRun(cfg, env, device, say, model_cfg, data, model, net, optimizer, scheduler, step_per_batch,
                   scaler, deploy, ckpt_dir)
    return run, Progress(start_epoch - 1, best_dice, global_step)


def fit(run: TrainRun, progress: Progress) -> None:
    """Train the remaining epochs; Ctrl-C writes interrupted.pth and returns with ``progress.interrupted``."""
    cfg, env = run.cfg, run.env
    run.say(f"training {run.model_cfg.architecture} on {len(run.data.train_pairs)} images (validation "
            f"{len(run.data.val_pairs)}), scale {cfg.scale}, batch {cfg.batch_size}, device {run.device}"
            + (f", {env.world} processes" if env.enabled else ""))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = TrainProgress(enabled=cfg.progress and env.main)
    try:
        with bar:
            for epoch in range(progress.epoch + 1, cfg.epochs + 1):
                progress.epoch = epoch
                epoch_loss, n_batches = run_epoch(run, progress, bar)
                finish_epoch(run, progress, epoch_loss, n_batches)
                if progress.out_of_steps(cfg):
                    break
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"{run.device}: out of GPU memory at scale {cfg.scale}, batch {cfg.batch_size}"
                        + ("" if cfg.amp else ", fp32") + "; use a smaller --scale or --batch-size"
                        + ("" if cfg.amp else ", or --amp (half the activation memory)")) from None
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (unet_deploy.signals): a scheduler stopping the job
        for sig in previous:  # a second signal (or torchrun's) must not cut the save
            signal.signal(sig, signal.SIG_IGN)
        progress.interrupted = True
        save_interrupted(run, progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Train a U-Net on ``cfg.data``; writes ``last.pth`` and ``best.pth`` in ``cfg.checkpoint_dir``."""
    env, device, own_group, say = start(cfg, log)
    run, progress = prepare(cfg, env, device, say)
    fit(run, progress)
    if not progress.interrupted:  # on Ctrl-C or errors torchrun stops the other ranks
        save_final_best(run, progress)
        finish_distributed(env, own_group)  # the checkpoints are on disk before any rank returns
    return TrainResult(progress.best_dice, progress.last_dice, len(progress.history), progress.images_per_second,
                       run.best_path, run.last_path, progress.history, progress.interrupted,
                       list(run.data.val_pairs))
