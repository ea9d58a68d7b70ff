"""Checkpoints: own format round trip, Pytorch-UNet MODEL.pth files, refused pickles, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import pytest
import torch

from unet_deploy.checkpoint import infer_model_config, load_checkpoint, load_model, save_checkpoint
from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.errors import UserError
from unet_deploy.model import UNet


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BatchNorm non-trivial running statistics so a wrong load would change outputs."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, cast(int, model.n_channels), 32, 48))
    return model.eval()


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("mask_values", [None, [0, 1]])
def test_loads_pytorch_unet_state_dict_unchanged(tmp_path: Path, bilinear: bool, mask_values) -> None:
    model = _randomised(UNet(3, 2, bilinear=bilinear, base_channels=64))
    state = model.state_dict()
    if mask_values is not None:
        state = dict(state, mask_values=mask_values)
    path = tmp_path / "MODEL.pth"
    torch.save(state, path)

    ckpt = load_checkpoint(path)
    assert ckpt.kind == "pytorch-unet"
    assert ckpt.config.model == ModelConfig(3, 2, bilinear, 64, False)
    assert ckpt.config.inference.mask_values == mask_values
    assert ckpt.config.source["sha256"] and ckpt.config.source["format"] == "pytorch-unet"
    loaded = ckpt.build_model()
    x = torch.rand(1, 3, 40, 59)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_infers_width_channels_classes_and_old_conv_bias() -> None:
    model = UNet(1, 5, bilinear=True, base_channels=16, conv_bias=True)
    cfg = infer_model_config(model.state_dict())
    assert cfg == ModelConfig(1, 5, True, 16, True)


def test_strips_ddp_prefix(tmp_path: Path) -> None:
    model = _randomised(UNet(3, 2, base_channels=8))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pth")
    loaded, cfg = load_model(tmp_path / "ddp.pth")
    assert cfg.model.base_channels == 8
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_other_network_is_refused_naming_a_key(tmp_path: Path) -> None:
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    torch.save(other.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(UserError, match=r"resnet\.pth: not a Pytorch-UNet state dict \(missing key 'inc"):
        load_checkpoint(tmp_path / "resnet.pth")


def test_unet_with_a_missing_layer_names_the_first_mismatch(tmp_path: Path) -> None:
    state = UNet(3, 2, base_channels=8).state_dict()
    del state["up3.conv.double_conv.0.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing key 'up3\.conv\.double_conv\.0\.weight'"):
        load_checkpoint(tmp_path / "broken.pth").build_model()


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = UNet(3, 2, base_channels=8).state_dict()
    state["down2.maxpool_conv.1.double_conv.0.weight"] = torch.zeros(32, 16, 5, 5)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"down2\.maxpool_conv\.1\.double_conv\.0\.weight' has shape"):
        load_checkpoint(tmp_path / "shape.pth").build_model()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_pickle_that_runs_code_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"inc.double_conv.0.weight": torch.zeros(1), "evil": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match=r"evil\.pth: refused to load .*weights_only=True"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned-by-pickle").exists()


@pytest.mark.parametrize("content,match", [
    (b"", "empty checkpoint"),
    (b"not a zip at all" * 10, "not a PyTorch checkpoint"),
    (b"PK\x03\x04broken", "truncated or corrupt checkpoint"),
    (b"\xff\xd8\xff\xe0 a jpeg header", "not a PyTorch checkpoint"),
])
def test_broken_files(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "bad.pth").write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_checkpoint(tmp_path / "bad.pth")


def test_missing_and_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_own_format_round_trip_keeps_config_and_training_state(tmp_path: Path) -> None:
    model = _randomised(UNet(3, 3, bilinear=True, base_channels=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 32, 32)).sum().backward()
    opt.step()
    cfg = DeployConfig(model=ModelConfig(3, 3, True, 8), inference=InferenceConfig(0.25, 0.4, [0, 100, 200]))
    path = save_checkpoint(tmp_path / "ck" / "best.pth", model, cfg,
                           {"epoch": 3, "best_dice": 0.97, "optimizer": opt.state_dict()})
    ckpt = load_checkpoint(path)
    assert ckpt.kind == "unet-deploy"
    assert ckpt.config.model == cfg.model and ckpt.config.inference == cfg.inference
    assert ckpt.config.versions["torch"] == str(torch.__version__)
    assert ckpt.config.source["format"] == "unet-deploy" and len(ckpt.config.source["sha256"]) == 64
    assert ckpt.training["epoch"] == 3 and ckpt.training["best_dice"] == pytest.approx(0.97)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.training["optimizer"])
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ckpt.build_model()(x), model(x))
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_failed_save_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = UNet(3, 2, base_channels=4)
    path = save_checkpoint(tmp_path / "last.pth", model, DeployConfig(model=ModelConfig(base_channels=4)))
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, DeployConfig(model=ModelConfig(base_channels=4)))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_torchscript_export_passed_as_checkpoint_is_named(tmp_path: Path) -> None:
    from unet_deploy.export import export_torchscript

    model = UNet(3, 2, base_channels=4).eval()
    export_torchscript(model, DeployConfig(model=ModelConfig(base_channels=4)), tmp_path / "m.ts")
    with pytest.raises(UserError, match=r"m\.ts: is a TorchScript export, not a checkpoint"):
        load_checkpoint(tmp_path / "m.ts")
