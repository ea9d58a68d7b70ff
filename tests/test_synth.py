"""Tests for the synthetic Carvana-like data generator."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

from unet_deploy.errors import UserError
from unet_deploy.images import synth
from unet_deploy.images.synth import generate_dataset, generate_test_images, render_car

ID_RE = re.compile(r"^[0-9a-f]{12}_(\d{2})$")


def _render(seed: int, w: int = 128, h: int = 96) -> tuple[np.ndarray, np.ndarray]:
    return render_car(np.random.default_rng(seed), w, h)


def test_render_shapes_and_dtypes() -> None:
    img, mask = _render(0)
    assert img.shape == (96, 128, 3) and img.dtype == np.uint8
    assert mask.shape == (96, 128) and mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == {0, 1}


def test_render_is_deterministic() -> None:
    a_img, a_mask = _render(7)
    b_img, b_mask = _render(7)
    assert a_img.tobytes() == b_img.tobytes()
    assert a_mask.tobytes() == b_mask.tobytes()
    c_img, c_mask = _render(8)
    assert a_img.tobytes() != c_img.tobytes()
    assert a_mask.tobytes() != c_mask.tobytes()


@pytest.mark.parametrize("size", [(959, 640), (97, 61), (16, 16), (61, 97)])
def test_render_odd_sizes(size: tuple[int, int]) -> None:
    w, h = size
    img, mask = render_car(np.random.default_rng(1), w, h)
    assert img.shape == (h, w, 3)
    assert mask.shape == (h, w)


def test_mask_coverage_is_plausible() -> None:
    rng = np.random.default_rng(3)
    for _ in range(24):
        _, mask = render_car(rng, 120, 80)
        assert 0.05 <= mask.mean() <= 0.6


def test_mask_is_not_the_shadow_and_matches_image() -> None:
    """Background pixels far from the car are the light studio; car pixels differ from them."""
    img, mask = _render(5, 240, 160)
    # The top row is wall, never car.
    assert mask[0].sum() == 0
    assert img[0].mean() > 150
    # The mask is one connected blob-ish region: its bounding box is mostly filled.
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert mask.sum() / box > 0.4


def test_cars_are_not_separable_by_one_threshold() -> None:
    """Across a set, body colours range from near-white to near-black, so brightness alone fails."""
    rng = np.random.default_rng(11)
    car_means, blends = [], []
    for _ in range(40):
        img, mask = render_car(rng, 96, 64)
        grey = img.astype(np.float32).mean(axis=2)
        car_means.append(grey[mask == 1].mean())
        # Share of car pixels about as bright as the studio behind them (white/silver cars).
        blends.append((grey[mask == 1] > np.median(grey[mask == 0]) - 10).mean())
    assert min(car_means) < 60 and max(car_means) > 150
    assert sum(b > 0.25 for b in blends) >= 4
    # No single grey threshold classifies every image's pixels at 95% accuracy.
    rng = np.random.default_rng(11)
    for t in range(0, 256, 8):
        ok = True
        for _ in range(12):
            img, mask = render_car(rng, 96, 64)
            grey = img.astype(np.float32).mean(axis=2)
            acc = max(((grey < t) == mask).mean(), ((grey >= t) == mask).mean())
            ok = ok and acc > 0.95
        assert not ok


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dataset_layout_and_masks(tmp_path: Path) -> None:
    out = tmp_path / "data"
    ids = generate_dataset(out, n=5, width=97, height=61, seed=2, angles=3)
    assert len(ids) == 5 and len(set(ids)) == 5
    for i, image_id in enumerate(ids):
        m = ID_RE.match(image_id)
        assert m, image_id
        assert int(m.group(1)) == i % 3 + 1
    # Views of one car share its id.
    assert len({i[:12] for i in ids[:3]}) == 1 and ids[3][:12] != ids[0][:12]
    imgs = sorted(p.stem for p in (out / "imgs").iterdir())
    masks = sorted(p.name[: -len("_mask.gif")] for p in (out / "masks").iterdir())
    assert imgs == masks == sorted(ids)
    for image_id in ids:
        with Image.open(out / "imgs" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (97, 61)
        with Image.open(out / "masks" / f"{image_id}_mask.gif") as gif:
            assert gif.format == "GIF" and gif.mode == "P" and gif.size == (97, 61)
            values = np.asarray(gif)
            palette = gif.getpalette()
        assert set(np.unique(values).tolist()) == {0, 1}
        assert palette is not None and palette[:6] == [0, 0, 0, 255, 255, 255]


def test_gif_mask_equals_rendered_mask(tmp_path: Path) -> None:
    ids = generate_dataset(tmp_path, n=2, width=64, height=48, seed=4)
    rng = np.random.default_rng(4)
    for (image_id, spec, yaw), saved in zip(synth.turntable_views(rng, 2, 16), ids, strict=True):
        assert image_id == saved
        _, mask = synth.render_view(rng, spec, yaw, 64, 48)
        with Image.open(tmp_path / "masks" / f"{image_id}_mask.gif") as gif:
            assert np.array_equal(np.asarray(gif), mask)


def test_dataset_is_deterministic_and_prefix_stable(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", n=3, width=48, height=32, seed=9)
    b = generate_dataset(tmp_path / "b", n=4, width=48, height=32, seed=9)
    c = generate_dataset(tmp_path / "c", n=3, width=48, height=32, seed=10)
    assert b[:3] == a and c != a
    for image_id in a:
        for sub, name in (("imgs", f"{image_id}.jpg"), ("masks", f"{image_id}_mask.gif")):
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes()


def test_overwrite_refusal_and_overwrite(tmp_path: Path) -> None:
    generate_dataset(tmp_path, n=1, width=32, height=32)
    before = _listing(tmp_path)
    with pytest.raises(UserError, match=r"imgs.*--overwrite.*--out"):
        generate_dataset(tmp_path, n=1, width=32, height=32)
    assert _listing(tmp_path) == before
    ids = generate_dataset(tmp_path, n=1, width=40, height=32, overwrite=True)
    with Image.open(tmp_path / "imgs" / f"{ids[0]}.jpg") as im:
        assert im.size == (40, 32)


def test_refuses_when_only_masks_exist(tmp_path: Path) -> None:
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "x_mask.gif").write_bytes(b"old")
    with pytest.raises(UserError, match="masks"):
        generate_dataset(tmp_path, n=1, width=32, height=32)


@pytest.mark.parametrize("kwargs", [
    {"n": 0}, {"width": 15}, {"height": 8}, {"angles": 0}, {"jpeg_quality": 0}, {"jpeg_quality": 101},
])
def test_argument_validation(tmp_path: Path, kwargs: dict[str, int]) -> None:
    with pytest.raises(UserError):
        generate_dataset(tmp_path / "d", **cast(dict[str, Any], kwargs))
    assert not (tmp_path / "d").exists()


def test_out_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        generate_dataset(f, n=1, width=32, height=32)


def test_no_temp_files_after_success(tmp_path: Path) -> None:
    generate_dataset(tmp_path, n=3, width=32, height=32)
    names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
    assert len(names) == 6
    assert not [n for n in names if n.startswith(".") or n.endswith(".tmp")]


def test_failure_mid_write_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self: Image.Image, fp, format=None, **params):
        calls["n"] += 1
        if calls["n"] == 3:  # second image's JPEG: write part of it, then fail
            Path(fp).write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(self, fp, format=format, **params)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        generate_dataset(tmp_path, n=3, width=32, height=32)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    # Only the first complete pair is there; no temp file and no half-written image.
    assert len(files) == 2
    assert not [f for f in files if Path(f).name.startswith(".") or f.endswith(".tmp")]
    for f in files:
        with Image.open(tmp_path / f) as im:
            im.load()


def test_test_images(tmp_path: Path) -> None:
    ids = generate_test_images(tmp_path / "test", n=3, width=50, height=40, seed=0)
    assert sorted(p.stem for p in (tmp_path / "test").iterdir()) == sorted(ids)
    train = generate_dataset(tmp_path / "train", n=3, width=50, height=40, seed=0)
    assert set(ids).isdisjoint(train)
    with pytest.raises(UserError, match="--overwrite"):
        generate_test_images(tmp_path / "test", n=1, width=50, height=40)
