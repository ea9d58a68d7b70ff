"""The quality options through the CLI: `train` flags, fine-tuning from a Pytorch-UNet MODEL.pth, and
the `experiment` command end to end on a tiny data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.cli import main
from unet_deploy.model import UNet
from unet_deploy.train.experiment import VARIANTS


def make_dataset(folder: Path, n: int, seed: int, width: int = 64, height: int = 48) -> Path:
    """Carvana layout: imgs/<id>.jpg, masks/<id>_mask.gif (palette, values 0/1), an ellipse 'car'."""
    rng = np.random.default_rng(seed)
    (folder / "imgs").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    yy, xx = np.mgrid[:height, :width]
    for i in range(n):
        cx, cy = rng.uniform(0.35, 0.65) * width, rng.uniform(0.4, 0.6) * height
        ax, ay = rng.uniform(0.2, 0.35) * width, rng.uniform(0.15, 0.3) * height
        mask = (((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1).astype(np.uint8)
        colour = np.where(mask[..., None] > 0, rng.integers(150, 255, 3), rng.integers(40, 130, 3))
        image = np.clip(colour + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "imgs" / f"car{seed}_{i:02d}.jpg", quality=92)
        Image.fromarray(mask, mode="L").convert("P").save(folder / "masks" / f"car{seed}_{i:02d}_mask.gif")
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quality-data")
    return {name: make_dataset(root / name, n, seed)
            for name, n, seed in (("train", 8, 1), ("heldout", 4, 2), ("source", 8, 3))}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is small and shared
    yield
    torch.set_num_threads(before)


def cli(args: list[str]) -> None:
    """Run the CLI in-process; success must exit 0 (typer's standalone mode raises SystemExit(0))."""
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None), f"unet-deploy {' '.join(args)} exited {e.code}"


def _conv_weights(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(".weight") and v.ndim == 4}


@pytest.mark.slow
def test_finetune_from_pytorch_unet_state_dict_starts_from_its_weights(sets, tmp_path, capsys, one_thread):
    torch.manual_seed(1234)  # not the training seed: a fresh init would differ everywhere
    source = UNet(3, 2, base_channels=4)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    model_pth = tmp_path / "MODEL.pth"
    torch.save({**state, "mask_values": [0, 1]}, model_pth)  # how Pytorch-UNet's train.py saves

    common = ["train", "--data", str(sets["train"]), "-e", "1", "-b", "2", "-v", "0", "--max-steps", "1",
              "-s", "1", "--seed", "0", "-q", "--base-channels", "4", "--recipe", "pytorch-unet"]
    cli([*common, "-f", str(model_pth), "--checkpoint-dir", str(tmp_path / "ft")])
    assert "fine-tuning from" in capsys.readouterr().out
    cli([*common, "--checkpoint-dir", str(tmp_path / "scratch")])

    tuned = load_checkpoint(tmp_path / "ft" / "last.pth")
    scratch = load_checkpoint(tmp_path / "scratch" / "last.pth")
    assert tuned.kind == "unet-deploy" and tuned.config.model.base_channels == 4
    start, after = _conv_weights(state), _conv_weights(tuned.state_dict)
    # one RMSprop step at lr 1e-5 moves a weight by about 10 * lr: the run started from the file
    drift = max((after[k] - start[k]).abs().max().item() for k in start)
    assert 0 < drift < 1e-3
    gap = max((scratch.state_dict[k] - start[k]).abs().max().item() for k in start)
    assert gap > 100 * drift
    # a fresh optimizer: its state holds exactly the one step taken in this run
    steps = {int(s["step"]) for s in tuned.training["optimizer"]["state"].values()}
    assert steps == {1} and tuned.training["epoch"] == 1


