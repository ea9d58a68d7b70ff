"""``train --recipe``: the default recipe, Pytorch-UNet's exact defaults, explicit overrides, the recipe
stored in checkpoints and used on resume, and albumentations staying optional."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.cli import main
from unet_deploy.errors import UserError
from unet_deploy.images.image_io import find_pairs
from unet_deploy.images.synth import generate_dataset
from unet_deploy.runtime import load_backend
from unet_deploy.train import TrainConfig, evaluate_model, train
from unet_deploy.train.quality import recipe_hooks, resolve_recipe


def _cfg(data: Path, ckpt: Path, record: dict, explicit: tuple[str, ...] = (), **kw) -> TrainConfig:
    """What the CLI builds: optimizer / lr / weight decay from the resolved record."""
    base = dict(data=data, checkpoint_dir=ckpt, epochs=1, batch_size=4, base_channels=4, bilinear=True, scale=1.0,
                validation=20, device="cpu", seed=0, progress=False, recipe=record, explicit=explicit,
                optimizer=record["optimizer"], learning_rate=record["learning_rate"],
                weight_decay=record["weight_decay"])
    base.update(kw)
    return TrainConfig(**base)


def test_recipe_tables_and_explicit_overrides() -> None:
    default = resolve_recipe({})
    assert default["recipe"] == "default" and default["optimizer"] == "adamw"
    assert default["learning_rate"] == 1e-3 and default["schedule"] == "cosine" and default["augment"] == "light"
    assert default["warmup_steps"] > 0
    torch_unet = resolve_recipe({"recipe": "pytorch-unet"})
    assert {k: torch_unet[k] for k in ("optimizer", "learning_rate", "weight_decay", "schedule", "warmup_steps",
                                       "augment", "edge_weight")} == {
        "optimizer": "rmsprop", "learning_rate": 1e-5, "weight_decay": 1e-8, "schedule": "plateau",
        "warmup_steps": 0, "augment": "none", "edge_weight": 1.0}
    mixed = resolve_recipe({"recipe": "pytorch-unet", "learning_rate": 1e-4, "augment": "strong",
                            "augment_overrides": {"hflip": 0.25, "rotate": None}})
    assert mixed["learning_rate"] == 1e-4 and mixed["augment"] == "strong" and mixed["optimizer"] == "rmsprop"
    assert mixed["augment_overrides"] == {"hflip": 0.25}
    # plateau has no warm-up: the default recipe's warm-up goes with its cosine schedule
    assert resolve_recipe({"schedule": "plateau"})["warmup_steps"] == 0
    with pytest.raises(UserError, match="--warmup-steps 5: add --schedule cosine"):
        resolve_recipe({"schedule": "plateau", "warmup_steps": 5})
    with pytest.raises(UserError, match="--recipe wild: unknown recipe; use one of default, pytorch-unet"):
        resolve_recipe({"recipe": "wild"})


def test_help_shows_recipe_values_and_bad_recipe_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--recipe" in text and "pytorch-unet: 1e-05" in text and "default recipe: adamw" in text
    with pytest.raises(SystemExit) as exc:
        main(["train", "--recipe", "wild"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "--recipe wild" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_recipe_is_stored_and_resume_uses_it_unless_overridden(synth_tiny: Path, tmp_path: Path) -> None:
    stored = resolve_recipe({"learning_rate": 2e-3, "augment": "default", "augment_overrides": {"hflip": 0.3}})
    train(_cfg(synth_tiny, tmp_path, stored, epochs=1), log=lambda _m: None)
    raw = torch.load(tmp_path / "last.pth", weights_only=True)  # plain types only
    assert raw["training"]["recipe"] == stored

    messages: list[str] = []  # -f with no recipe flags: the stored recipe, not the (default) given one
    train(_cfg(synth_tiny, tmp_path, resolve_recipe({}), epochs=2, batch_size=1, load=tmp_path / "last.pth"),
          log=messages.append)  # -b left at its default: the checkpoint's batch size
    assert any("using the checkpoint's training recipe (default)" in m for m in messages)
    assert "resume: using the checkpoint's batch_size = 4 (not 1)" in messages
    assert not any("overridden" in m for m in messages)
    after = load_checkpoint(tmp_path / "last.pth").training
    assert after["recipe"] == stored and after["epoch"] == 2 and after["args"]["batch_size"] == 4
    assert after["optimizer"]["param_groups"][0]["initial_lr"] == 2e-3

    messages.clear()  # an explicit flag together with -f wins, and says so in one line
    given = resolve_recipe({"learning_rate": 5e-4, "augment_overrides": {"hflip": 0.0}})
    train(_cfg(synth_tiny, tmp_path, given, ("learning_rate", "hflip", "batch_size"), epochs=3, batch_size=2,
               load=tmp_path / "last.pth"), log=messages.append)
    line = next(m for m in messages if "overridden" in m)
    assert "-l 0.0005" in line and "--hflip 0" in line
    after = load_checkpoint(tmp_path / "last.pth").training
    assert after["recipe"]["learning_rate"] == 5e-4 and after["recipe"]["augment"] == "default"
    assert after["recipe"]["augment_overrides"] == {"hflip": 0.0}
    assert after["optimizer"]["param_groups"][0]["initial_lr"] == 5e-4
    assert after["args"]["learning_rate"] == 5e-4 and after["args"]["batch_size"] == 2  # an explicit -b wins

    # the optimizer state is resumed, so another explicit optimizer is refused before any training
    with pytest.raises(UserError, match=r"^--optimizer rmsprop: the -f checkpoint .* was trained with adamw"):
        train(_cfg(synth_tiny, tmp_path, resolve_recipe({"optimizer": "rmsprop"}), ("optimizer",), epochs=4,
                   load=tmp_path / "last.pth"), log=lambda _m: None)


def test_old_checkpoint_without_recipe_resumes_with_the_given_flags(synth_tiny: Path, tmp_path: Path) -> None:
    plain = TrainConfig(data=synth_tiny, checkpoint_dir=tmp_path, epochs=1, batch_size=4, base_channels=4,
                        bilinear=True, scale=1.0, validation=20, device="cpu", progress=False, optimizer="adamw",
                        learning_rate=1e-3)
    train(plain, log=lambda _m: None)
    assert "recipe" not in load_checkpoint(tmp_path / "last.pth").training  # like checkpoints made before
    given = resolve_recipe({"schedule": "plateau", "augment": "none"})
    messages: list[str] = []
    train(_cfg(synth_tiny, tmp_path, given, epochs=2, load=tmp_path / "last.pth"), log=messages.append)
    assert any("resuming" in m and "epoch 2" in m for m in messages)
    assert not any("checkpoint's training recipe" in m for m in messages)
    assert load_checkpoint(tmp_path / "last.pth").training["recipe"] == given


def test_without_albumentations_the_recipe_trains_unaugmented_but_an_explicit_flag_fails(
        synth_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "albumentations", None)  # `import albumentations` now raises ImportError
    record = resolve_recipe({})
    hooks, used = recipe_hooks(record, (), 0, None, lambda _m: None)
    assert "transform" not in hooks and "scheduler" in hooks and used["augment"] == "none"
    for flag, explicit in (("--augment", ("augment",)), ("--hflip", ("hflip",))):
        with pytest.raises(UserError, match=f"^{flag}: needs albumentations, .*pip install albumentations"):
            recipe_hooks(record, explicit, 0, None, lambda _m: None)
    messages: list[str] = []
    result = train(_cfg(synth_tiny, tmp_path, record, max_steps=1), log=messages.append)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "pip install albumentations" in warnings[0]
    assert load_checkpoint(result.last_path).training["recipe"]["augment"] == "none"


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is small and shared: one thread each is steadier
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recipe_sets")
    generate_dataset(root / "train", n=24, width=96, height=64, seed=11)
    generate_dataset(root / "held", n=8, width=96, height=64, seed=12)  # other cars
    return root / "train", root / "held"


def test_default_recipe_learns(small_sets, tmp_path: Path, one_thread) -> None:
    data, held = small_sets
    record = resolve_recipe({})  # no recipe flags: what `unet-deploy train` does by default
    result = train(_cfg(data, tmp_path, record, epochs=6, batch_size=2, base_channels=8, validation=10),
                   log=lambda _m: None)
    backend = load_backend(result.best_path, device="cpu")
    dice = evaluate_model(backend, find_pairs(held / "imgs", held / "masks"))["dice"]
    print(dice, [round(r["val_dice"], 3) for r in result.history])
    assert dice >= 0.93, dice
