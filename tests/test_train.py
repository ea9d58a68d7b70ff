"""Training really learns, is deterministic, resumes exactly and saves safely on Ctrl-C."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.errors import UserError
from unet_deploy.images.image_io import find_pairs, load_mask
from unet_deploy.runtime import load_backend
from unet_deploy.train import EpochSampler, TrainConfig, evaluate_model, split_pairs, train


def _cfg(data: Path, ckpt: Path, **kw) -> TrainConfig:
    base = dict(data=data, checkpoint_dir=ckpt, epochs=1, batch_size=4, learning_rate=3e-3, optimizer="adamw",
                base_channels=4, bilinear=True, scale=1.0, validation=20, device="cpu", seed=0, progress=False)
    base.update(kw)
    return TrainConfig(**cast(dict[str, Any], base))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict


@pytest.mark.slow
def test_small_model_learns_heldout_dice_above_0_9(synth_train: Path, synth_heldout: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_train, tmp_path, epochs=6, batch_size=8, base_channels=16, scale=0.5, validation=10)
    result = train(cfg, log=lambda _m: None)
    assert result.best_path.exists() and result.last_path.exists()
    assert result.images_per_second > 0
    backend = load_backend(result.best_path, device="cpu")
    assert backend.config.inference.scale == 0.5
    assert backend.config.inference.mask_values == [0, 1]
    score = evaluate_model(backend, find_pairs(synth_heldout / "imgs", synth_heldout / "masks"))
    assert score["n"] == 24
    assert score["dice"] >= 0.9, score["dice"]


def test_same_seed_same_weights_other_seed_differs(synth_tiny: Path, tmp_path: Path) -> None:
    a = train(_cfg(synth_tiny, tmp_path / "a", max_steps=3), log=lambda _m: None)
    b = train(_cfg(synth_tiny, tmp_path / "b", max_steps=3), log=lambda _m: None)
    c = train(_cfg(synth_tiny, tmp_path / "c", max_steps=3, seed=1), log=lambda _m: None)
    wa, wb, wc = _weights(a.last_path), _weights(b.last_path), _weights(c.last_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_continues_exactly(synth_tiny: Path, tmp_path: Path) -> None:
    straight = train(_cfg(synth_tiny, tmp_path / "s", epochs=2), log=lambda _m: None)
    first = train(_cfg(synth_tiny, tmp_path / "r", epochs=1), log=lambda _m: None)
    messages: list[str] = []
    resumed = train(_cfg(synth_tiny, tmp_path / "r", epochs=2, load=first.last_path), log=messages.append)
    assert any("resuming" in m and "epoch 2" in m for m in messages)
    assert resumed.epochs_run == 1
    ws, wr = _weights(straight.last_path), _weights(resumed.last_path)
    for k in ws:
        assert torch.allclose(ws[k].float(), wr[k].float(), atol=1e-6), k
    assert load_checkpoint(resumed.last_path).training["epoch"] == 2


def test_ctrl_c_keeps_an_exact_resume_point(synth_tiny: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def interrupt_in_epoch_two(image, mask):
        calls["n"] += 1
        if calls["n"] == 9 + 3:  # 9 training images per epoch: the 3rd image of epoch 2
            raise KeyboardInterrupt
        return image, mask

    messages: list[str] = []
    cfg = _cfg(synth_tiny, tmp_path / "r", epochs=3, hooks={"transform": interrupt_in_epoch_two})
    result = train(cfg, log=messages.append)
    assert result.interrupted
    assert any("interrupted in epoch 2" in m and "-f" in m for m in messages)
    last = load_checkpoint(tmp_path / "r" / "last.pth")
    assert last.training["epoch"] == 1  # the last finished epoch, not the interrupted one
    partial = load_checkpoint(tmp_path / "r" / "interrupted.pth")
    assert partial.training["interrupted_in_epoch"] == 2
    assert not list((tmp_path / "r").glob(".*tmp"))

    resumed = train(_cfg(synth_tiny, tmp_path / "r", epochs=3, load=tmp_path / "r" / "last.pth"),
                    log=lambda _m: None)
    straight = train(_cfg(synth_tiny, tmp_path / "s", epochs=3), log=lambda _m: None)
    wr, ws = _weights(resumed.last_path), _weights(straight.last_path)
    for k in ws:
        assert torch.allclose(wr[k].float(), ws[k].float(), atol=1e-6), k


def test_one_class_sigmoid_model_trains(synth_tiny: Path, tmp_path: Path) -> None:
    result = train(_cfg(synth_tiny, tmp_path, n_classes=1, max_steps=2), log=lambda _m: None)
    ckpt = load_checkpoint(result.last_path)
    assert ckpt.config.model.n_classes == 1
    assert ckpt.state_dict["outc.conv.weight"].shape[0] == 1


def test_more_mask_values_than_classes_is_a_clear_error(synth_tiny: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(synth_tiny, data)
    mask_path = sorted((data / "masks").iterdir())[0]
    m = np.asarray(Image.open(mask_path)).copy()
    m[0, :5] = 2
    img = Image.fromarray(m, "P")
    img.putpalette([0, 0, 0, 255, 255, 255, 128, 128, 128] + [0] * 759)
    img.save(mask_path)
    with pytest.raises(UserError, match=r"masks hold 3 distinct values .* pass --classes 3"):
        train(_cfg(data, tmp_path / "ck"), log=lambda _m: None)


@pytest.mark.parametrize("kw,match", [
    (dict(scale=7.0), r"-s/--scale 7\.0: must be in \(0, 4\]"),
    (dict(base_channels=3), "--base-channels 3: must be an even number"),
    (dict(n_classes=0), "-c/--classes 0"),
    (dict(workers=-1), "--workers -1"),
    (dict(scale=0.1), r"at --scale 0\.1 is 6x4, too small for the U-Net"),
])
def test_option_values_fail_early_in_one_line(synth_tiny: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        train(_cfg(synth_tiny, tmp_path, **kw), log=lambda _m: None)


def test_checkpoint_dir_that_is_a_file_fails_before_training(synth_tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="--checkpoint-dir .*afile: is a file"):
        train(_cfg(synth_tiny, tmp_path / "afile"), log=lambda _m: None)


def test_explicit_architecture_flags_must_match_the_loaded_checkpoint(synth_tiny: Path, tmp_path: Path) -> None:
    first = train(_cfg(synth_tiny, tmp_path / "a", max_steps=1), log=lambda _m: None)
    with pytest.raises(UserError, match=r"--base-channels 16: the -f checkpoint .* has 4"):
        train(_cfg(synth_tiny, tmp_path / "b", load=first.last_path, base_channels=16,
                   explicit=("base_channels",)), log=lambda _m: None)
    # not given on the command line: the checkpoint's architecture is used silently
    train(_cfg(synth_tiny, tmp_path / "c", load=first.last_path, base_channels=16, max_steps=1), log=lambda _m: None)


def test_evaluate_reads_0_255_masks_like_predict_writes(synth_tiny: Path, tmp_path: Path) -> None:
    result = train(_cfg(synth_tiny, tmp_path / "ck", max_steps=2), log=lambda _m: None)
    backend = load_backend(result.last_path, device="cpu")
    assert backend.config.inference.mask_values == [0, 1]  # Carvana-style GIF masks
    pairs = find_pairs(synth_tiny / "imgs", synth_tiny / "masks")[:3]
    data = tmp_path / "png"
    (data / "imgs").mkdir(parents=True)
    (data / "masks").mkdir()
    for p in pairs:
        shutil.copy(p.image, data / "imgs" / p.image.name)
        Image.fromarray(load_mask(p.mask) * 255).save(data / "masks" / f"{p.id}_mask.png")
    png = find_pairs(data / "imgs", data / "masks")
    reference = evaluate_model(backend, pairs)
    assert evaluate_model(backend, png)["per_image"] == reference["per_image"]
    assert evaluate_model(backend, png, mask_values=[0, 255])["per_image"] == reference["per_image"]
    with pytest.raises(UserError, match="outside the expected mask values"):
        evaluate_model(backend, png, mask_values=[0, 7])


def test_batch_larger_than_data_is_a_clear_error(synth_tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--batch-size 64 is larger"):
        train(_cfg(synth_tiny, tmp_path, batch_size=64), log=lambda _m: None)


def test_split_is_seeded_and_disjoint(synth_tiny: Path) -> None:
    pairs = find_pairs(synth_tiny / "imgs", synth_tiny / "masks")
    t1, v1 = split_pairs(pairs, 25, seed=0)
    t2, v2 = split_pairs(pairs, 25, seed=0)
    assert (t1, v1) == (t2, v2) and len(v1) == 3
    assert not {p.id for p in t1} & {p.id for p in v1}
    with pytest.raises(UserError, match="-v/--validation"):
        split_pairs(pairs, 100, seed=0)


def test_epoch_sampler_shards_rebuild_the_global_batches() -> None:
    single = list(EpochSampler(10, 4, seed=5))
    r0 = list(EpochSampler(10, 4, seed=5, rank=0, world=2))
    r1 = list(EpochSampler(10, 4, seed=5, rank=1, world=2))
    assert len(single) == 8  # ragged last batch dropped
    for k in range(2):
        assert sorted(single[4 * k: 4 * k + 4]) == sorted(r0[2 * k: 2 * k + 2] + r1[2 * k: 2 * k + 2])


def test_sigterm_saves_interrupted_pth_like_ctrl_c(synth_tiny: Path, tmp_path: Path) -> None:
    """A scheduler's SIGTERM (a Slurm preemption, a Kubernetes eviction) keeps the unfinished epoch as Ctrl-C
    does: interrupted.pth, one line saying how to go on, exit code 143, and DataLoader workers that let the
    training process stop them."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    args = [sys.executable, "-m", "unet_deploy", "train", "--data", str(synth_tiny), "--checkpoint-dir", str(ckpt),
            "-e", "200", "-b", "2", "--base-channels", "4", "--scale", "1", "-v", "20", "--device", "cpu",
            "--workers", "1", "--augment", "none"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and not (ckpt / "last.pth").exists():
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGTERM)  # to the whole group, as Slurm does: the loader worker too
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err and "Traceback" not in out, err
    assert "interrupted in epoch" in out + err and "-f" in out + err
    partial = load_checkpoint(ckpt / "interrupted.pth")
    assert partial.training["interrupted_in_epoch"] >= 2
    assert not list(ckpt.glob(".*tmp"))


@pytest.mark.parametrize(("free", "batch", "noted"), [(0.4, 2, True), (1.9, 2, False), (0.4, 3, False)])
def test_a_busy_cpu_suggests_training_in_processes(synth_tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   free: float, batch: int, noted: bool) -> None:
    """One CPU process training while other jobs take the CPUs: one line suggests `--nproc 2` (not when the
    CPUs are free, nor when the batch does not split in two)."""
    from typer.testing import CliRunner

    from unet_deploy.cli import app
    from unet_deploy.runtime import cpu_share

    monkeypatch.setattr(cpu_share, "usable_cpus", lambda: 2)
    monkeypatch.setattr(cpu_share, "wait_choice", lambda: cpu_share.WaitChoice(free, 2, 2, True, False))
    res = CliRunner().invoke(app, ["train", "--data", str(synth_tiny), "-e", "1", "-b", str(batch), "-s", "1",
                                   "--max-steps", "1", "--base-channels", "4", "--device", "cpu", "-q",
                                   "--checkpoint-dir", str(tmp_path / "ck")])
    assert res.exit_code == 0, res.output
    note = "note: other processes left 0.4 of 2 CPUs free: training in processes of one thread (add --nproc 2)"
    assert (note in res.stderr) is noted, res.stderr
