"""Estimates before big work (issue 25): one line when a predict, train or benchmark run is likely to need more
than 2 GB or more than a minute per image, and the decompression-bomb error's size and limit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.runtime import estimates
from unet_deploy.runtime.estimates import (
    benchmark_estimate_line,
    estimate_seconds,
    predict_estimate_line,
    train_estimate_line,
)


def _backend(base: int = 16, bilinear: bool = False, device: str = "cpu", name: str = "ort") -> SimpleNamespace:
    return SimpleNamespace(name=name, precision="fp32", device=device,
                           config=DeployConfig(model=ModelConfig(base_channels=base, bilinear=bilinear)))


def test_time_model_matches_the_measured_run_it_comes_from():
    """Issue 25's run: a 1918x1280 photo at -s 4, base-16 bilinear, eager torch, 204 s on 2 cores."""
    seconds = estimate_seconds(ModelConfig(base_channels=16, bilinear=True), 5120, 7672, cores=2)
    assert seconds == pytest.approx(204, rel=0.05)
    assert estimate_seconds(ModelConfig(base_channels=16), 640, 959, cores=2) < 5  # Carvana at 0.5: seconds
    # training does forward + backward: three times the work; twice the cores, half the time
    model = ModelConfig(base_channels=32)
    assert estimate_seconds(model, 100, 100, training=True, cores=4) == pytest.approx(
        1.5 * estimate_seconds(model, 100, 100, cores=2))


def test_predict_line_for_a_big_image_says_the_estimate_and_the_fix(monkeypatch):
    monkeypatch.setattr(estimates, "_cores", lambda: 2)
    line = predict_estimate_line(_backend(), 1918, 1280, 4.0, label="big.jpg")
    assert line is not None and "\n" not in line
    assert line.startswith("estimate: big.jpg: 1918x1280 px at scale 4 (7672x5120 px network input) needs about ")
    assert "9.0 GiB" in line and "4.1 min per image on 2 CPU core(s)" in line
    # both fixes the issue asks for: a scale at which both estimates fit, and tiling
    assert "-s/--scale 1.85" in line and "--tile 512" in line
    at_fix = predict_estimate_line(_backend(), 1918, 1280, 1.85)
    assert at_fix is None, at_fix
    # tiled, the memory is a tile's: only the time is big, and the fix is the scale
    tiled = predict_estimate_line(_backend(), 1918, 1280, 4.0, tile=512)
    assert tiled is not None and "in tiles of 512 px" in tiled and "--tile 512" not in tiled
    assert predict_estimate_line(_backend(), 1918, 1280, 0.5) is None  # Carvana at its usual scale: quiet
    assert predict_estimate_line(_backend(device="cuda:0"), 1918, 1280, 4.0) is None  # GPUs: not estimated
    assert "dropping --tta" in predict_estimate_line(_backend(), 1918, 1280, 4.0, tta=True)


def test_train_and_benchmark_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(estimates, "_cores", lambda: 2)
    big = tmp_path / "carvana.jpg"
    Image.new("RGB", (1918, 1280)).save(big)
    line = train_estimate_line(ModelConfig(base_channels=64), big, 1.0, 2)
    assert line is not None and line.startswith("estimate: training on 1918x1280 px images (scale 1), batches of 2")
    assert "-s/--scale" in line and "per image per epoch" in line
    assert train_estimate_line(ModelConfig(base_channels=16), big, 0.25, 2) is None
    seed = benchmark_estimate_line(ModelConfig(base_channels=64), (1918, 1280), (0.5, 1.0))
    assert seed is not None and "(1918x1280 px, scale 1, eager torch)" in seed and "--scales 0.45" in seed
    assert benchmark_estimate_line(ModelConfig(base_channels=8), (240, 160), (0.5, 1.0)) is None  # --quick


def test_predict_prints_the_estimate_once_per_size_before_the_masks(tmp_path, monkeypatch, capsys):
    """Through the real CLI (in-process, with a slow CPU assumed so a small image counts as big): one line per
    distinct image size, on stderr, and the masks are still written."""
    import torch

    from unet_deploy.cli import main
    from unet_deploy.export import export_onnx

    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(base_channels=8), inference=InferenceConfig(scale=1.0))
    model_path = export_onnx(cfg.model.build().eval(), cfg, tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    names = []
    for i, size in enumerate([(96, 64), (96, 64), (64, 48)]):
        names.append(tmp_path / f"car{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(names[-1])
    monkeypatch.setattr(estimates, "CPU_GFLOPS_PER_CORE", 1e-4)
    with pytest.raises(SystemExit) as done:
        main(["predict", *map(str, names), "-m", str(model_path), "-o", str(tmp_path / "out")])
    assert done.value.code in (0, None)
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.startswith("estimate: ")]
    assert len(lines) == 2, out.err  # two sizes
    assert "96x64 px at scale 1" in lines[0] and "64x48 px at scale 1" in lines[1]
    for name in names:
        mask = np.asarray(Image.open(tmp_path / "out" / f"{name.stem}_OUT.png"))
        assert mask.shape == np.asarray(Image.open(name)).shape[:2]


def test_bomb_error_gives_the_size_and_the_limit(tmp_path: Path):
    from unet_deploy.errors import UserError
    from unet_deploy.images.image_io import MAX_PIXELS, load_image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx in a few kB: Pillow's own bomb check trips first
    big = tmp_path / "big.png"
    Image.new("1", (8000, 6000)).save(big)  # 48 Mpx: over this package's limit only
    for path, size in ((bomb, "20000x20000 px = 400.0 Mpx"), (big, "8000x6000 px = 48.0 Mpx")):
        with pytest.raises(UserError) as exc:
            load_image(path)
        message = str(exc.value)
        assert "\n" not in message and message.startswith(f"{path}: image too large ({size}")
        assert f"the limit is {MAX_PIXELS} px" in message and "downscale it first" in message


def test_train_prints_the_estimate_before_its_first_epoch(tmp_path, monkeypatch, capsys):
    from unet_deploy.cli import main
    from unet_deploy.images.synth import generate_dataset

    generate_dataset(tmp_path / "data", n=4, width=64, height=48, seed=0)
    monkeypatch.setattr(estimates, "CPU_GFLOPS_PER_CORE", 1e-4)
    with pytest.raises(SystemExit) as done:
        main(["train", "--data", str(tmp_path / "data"), "-e", "1", "-b", "2", "-s", "1.0", "--base-channels", "8",
              "--max-steps", "1", "-v", "25", "--checkpoint-dir", str(tmp_path / "ck"), "-q"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("estimate: "))
    assert line.startswith("estimate: training on 64x48 px images (scale 1), batches of 2")
    assert out.index(line) < out.index("epoch 1/1")
