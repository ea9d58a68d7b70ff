"""Shared fixtures: small synthetic Carvana-like data sets written to disk once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from unet_deploy.images.synth import generate_dataset

#: The CPU views precision-dependent tests (marker ``precision``) run under: the CPU as it is, and with bf16/AMX
#: hidden from the capability probe (``UNET_DEPLOY_CPU_HIDE=bf16``), so an AMX or AVX-512 BF16 machine also runs
#: the paths of a CPU without them. Child processes inherit the view through the environment.
CPU_VIEWS = {"cpu-native": None, "cpu-no-bf16": "bf16"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("precision") is not None:
        metafunc.parametrize("cpu_view", list(CPU_VIEWS), indirect=True)


@pytest.fixture(autouse=True)
def cpu_view(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The view a ``precision`` test runs under (None for other tests: the CPU as it is, or as the caller's
    environment already says)."""
    from unet_deploy.runtime.cpu_features import HIDE_ENV

    name = getattr(request, "param", None)
    if name is not None:
        hide = CPU_VIEWS[name]
        if hide is None:
            monkeypatch.delenv(HIDE_ENV, raising=False)
        else:
            monkeypatch.setenv(HIDE_ENV, hide)
    return name


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 pairs at 192x128 (Carvana layout), seed 1."""
    root = tmp_path_factory.mktemp("synth_train")
    generate_dataset(root, n=96, width=192, height=128, seed=1)
    return root


@pytest.fixture(scope="session")
def synth_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 pairs from other cars (seed 2): never seen in training."""
    root = tmp_path_factory.mktemp("synth_heldout")
    generate_dataset(root, n=24, width=192, height=128, seed=2)
    return root


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 pairs at 64x48 for fast checks of the training machinery."""
    root = tmp_path_factory.mktemp("synth_tiny")
    generate_dataset(root, n=12, width=64, height=48, seed=3)
    return root


@pytest.fixture(scope="session")
def fit_tiny_unet() -> Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.nn.Module, object]]:
    """``fit(x, y, steps)``: a base-8 U-Net fitted on one batch (inputs at scale 0.5, class-index masks)
    with AdamW, so its masks are not trivial; returns (model in eval mode, DeployConfig)."""
    from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
    from unet_deploy.train import segmentation_loss

    def fit(x: torch.Tensor, y: torch.Tensor, steps: int):
        # One thread: the result must not depend on thread counts other tests (or the machine) left set.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _fit(x, y, steps)
        finally:
            torch.set_num_threads(threads)

    def _fit(x: torch.Tensor, y: torch.Tensor, steps: int):
        torch.manual_seed(0)
        cfg = DeployConfig(model=ModelConfig(base_channels=8),
                           inference=InferenceConfig(scale=0.5, mask_values=[0, 1]))
        model = cfg.model.build()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        for _ in range(steps):
            loss = segmentation_loss(model(x), y, 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model.eval(), cfg

    return fit


@pytest.fixture(scope="session")
def fit_on_heldout_cars(fit_tiny_unet, synth_heldout
                        ) -> Callable[[int, int], tuple[torch.nn.Module, object, list[Path]]]:
    """``fit(n, steps)``: :func:`fit_tiny_unet` on the first ``n`` held-out cars (inputs at scale 0.5, car vs
    background); returns (model, DeployConfig, all held-out image paths)."""
    import numpy as np
    from PIL import Image

    from unet_deploy.images.image_io import list_images, load_image, preprocess

    def fit(n: int, steps: int):
        images = list_images(synth_heldout / "imgs")
        masks = sorted((synth_heldout / "masks").iterdir())
        x = torch.from_numpy(np.stack([preprocess(load_image(p), 0.5) for p in images[:n]]))
        y = torch.from_numpy(np.stack([np.asarray(Image.open(m).resize((96, 64), Image.Resampling.NEAREST)) > 0
                                       for m in masks[:n]])).long()
        model, cfg = fit_tiny_unet(x, y, steps)
        return model, cfg, images

    return fit


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One literal ``unet-deploy demo`` (default options) per session, in a fresh folder, shared by
    ``tests/test_demo.py`` (which checks its output in depth) and the README test (which copies its ``demo/``
    folder instead of training a second demo). Returns ``dir`` (the folder holding ``demo/``), ``proc`` (the
    completed process) and ``ignore`` (for ``shutil.copytree``: what tests wrote into ``demo/`` afterwards)."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    folder = tmp_path_factory.mktemp("demo_run")
    env = dict(os.environ, PYTHONPATH=str(root), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "unet_deploy", "demo"], cwd=folder, capture_output=True, text=True,
                          env=env, timeout=1400, stdin=subprocess.DEVNULL)
    demo_dir = folder / "demo"

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "car_OUT.png"] if Path(directory) == demo_dir else []

    return {"dir": folder, "proc": proc, "ignore": ignore}


#: (width, height) of the sharded-prediction test images: 4 JPEGs of each size.
SHARD_TEST_SIZES = [(64, 48), (80, 56), (96, 64)]


@pytest.fixture(scope="session")
def tiny_model_and_test_images(fit_tiny_unet) -> Callable[[Path], tuple[Path, Path]]:
    """``make(root)``: a base-8 U-Net trained a few steps on synthetic cars, saved as ``root/m.pth``, and
    ``root/test/`` with 4 JPEGs of each :data:`SHARD_TEST_SIZES`; returns (checkpoint, test folder). The
    torchrun and Ray prediction tests compare their outputs with single-process predict on these."""
    import numpy as np
    from PIL import Image

    from unet_deploy.checkpoint import save_checkpoint
    from unet_deploy.images.image_io import find_pairs, load_image, load_mask, preprocess
    from unet_deploy.images.synth import generate_test_images

    def make(root: Path) -> tuple[Path, Path]:
        generate_dataset(root / "train", n=8, width=64, height=48, seed=5)
        pairs = find_pairs(root / "train" / "imgs", root / "train" / "masks")
        x = torch.from_numpy(np.stack([preprocess(load_image(p.image), 0.5) for p in pairs]))
        y = torch.from_numpy(np.stack([np.asarray(Image.fromarray(load_mask(p.mask)).resize(
            (32, 24), Image.Resampling.NEAREST)) for p in pairs])).long()
        model, cfg = fit_tiny_unet(x, y, 40)
        ckpt = save_checkpoint(root / "m.pth", model, cfg)
        test = root / "test"
        test.mkdir()
        for i, (w, h) in enumerate(SHARD_TEST_SIZES):
            for name in generate_test_images(root / f"t{i}", n=4, width=w, height=h, seed=10 + i):
                (test / f"s{i}_{name}.jpg").write_bytes((root / f"t{i}" / f"{name}.jpg").read_bytes())
        return ckpt, test

    return make
