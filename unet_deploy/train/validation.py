"""Validation dice during training: mean per-image dice at the network's input scale."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from unet_deploy.distributed import DistEnv, all_reduce_sum
from unet_deploy.images.dice import multiclass_dice_per_image

__all__ = ["validate", "autocast"]


def autocast(device: str, enabled: bool) -> torch.autocast:
    """Mixed precision for ``--amp``: bfloat16 on CPU, float16 on GPUs."""
    return torch.autocast(device_type=device.split(":")[0], enabled=enabled,
                          dtype=torch.bfloat16 if device == "cpu" else torch.float16)


def _logits_to_index(logits: torch.Tensor, n_classes: int, threshold: float = 0.5) -> torch.Tensor:
    # Not postprocess.logits_to_mask: for one-class models that tests ``logit > 0`` (exact), this tests
    # the float32 ``sigmoid(logit) > 0.5``, which differs for 0 < logit < ~1e-7 (sigmoid rounds to 0.5);
    # kept so that validation dice, best.pth and the plateau schedule stay what they were.
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
        with autocast(device, amp):
            logits = model(x)
        pred = _logits_to_index(logits, n_classes).cpu()
        d = multiclass_dice_per_image(pred, batch["mask"], max(n_classes, 2))
        total += torch.tensor([d.sum().item(), d.numel()], dtype=torch.float64)
    total = all_reduce_sum(total, env)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")