@pytest.mark.slow
def test_train_quality_flags(sets, tmp_path, capsys, one_thread):
    out = tmp_path / "ck"
    cli(["train", "--data", str(sets["train"]), "-e", "2", "-b", "2", "-v", "25", "--max-steps", "4",
          "-s", "1", "-q", "--base-channels", "4", "-l", "1e-3", "--optimizer", "adamw",
          "--checkpoint-dir", str(out),
          "--augment", "default", "--rotate", "5", "--edge-weight", "5", "--edge-width", "2",
          "--schedule", "cosine", "--warmup-steps", "1"])
    text = capsys.readouterr().out
    assert "rotate ±5°" in text and "edge weight 5" in text and "cosine schedule, 1 warm-up" in text
    saved = load_checkpoint(out / "last.pth").training
    assert "lr_lambdas" in saved["scheduler"] and saved["scheduler"]["last_epoch"] == 4  # stepped per batch
    assert saved["optimizer"]["param_groups"][0]["lr"] < 1e-3  # decayed (cosine over max-steps)

    for bad, flag in ((["--edge-weight", "0.5"], "--edge-weight"), (["--augment", "wild"], "--augment"),
                      (["--warmup-steps", "3", "--schedule", "plateau"], "--warmup-steps"),
                      (["--hflip", "2"], "--hflip")):
        with pytest.raises(SystemExit) as exc:
            main(["train", "--data", str(sets["train"]), "--checkpoint-dir", str(tmp_path / "bad"), *bad])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_quick_experiment_end_to_end(sets, tmp_path, capsys):
    work = tmp_path / "exp"
    md = tmp_path / "RESULTS.md"
    before = torch.get_num_threads()
    cli(["experiment", "--quick", "--threads", "1", "--data", str(sets["train"]), "--heldout",
          str(sets["heldout"]), "--source", str(sets["source"]), "-o", str(work), "--markdown", str(md),
          "--quiet"])
    assert torch.get_num_threads() == before  # the experiment restores the thread count
    out = capsys.readouterr().out
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert table[0].startswith("| variant | what changes | steps | held-out dice")
    assert [ln.split("|")[1].strip() for ln in table[1:]] == list(VARIANTS)
    result = json.loads((work / "results.json").read_text())
    assert {r["variant"] for r in result["runs"]} == set(VARIANTS)
    for r in result["runs"]:
        assert 0.0 <= r["dice"] <= 1.0 and 0.0 <= r["boundary_acc"] <= 1.0 and r["time_s"] > 0
        assert Path(r["checkpoint"]).is_file()
        assert r["steps"] == (48 if r["variant"] == "longer" else 24)
    # every variant saw the same data but trained differently, so their weights differ
    states = {r["variant"]: load_checkpoint(r["checkpoint"]).state_dict for r in result["runs"]}
    base = states.pop("baseline")
    for name, st in states.items():
        assert not torch.equal(st["inc.double_conv.0.weight"], base["inc.double_conv.0.weight"]), name
    # the fine-tune start point was saved in Pytorch-UNet's format and scored through evaluate_model
    assert load_checkpoint(result["pretrain"]["model"]).kind == "pytorch-unet"
    text = md.read_text()
    assert "| finetune |" in text
    command = result["command"]
    assert f"Made with `{command}`" in text and command.startswith("unet-deploy experiment ")
    for part in (f"--work-dir {work}", f"--data {sets['train']}", f"--heldout {sets['heldout']}",
                 "--threads 1", "--quick", f"--markdown {md}", "--quiet"):
        assert part in command


def test_experiment_refuses_bad_input(sets, tmp_path, capsys):
    for args, flag in ((["--variants", "baseline,magic"], "--variants"), (["--seeds", "a,b"], "--seeds"),
                       (["--heldout", str(sets["train"])], "--heldout")):
        with pytest.raises(SystemExit) as exc:
            main(["experiment", "--data", str(sets["train"]), "--heldout", str(sets["heldout"]),
                  "-o", str(tmp_path / "e"), "--quiet", *args])
        assert exc.value.code != 0
        assert flag in capsys.readouterr().err
