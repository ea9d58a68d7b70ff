"""torch.distributed helpers for ``train``: torchrun's environment and process group, BatchNorm
synchronised across CPU (gloo) processes, buffer broadcasting, and the ``--nproc`` launcher that re-runs a
command under ``torch.distributed.run``.

``torch.nn.SyncBatchNorm`` only runs on GPUs (DistributedDataParallel refuses it on CPU modules), so on
CPU ``--sync-bn`` swaps every ``BatchNorm2d`` for :class:`AllReduceBatchNorm2d`, which all-reduces the
per-channel sums with autograd-aware collectives: the batch statistics, the gradients and the running
statistics are those of the whole global batch, as in a single process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from unet_deploy.runtime.cpu_share import process_share

__all__ = ["DistEnv", "dist_env", "process_device", "init_distributed", "all_reduce_sum", "finish_distributed",
           "AllReduceBatchNorm2d", "convert_sync_batchnorm", "broadcast_buffers", "torchrun_command",
           "launch_torchrun"]


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


def process_device(env: DistEnv, device: str) -> str:
    """This process's device: under torchrun on CUDA, ``cuda:LOCAL_RANK`` (made the current device)."""
    if env.enabled and device.startswith("cuda"):
        device = f"cuda:{env.local_rank}"
        torch.cuda.set_device(device)
    return device


def init_distributed(env: DistEnv, device: str) -> bool:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU); True if this call created it."""
    if env.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        return True
    return False


def all_reduce_sum(values: Tensor, env: DistEnv) -> Tensor:
    """Sum ``values`` over every process, in place (unchanged in a single process)."""
    if env.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def finish_distributed(env: DistEnv, own_group: bool) -> None:
    """Wait for every rank (the checkpoints are on disk before any returns); leave a group we created."""
    if env.enabled:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumAllReduce(torch.autograd.Function):
    """Sum over processes, differentiable: the gradient of a sum shared by all ranks is the sum of theirs."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumAllReduce.apply(grad)


def _all_reduce(tensor: Tensor) -> Tensor:
    return _SumAllReduce.apply(tensor)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics span every process of the default group.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d`` (checkpoints stay plain U-Nets).
    Mean and variance are computed in two all-reduced passes (sum, then sum of squared deviations) for
    the accuracy of a single-process batch norm. Outside training, or without a process group, it is an
    ordinary ``BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or _world() == 1:
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x.float()  # statistics in fp32, also under autocast
        local_n = x.shape[0] * x.shape[2] * x.shape[3]
        sums = _all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([float(local_n)])]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centered = xf - mean[None, :, None, None]
        var = _all_reduce(centered.square().sum(dims)) / n
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if self.track_running_stats and tracked is not None and running_mean is not None and running_var is not None:
            with torch.no_grad():
                tracked.add_(1)
                m = 1.0 / float(tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1)) if float(n) > 1 else var
                running_mean.mul_(1 - m).add_(mean, alpha=m)
                running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: str) -> nn.Module:
    """Batch norm over the global batch: ``nn.SyncBatchNorm`` on CUDA, :class:`AllReduceBatchNorm2d` else."""
    if device.startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        new = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, device))
    return module


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every process, in place.

    Without ``--sync-bn`` each rank updates its running statistics from its own share of the batch;
    broadcasting rank 0's makes validation measure exactly the model rank 0 writes to the checkpoint.
    """
    if _world() > 1:
        for buf in module.buffers():
            dist.broadcast(buf, src)


def torchrun_command(nproc: int, args: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """``python -m unet_deploy.cli.torchrun --standalone --nproc-per-node N [extra] -m unet_deploy ARGS``
    (:mod:`unet_deploy.cli.torchrun`: torch.distributed.run, quiet when a signal stops it)."""
    return [sys.executable, "-m", "unet_deploy.cli.torchrun", "--standalone", f"--nproc-per-node={nproc}",
            *extra, "-m", "unet_deploy", *args]


def launch_torchrun(nproc: int, args: Sequence[str], extra: Sequence[str] = ()) -> int:
    """Run ``unet_deploy ARGS`` in ``nproc`` local processes under torch.distributed.run; its exit code.

    Ctrl-C reaches torchrun through the terminal; torchrun passes one SIGINT to each worker (they run in
    their own sessions), rank 0 writes ``last.pth`` and the exit code is 130. This process only waits
    meanwhile; a SIGTERM sent to it is passed on to torchrun, which passes it on to the workers: they stop
    as on Ctrl-C (:mod:`unet_deploy.signals`) and the exit code is 143.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(process_share(nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, args, extra), env=env)
    interrupted = []
    old_int = signal.signal(signal.SIGINT, lambda sig, _frame: interrupted.append(sig))
    old_term = signal.signal(signal.SIGTERM, lambda sig, _frame: proc.send_signal(sig))
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    return 130 if interrupted and code != 0 else code
