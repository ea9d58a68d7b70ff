"""Checkpoints: this project's own format and Pytorch-UNet ``MODEL.pth`` files, read with
``torch.load(weights_only=True)`` only -- a file that tries to run pickled code is refused.

Own format (a dict of plain types and tensors)::

    {"format": "unet-deploy", "format_version": 1,
     "state_dict": {...}, "config": DeployConfig.to_dict(),
     "training": {"epoch": int, "best_dice": float, "optimizer": {...}, "scheduler": {...}, ...}}

Pytorch-UNet's format is a bare state dict, optionally with a ``mask_values`` list entry; its
architecture (bilinear or transposed, input channels, classes, width, conv bias) is read off the weights.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig, versions
from unet_deploy.errors import UserError, first_line
from unet_deploy.fileio import atomic_path, require_file, sha256_file

__all__ = ["LoadedCheckpoint", "load_checkpoint", "save_checkpoint", "infer_model_config", "load_model",
           "load_state", "FORMAT"]

FORMAT = "unet-deploy"
FORMAT_VERSION = 1


@dataclass
class LoadedCheckpoint:
    path: Path
    kind: str  # "unet-deploy" or "pytorch-unet"
    config: DeployConfig
    state_dict: dict[str, torch.Tensor]
    training: dict[str, Any] = field(default_factory=dict)

    def build_model(self, device: str | torch.device = "cpu") -> nn.Module:
        model = self.config.model.build()
        load_state(model, self.state_dict, self.path)
        return model.to(device).eval()


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def infer_model_config(state: dict[str, Any], source: str | Path = "checkpoint") -> ModelConfig:
    """Read a Pytorch-UNet architecture off its state dict."""
    try:
        first = state["inc.double_conv.0.weight"]
        out = state["outc.conv.weight"]
    except KeyError as e:
        example = next(iter(state), "<empty>")
        raise UserError(f"{source}: not a Pytorch-UNet state dict (missing key {e.args[0]!r}, first key is "
                        f"{example!r}); pass a U-Net checkpoint") from None
    return ModelConfig(
        n_channels=int(first.shape[1]),
        n_classes=int(out.shape[0]),
        bilinear="up1.up.weight" not in state,
        base_channels=int(first.shape[0]),
        conv_bias="inc.double_conv.0.bias" in state,
    )


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``state`` into ``model`` strictly; a missing, extra or misshapen key is a one-line error."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise UserError(f"{source}: weights do not fit a U-Net -- missing key {key!r}; "
                            "is this a checkpoint of another network?")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise UserError(f"{source}: weight {key!r} has shape {tuple(state[key].shape)}, expected "
                            f"{tuple(expected[key].shape)}; is this a checkpoint of another network?")
    extra = [k for k in state if k not in expected]
    if extra:
        raise UserError(f"{source}: unexpected key {extra[0]!r} for a U-Net; is this a checkpoint of "
                        "another network?")
    model.load_state_dict(state, strict=True)


def _torch_load(path: Path, map_location: str | torch.device = "cpu") -> Any:
    require_file(path, "checkpoint", "check the path (`unet-deploy train` writes checkpoints/best.pth)")
    with open(path, "rb") as f:
        head = f.read(2)
    is_zip = zipfile.is_zipfile(path)
    if head == b"PK" and not is_zip:
        raise UserError(f"{path}: truncated or corrupt checkpoint (its zip directory is missing); "
                        "re-download or re-save it")
    if not is_zip and head[:1] != b"\x80":  # neither zip nor legacy pickle format
        raise UserError(f"{path}: not a PyTorch checkpoint (neither zip nor pickle format); pass a .pth "
                        "written by torch.save")
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any("/code/" in n or n.startswith("code/") for n in names) and any(
                n.endswith("constants.pkl") for n in names):
            raise UserError(f"{path}: is a TorchScript export, not a checkpoint; pass the .pth it was exported "
                            "from (TorchScript files run with predict/evaluate -m)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((ln.split("GLOBAL", 1)[1].split()[0] for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        what = f" ({found})" if found else ""
        raise UserError(f"{path}: refused to load -- the file holds pickled Python objects{what} that could run "
                        "code; only tensors and plain types are loaded (weights_only=True). Re-save it with "
                        "torch.save(model.state_dict(), path)") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load this project's checkpoint or a Pytorch-UNet ``MODEL.pth``."""
    path = Path(path)
    obj = _torch_load(path, map_location)
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a state dict, found a {type(obj).__name__}; "
                        "save model.state_dict() instead of the whole model")
    sha = sha256_file(path)
    if obj.get("format") == FORMAT:
        cfg = DeployConfig.from_dict(obj.get("config", {}))
        cfg.source = {"path": str(path), "sha256": sha, "format": FORMAT}
        state = _strip_prefix(dict(obj["state_dict"]))
        return LoadedCheckpoint(path, FORMAT, cfg, state, dict(obj.get("training") or {}))
    state = dict(obj)
    mask_values = state.pop("mask_values", None)
    if "state_dict" in state and isinstance(state["state_dict"], dict):  # other trainers' wrappers
        state = dict(state["state_dict"])
    state = _strip_prefix(state)
    non_tensor = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if non_tensor:
        raise UserError(f"{path}: entry {non_tensor[0]!r} is not a tensor; not a Pytorch-UNet state dict")
    model_cfg = infer_model_config(state, path)
    if isinstance(mask_values, tuple):
        mask_values = list(mask_values)
    cfg = DeployConfig(
        model=model_cfg,
        inference=InferenceConfig(mask_values=mask_values),
        source={"path": str(path), "sha256": sha, "format": "pytorch-unet"},
    )
    return LoadedCheckpoint(path, "pytorch-unet", cfg, state)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, DeployConfig]:
    ckpt = load_checkpoint(path)
    return ckpt.build_model(device), ckpt.config


def save_checkpoint(path: str | Path, model: nn.Module, config: DeployConfig,
                    training: dict[str, Any] | None = None) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a corrupt checkpoint behind."""
    path = Path(path)
    model = getattr(model, "module", model)  # DistributedDataParallel
    model = getattr(model, "_orig_mod", model)  # torch.compile
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cfg = replace(config, versions=versions())
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "config": cfg.to_dict(),
        "training": training or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path
