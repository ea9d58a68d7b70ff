"""load_image / preprocess / pairing: every mode, EXIF rotation, odd sizes, and broken files."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_deploy.errors import UserError
from unet_deploy.images.image_io import (
    IMAGE_FORMATS,
    MAX_PIXELS,
    discover_mask_values,
    find_pairs,
    list_images,
    load_image,
    load_mask,
    mask_to_index,
    preprocess,
    preprocess_mask,
    scaled_size,
)


def _rgb(w: int = 37, h: int = 23, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------ load_image
def test_rgb_png_round_trip_exact(tmp_path: Path) -> None:
    arr = _rgb()
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (23, 37, 3)
    assert np.array_equal(out, arr)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "I", "F"])
def test_every_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    base = Image.fromarray(_rgb(41, 29))
    if mode == "I;16":
        grey = np.asarray(base.convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(grey)
        assert img.mode == "I;16"
        suffix = ".png"
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
        suffix = ".tif"
    else:
        img = base.convert(mode)
        suffix = ".tif" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    img.save(path)
    out = load_image(path)
    assert out.shape == (29, 41, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16", "I", "F"):
        expected = np.asarray(base.convert("L"))
        assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = 200  # red under the alpha
    rgba[:, :6, 3] = 255  # left half opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = load_image(tmp_path / "t.png")
    assert (out[:, :6] == [200, 0, 0]).all()
    assert (out[:, 6:] == 255).all()


def test_grey_one_channel_models(tmp_path: Path) -> None:
    Image.fromarray(_rgb()).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png", channels=1)
    assert out.shape == (23, 37, 1)


@pytest.mark.parametrize("orientation,transpose", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270),
                                                   (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, transpose) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:5, :10] = 255  # a white block top-left marks the orientation
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "r.jpg")
    expected = np.asarray(img.transpose(transpose))
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).mean() < 4


def _png_with_size(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr: ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"),
    ("folder", "is a folder"),
    ("empty", r"empty image file \(0 bytes\)"),
    ("text", "not a readable image"),
    ("truncated", "broken or truncated"),
    ("bomb", "too large"),
    ("huge", "too large"),
])
def test_broken_files_give_one_line_naming_the_file(tmp_path: Path, case: str, match: str) -> None:
    path = tmp_path / f"{case}.jpg"
    if case == "folder":
        path.mkdir()
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, I am not an image\n" * 20)
    elif case == "truncated":
        buf = io.BytesIO()
        Image.fromarray(_rgb(300, 200)).save(buf, "JPEG", quality=90)
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "bomb":
        path = tmp_path / "bomb.png"
        path.write_bytes(_png_with_size(60000, 60000))
    elif case == "huge":
        side = int(MAX_PIXELS**0.5) + 10  # over our limit, under Pillow's own
        path = tmp_path / "huge.png"
        path.write_bytes(_png_with_size(side, side))
    with pytest.raises(UserError) as err:
        load_image(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert pytest.importorskip("re").search(match, msg)


# ------------------------------------------------------------------------------------ preprocess
def test_preprocess_matches_pytorch_unet_formula() -> None:
    arr = _rgb(1918 // 8, 1280 // 8)
    out = preprocess(arr, 0.5)
    w, h = int(0.5 * arr.shape[1]), int(0.5 * arr.shape[0])
    ref = np.asarray(Image.fromarray(arr).resize((w, h), resample=Image.Resampling.BICUBIC))
    ref = ref.transpose(2, 0, 1) / 255.0
    assert out.shape == (3, h, w) and out.dtype == np.float32
    assert np.abs(out - ref).max() < 1e-6


def test_carvana_scale_half_is_959_by_640() -> None:
    assert scaled_size(1918, 1280, 0.5) == (959, 640)
    with pytest.raises(UserError, match="--scale"):
        scaled_size(10, 10, 0.01)


def test_mask_resize_never_blends_values() -> None:
    mask = np.zeros((33, 47), np.uint8)
    mask[5:20, 7:30] = 255
    small = preprocess_mask(mask, 0.37)
    assert set(np.unique(small).tolist()) <= {0, 255}


# ----------------------------------------------------------------------------------- pairs, masks
def _write_pair(root: Path, stem: str, size=(32, 24), mask_value: int = 1, mask_ext: str = ".gif",
                suffix: str = "_mask") -> None:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(*size)).save(root / "imgs" / f"{stem}.jpg")
    m = np.zeros(size[::-1], np.uint8)
    m[4:12, 6:20] = mask_value
    img = Image.fromarray(m, "L")
    if mask_ext == ".gif":
        img = img.convert("P")
        img.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    img.save(root / "masks" / f"{stem}{suffix}{mask_ext}")


def test_carvana_pairs_and_gif_mask_values(tmp_path: Path) -> None:
    for i in range(3):
        _write_pair(tmp_path, f"0cdf5b5d0ce1_{i + 1:02d}")
    pairs = find_pairs(tmp_path / "imgs", tmp_path / "masks")
    assert [p.id for p in pairs] == ["0cdf5b5d0ce1_01", "0cdf5b5d0ce1_02", "0cdf5b5d0ce1_03"]
    assert discover_mask_values([p.mask for p in pairs]) == [0, 1]
    idx = mask_to_index(load_mask(pairs[0].mask), [0, 1])
    assert idx.sum() == 8 * 14


def test_same_stem_png_masks_with_0_255(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a", mask_value=255, mask_ext=".png", suffix="")
    pairs = find_pairs(tmp_path / "imgs", tmp_path / "masks")
    assert discover_mask_values([pairs[0].mask]) == [0, 255]


def test_image_without_mask(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a")
    Image.fromarray(_rgb()).save(tmp_path / "imgs" / "b.jpg")
    with pytest.raises(UserError, match=r"b\.jpg: no mask found"):
        find_pairs(tmp_path / "imgs", tmp_path / "masks")


def test_mask_without_image(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a")
    _write_pair(tmp_path, "b")
    (tmp_path / "imgs" / "b.jpg").unlink()
    with pytest.raises(UserError, match=r"b_mask\.gif: mask without an image"):
        find_pairs(tmp_path / "imgs", tmp_path / "masks")


def test_size_mismatch(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a")
    Image.fromarray(_rgb(33, 24)).save(tmp_path / "imgs" / "a.jpg")
    with pytest.raises(UserError, match=r"a_mask\.gif: mask is 32x24 but image a\.jpg is 33x24"):
        find_pairs(tmp_path / "imgs", tmp_path / "masks")


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserError, match="no images found"):
        find_pairs(tmp_path / "imgs", tmp_path / "masks")
    with pytest.raises(UserError, match="folder not found"):
        find_pairs(tmp_path / "nope", tmp_path / "masks")


def test_unexpected_mask_value_names_file() -> None:
    mask = np.array([[0, 1], [2, 1]], np.uint8)
    with pytest.raises(UserError, match=r"m\.gif: mask has value 2 outside the expected mask values \[0, 1\]"):
        mask_to_index(mask, [0, 1], "m.gif")


def test_rgb_masks_map_colours_to_classes() -> None:
    mask = np.zeros((2, 3, 3), np.uint8)
    mask[0, 0] = [255, 0, 0]
    mask[1, 2] = [0, 255, 0]
    values = [[0, 0, 0], [0, 255, 0], [255, 0, 0]]
    idx = mask_to_index(mask, values)
    assert idx.tolist() == [[2, 0, 0], [0, 0, 1]]


def test_files_are_closed_after_loading(tmp_path: Path) -> None:
    """A file object finalised unclosed warns (ResourceWarning) from its __del__, where a raised warning
    cannot propagate; so the warnings are recorded, not raised, and must be none. Checked by hand: an
    ``open(path)`` left unclosed in ``_open`` makes this fail."""
    import gc
    import warnings

    _write_pair(tmp_path, "a")
    gc.collect()  # garbage from earlier tests must not be counted here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        load_mask(tmp_path / "masks" / "a_mask.gif")  # GIF: multi-frame, PIL keeps the file open
        load_image(tmp_path / "masks" / "a_mask.gif")
        load_image(tmp_path / "imgs" / "a.jpg")
        gc.collect()  # finalise anything kept alive by a reference cycle
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []


def test_predict_outputs_in_an_images_folder_are_not_read_as_images(tmp_path: Path) -> None:
    """Masks and overlays that `predict` wrote into the images folder (default names, or any name with the
    run stamp) break neither pairing for `train`/`evaluate` nor folder expansion for `predict`."""
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.predict import expand_inputs, write_mask

    generate_dataset(tmp_path, n=3, width=64, height=48, seed=0)
    imgs = tmp_path / "imgs"
    originals = list_images(imgs)
    mask = np.zeros((48, 64), np.uint8)
    write_mask(imgs / f"{originals[0].stem}_OUT.png", mask, [0, 255], fingerprint="run-1")
    Image.new("RGB", (64, 48)).save(imgs / f"{originals[0].stem}_OVERLAY.png")
    write_mask(imgs / "custom-name.png", mask, [0, 255], fingerprint="run-2")  # stamped: also left out
    Image.new("RGB", (64, 48)).save(imgs / "user-photo.png")  # a user's own PNG is an image
    assert list_images(imgs) == sorted([*originals, imgs / "user-photo.png"])
    (imgs / "user-photo.png").unlink()
    assert [p.image for p in find_pairs(imgs, tmp_path / "masks")] == originals
    assert expand_inputs([imgs])[0] == originals
    assert expand_inputs([str(imgs / "*.png")])[0] == []


# ------------------------------------------------------------------------------------ formats
#: formats Pillow can write but this project does not read (EPS would run Ghostscript to decode)
FOREIGN_FORMATS = ("EPS", "PPM", "PCX", "ICO", "TGA", "SGI", "JPEG2000", "DDS", "QOI", "PSD")


def stub_ghostscript(folder: Path, monkeypatch) -> Path:
    """A ``gs`` first on PATH that records each call in ``folder/gs-called``, answers ``--version`` and fails
    to render anything; the path of that record."""
    from PIL import EpsImagePlugin

    bin_dir = folder / "bin"
    bin_dir.mkdir()
    log = folder / "gs-called"
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> '{log}'\n[ \"$1\" = --version ] && exec echo 10.0\n"
                                "exit 1\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow caches where gs is: look again
    return log


def test_only_the_listed_formats_are_read_and_ghostscript_never_runs(tmp_path: Path, monkeypatch) -> None:
    log = stub_ghostscript(tmp_path, monkeypatch)
    picture = Image.fromarray(_rgb(40, 30))
    for fmt in IMAGE_FORMATS:
        path = tmp_path / f"ok.{fmt.lower()}"
        picture.save(path, fmt)
        assert load_image(path).shape == (30, 40, 3), fmt
    refused = 0
    for fmt in FOREIGN_FORMATS:
        for name in (f"foreign.{fmt.lower()}", f"{fmt.lower()}-named.jpg"):  # whatever the file is called
            path = tmp_path / name
            try:
                picture.save(path, fmt)
            except (KeyError, OSError, ValueError):
                continue  # this Pillow cannot write it
            with Image.open(path) as img:
                assert img.format == fmt, "Pillow itself reads it"
            with pytest.raises(UserError) as err:
                load_image(path)
            assert str(err.value) == (f"{path}: not a readable image (not JPEG, PNG, GIF, TIFF, BMP or WebP); "
                                      "convert it to JPEG or PNG")
            refused += 1
    assert refused >= 16, "most foreign formats must have been tried"
    assert not log.exists(), f"Ghostscript ran: {log.read_text()}"
    with Image.open(tmp_path / "foreign.eps") as eps, pytest.raises(subprocess.CalledProcessError):
        eps.load()  # the stub is found: without the allowlist, this is what loading an EPS file runs
    assert "-dSAFER" in log.read_text()
