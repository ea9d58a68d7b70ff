"""``unet-deploy predict`` end to end on real files: backends, outputs, RLE, image modes, bad input,
CRF and TTA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.cli import main
from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.images.image_io import MAX_PIXELS, preprocess
from unet_deploy.images.rle import read_submission, rle_decode
from unet_deploy.predict import (
    PredictOptions,
    default_model,
    expand_inputs,
    iter_predictions,
    plan_jobs,
    predict_files,
)
from unet_deploy.runtime import load_backend
from unet_deploy.runtime.tta import flip_tta

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(61, 47), (97, 61), (80, 64), (45, 37)]  # (width, height): odd sizes and one that pools evenly


# ------------------------------------------------------------------------------------------- data
def make_car(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """A coloured ellipse 'car' on a noisy grey background; returns (RGB uint8, mask 0/1)."""
    img = rng.normal(120, 25, (h, w, 3)).clip(0, 255).astype(np.uint8)
    m = Image.new("L", (w, h), 0)
    cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
    rx, ry = rng.uniform(0.2, 0.3) * w, rng.uniform(0.2, 0.3) * h
    ImageDraw.Draw(m).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    mask = np.asarray(m)
    colour = rng.integers(0, 255, 3)
    img[mask > 0] = (0.8 * colour + 0.2 * img[mask > 0]).astype(np.uint8)
    return img, mask


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``unet-deploy`` in this process; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(args: list[str], cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)
    env["COLUMNS"] = "400"
    return subprocess.run([sys.executable, "-m", "unet_deploy", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


@pytest.fixture(scope="session")
def models(tmp_path_factory, fit_tiny_unet) -> dict[str, Path]:
    """A base-8 U-Net trained a few steps on ellipse cars (so masks are not trivial) and its exports."""
    from unet_deploy.export import export_onnx, export_torchscript

    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(1)
    xs, ys = [], []
    for _ in range(16):  # enough cars that the model generalises to the test images, not just these
        img, mask = make_car(rng, 96, 64)
        xs.append(preprocess(img, 0.5))
        ys.append(np.asarray(Image.fromarray(mask).resize((48, 32), Image.Resampling.NEAREST)))
    x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)).long()
    model, cfg = fit_tiny_unet(x, y, 40)
    paths = {"torch": save_checkpoint(d / "best.pth", model, cfg)}
    paths["torchscript"] = export_torchscript(model, cfg, d / "model.ts")
    paths["ort"] = export_onnx(model, cfg, d / "model.onnx")
    return paths


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    out = []
    for i, (w, h) in enumerate(SIZES):
        img, _ = make_car(rng, w, h)
        p = d / f"car{i}.png"
        Image.fromarray(img).save(p)
        out.append(p)
    return out


def copy_images(images: list[Path], dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for p in images:
        q = dest / p.name
        q.write_bytes(p.read_bytes())
        out.append(q)
    return out


def predict_masks(model: Path, paths: list[Path], **kw) -> list[np.ndarray]:
    be = load_backend(model, device="cpu")
    results = list(iter_predictions(be, plan_jobs(paths, save=False), PredictOptions(**kw)))
    assert all(r.ok for r in results), [r.error for r in results]
    return [r.mask for r in results if r.mask is not None]


# ------------------------------------------------------------------------------------------- backends
@pytest.mark.export
def test_three_backends_agree_on_real_files(models, images):
    masks = {name: predict_masks(path, images, batch_size=2) for name, path in models.items()}
    for ref, path in zip(masks["torch"], images, strict=True):
        w, h = Image.open(path).size
        assert ref.shape == (h, w)
        assert 0 < ref.mean() < 1, "the fixture model should predict both classes"
    total = sum(m.size for m in masks["torch"])
    for name in ("torchscript", "ort"):
        same = sum(int((a == b).sum()) for a, b in zip(masks["torch"], masks[name], strict=True))
        assert same / total >= 0.9999, f"{name} agrees on only {same / total:.6f} of pixels"


def test_batching_gives_the_same_masks(models, images):
    paths = images + images[:2]  # sizes change mid-stream and repeat
    one = predict_masks(models["torch"], paths, batch_size=1)
    many = predict_masks(models["torch"], paths, batch_size=3)
    for a, b in zip(one, many, strict=True):
        assert (a == b).mean() >= 0.9999


# ------------------------------------------------------------------------------------------- outputs
def test_default_names_beside_inputs(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path)
    code, out, err = run_cli(["predict", "-m", models["torch"], *paths], capsys)
    assert code == 0, err
    ref = predict_masks(models["torch"], paths)
    for p, m in zip(paths, ref, strict=True):
        out_path = p.with_name(f"{p.stem}_OUT.png")
        with Image.open(out_path) as img:
            assert img.mode == "L" and img.size == Image.open(p).size
        arr = read_png(out_path)
        assert set(np.unique(arr)) <= {0, 255}
        assert np.array_equal(arr, m * 255)
    assert "predicted 4 of 4 files" in out


def test_output_folder_and_seed_style_names(models, images, tmp_path, capsys):
    paths = copy_images(images[:2], tmp_path / "in")
    code, _, err = run_cli(["predict", "-m", models["torch"], *paths, "-o", tmp_path / "masks/"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["car0_OUT.png", "car1_OUT.png"]
    # Pytorch-UNet style: several names after one -i and after one -o
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    code, _, err = run_cli(["predict", "-m", models["torch"], "-i", *paths, "-o", a, b, "-q"], capsys)
    assert code == 0, err
    assert np.array_equal(read_png(a), read_png(tmp_path / "masks" / "car0_OUT.png"))
    assert np.array_equal(read_png(b), read_png(tmp_path / "masks" / "car1_OUT.png"))
    code, _, err = run_cli(["predict", "-m", models["torch"], "-i", *paths, "-o", a], capsys)
    assert code == 2 and "1 output names for 2 inputs" in err


def test_no_save_writes_nothing(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path)
    before = sorted(tmp_path.iterdir())
    code, _, err = run_cli(["predict", "-m", models["torch"], "-n", *paths], capsys)
    assert code == 0, err
    assert sorted(tmp_path.iterdir()) == before


def test_output_equal_to_input_is_refused(models, images, tmp_path, capsys):
    (p,) = copy_images(images[:1], tmp_path)
    data = p.read_bytes()
    code, _, err = run_cli(["predict", "-m", models["torch"], "-i", p, "-o", p], capsys)
    assert code == 1
    assert "refusing to overwrite" in err and str(p) in err
    assert p.read_bytes() == data


def test_rle_submission_decodes_to_written_masks(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path)
    sub = tmp_path / "submission.csv"
    code, _, err = run_cli(["predict", "-m", models["torch"], str(tmp_path / "*.png"), "--rle", sub], capsys)
    assert code == 0, err
    rows = read_submission(sub)
    assert [r[0] for r in rows] == [p.name for p in paths]  # input order, Kaggle ids = file names
    for (_, rle), p in zip(rows, paths, strict=True):
        written = read_png(p.with_name(f"{p.stem}_OUT.png"))
        assert np.array_equal(rle_decode(rle, written.shape), (written > 0).astype(np.uint8))
    # a re-run over the same glob does not predict its own outputs
    code, out, err = run_cli(["predict", "-m", models["torch"], str(tmp_path / "*.png"), "-n"], capsys)
    assert code == 0 and "predicted 4 of 4" in out


def test_viz_writes_overlay(models, images, tmp_path, capsys):
    (p,) = copy_images(images[:1], tmp_path)
    code, _, err = run_cli(["predict", "-m", models["torch"], p, "--viz"], capsys)
    assert code == 0, err
    overlay = read_png(tmp_path / "car0_OVERLAY.png")
    image = read_png(p)
    mask = read_png(tmp_path / "car0_OUT.png") > 0
    assert overlay.shape == image.shape
    near = _near(mask) & ~mask  # the black outline is drawn just outside the mask
    assert np.array_equal(overlay[~mask & ~near], image[~mask & ~near])
    assert (overlay[near] == 0).all()
    assert (overlay[mask].astype(int) - image[mask]).any(axis=1).mean() > 0.9  # tinted


def test_skip_existing_resumes(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path)
    assert run_cli(["predict", "-m", models["torch"], *paths, "-q"], capsys)[0] == 0
    out0 = paths[0].with_name("car0_OUT.png")
    out1 = paths[1].with_name("car1_OUT.png")
    out1.write_bytes(out1.read_bytes()[:40])  # a half-written output from an interrupted run
    expected0 = out0.read_bytes()
    sub = tmp_path / "s.csv"
    code, out, err = run_cli(["predict", "-m", models["torch"], *paths, "--skip-existing", "--rle", sub],
                             capsys)
    assert code == 0, err
    assert "predicted 1 of 4 files, 3 skipped" in out
    assert out0.read_bytes() == expected0
    assert read_png(out1).shape == (61, 97)
    assert len(read_submission(sub)) == 4


def test_resume_redoes_an_image_whose_overlay_is_missing(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path)
    args = ["predict", "-m", models["ort"], *paths, "--viz"]
    assert run_cli(args, capsys)[0] == 0
    overlay = paths[2].with_name("car2_OVERLAY.png")
    expected = overlay.read_bytes()
    overlay.unlink()  # the disk was full when the overlays were written
    code, out, err = run_cli([*args, "--resume"], capsys)
    assert code == 0, err
    assert "predicted 1 of 4 files, 3 skipped" in out, out
    assert overlay.read_bytes() == expected
    assert "predicted 0 of 4 files, 4 skipped" in run_cli([*args, "--resume"], capsys)[1]


def test_journal_rows_are_reused_only_with_every_output_on_disk(tmp_path):
    from unet_deploy.predict.records import Job
    from unet_deploy.predict.resume import journal_key, reusable
    from unet_deploy.predict.shard import JournalRow

    image = tmp_path / "car.png"
    Image.new("RGB", (97, 61)).save(image)
    plain = Job(0, image)
    with_overlay = Job(0, image, overlay=tmp_path / "car_OVERLAY.png")
    rows = {journal_key(plain): JournalRow(journal_key(plain), "car.png", 61, 97, "1 5")}
    assert reusable([plain], rows, "fp") == [0]
    assert reusable([with_overlay], rows, "fp") == [], "the overlay was asked for and is not there"
    with_overlay.overlay.write_bytes(b"an overlay")
    assert reusable([with_overlay], rows, "fp") == [0]


def test_default_model_discovery(models, tmp_path):
    with pytest.raises(Exception) as exc:
        default_model("ort", tmp_path)
    assert "unet-deploy export --format onnx" in str(exc.value) and "exported" in str(exc.value)
    with pytest.raises(Exception) as exc:
        default_model(None, tmp_path)
    assert "unet-deploy train" in str(exc.value)
    (tmp_path / "exported").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.pth").write_bytes(models["torch"].read_bytes())
    old, new = tmp_path / "exported" / "old.onnx", tmp_path / "exported" / "new.onnx"
    old.write_bytes(models["ort"].read_bytes())
    new.write_bytes(models["ort"].read_bytes())
    os.utime(old, (1, 1))
    assert default_model("ort", tmp_path) == new
    assert default_model("torch", tmp_path) == tmp_path / "checkpoints" / "best.pth"


def test_default_model_prefers_the_newest_verified_export(models, tmp_path, capsys):
    """No -m and no --backend: the newest verified export (ONNX first of one export's files) over the checkpoint,
    unless the checkpoint is newer; an export written with --no-verify is passed over; said in one line."""
    import json

    import onnx

    from unet_deploy.config import CONFIG_KEY

    ck, exp = tmp_path / "checkpoints", tmp_path / "exported"
    ck.mkdir()
    exp.mkdir()
    (ck / "best.pth").write_bytes(models["torch"].read_bytes())
    os.utime(ck / "best.pth", (100, 100))
    (exp / "best.ts").write_bytes(models["torchscript"].read_bytes())
    (exp / "best.onnx").write_bytes(models["ort"].read_bytes())
    os.utime(exp / "best.onnx", (200, 200))
    os.utime(exp / "best.ts", (250, 250))  # the TorchScript file of the same export is newer: ONNX still wins
    (exp / "best.int8.onnx").write_bytes(models["ort"].read_bytes())  # derived precisions are never the default
    assert default_model(None, tmp_path) == exp / "best.onnx"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"no -m given: using {exp / 'best.onnx'}: the newest verified export (onnxruntime)"]

    unchecked = onnx.load(str(models["ort"]))  # the same model written by `export --no-verify`
    meta = next(p for p in unchecked.metadata_props if p.key == CONFIG_KEY)
    config = json.loads(meta.value)
    config["source"]["verified"] = False
    meta.value = json.dumps(config)
    onnx.save(unchecked, str(exp / "new.onnx"))
    os.utime(exp / "new.onnx", (300, 300))
    assert default_model(None, tmp_path, say=False) == exp / "best.onnx"  # the newest verified export's

    (exp / "other.ts").write_bytes(models["torchscript"].read_bytes())
    os.utime(exp / "other.ts", (350, 350))
    assert default_model(None, tmp_path, say=False) == exp / "other.ts"

    os.utime(ck / "best.pth", (400, 400))  # retrained after the exports: they may be of another model
    assert default_model(None, tmp_path) == ck / "best.pth"
    assert "no verified export as new as it" in capsys.readouterr().err


def test_expand_inputs_dedupes_and_keeps_order(images, tmp_path):
    paths = copy_images(images, tmp_path)
    got, problems = expand_inputs([paths[2], tmp_path, str(tmp_path / "car1.*"), tmp_path / "empty*.png"])
    assert got == [paths[2], paths[0], paths[1], paths[3]]
    assert problems == [f"{tmp_path / 'empty*.png'}: no file matches this pattern"]


# ------------------------------------------------------------------------------------------- image modes
def test_image_modes_and_exif_rotation(models, tmp_path, capsys):
    rng = np.random.default_rng(3)
    rgb, _ = make_car(rng, 61, 47)
    base = Image.fromarray(rgb)
    base.save(tmp_path / "rgb.png")
    base.convert("RGBA").save(tmp_path / "rgba.png")
    base.convert("L").save(tmp_path / "grey.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    base.convert("CMYK").save(tmp_path / "cmyk.tif")
    grey16 = (np.asarray(base.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(grey16).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; viewers rotate 90 degrees clockwise
    base.save(tmp_path / "exif.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "exif.jpg") as raw:
        rotated = np.rot90(np.asarray(raw), k=-1)  # what a viewer shows
    Image.fromarray(np.ascontiguousarray(rotated)).save(tmp_path / "manual.png")

    names = ["rgb.png", "rgba.png", "grey.png", "palette.png", "cmyk.tif", "grey16.png", "exif.jpg",
             "manual.png"]
    code, _, err = run_cli(["predict", "-m", models["torch"], *[tmp_path / n for n in names], "-q"], capsys)
    assert code == 0, err
    masks = {n: read_png(tmp_path / f"{Path(n).stem}_OUT.png") for n in names}
    for n in names[:6]:
        assert masks[n].shape == (47, 61), n
    assert np.array_equal(masks["rgba.png"], masks["rgb.png"])  # opaque alpha changes nothing
    assert np.array_equal(masks["grey16.png"], masks["grey.png"])  # 16-bit scaled to the same 8-bit grey
    assert masks["exif.jpg"].shape == (61, 47)
    assert np.array_equal(masks["exif.jpg"], masks["manual.png"])


# ------------------------------------------------------------------------------------------- bad input
def _bad_inputs(folder: Path, good: Path) -> dict[str, Path]:
    jpeg = folder / "good.jpg"
    Image.open(good).save(jpeg, quality=90)
    bad = {
        "missing": folder / "missing.jpg",
        "folder": folder / "folder.jpg",
        "empty": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
        "text": folder / "notes.jpg",
        "bomb": folder / "bomb.png",
    }
    bad["folder"].mkdir()
    bad["empty"].write_bytes(b"")
    bad["truncated"].write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    bad["text"].write_text("this is not an image\n")
    side = int(MAX_PIXELS ** 0.5) + 64
    Image.new("1", (side, side)).save(bad["bomb"])
    return bad


def test_bad_inputs_one_line_each_and_others_still_predicted(models, images, tmp_path):
    (good,) = copy_images(images[:1], tmp_path)
    bad = _bad_inputs(tmp_path, good)
    result = run_subprocess(["predict", "-m", models["torch"], good, *bad.values()], cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == len(bad), result.stderr
    for line, path in zip(lines, bad.values(), strict=True):
        assert str(path) in line
    assert "truncated" in lines[3] or "broken" in lines[3]
    assert "too large" in lines[5]
    assert (tmp_path / "car0_OUT.png").is_file()
    assert f"predicted 1 of {len(bad) + 1} files, {len(bad)} failed" in result.stderr


@pytest.mark.export
def test_bad_model_files_give_one_line(models, images, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.onnx"
    data = models["ort"].read_bytes()
    corrupt.write_bytes(data[: len(data) // 3])
    other = tmp_path / "resnet.pth"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)).state_dict(), other)
    for model in (corrupt, other):
        code, out, err = run_cli(["predict", "-m", model, images[0], "-n"], capsys)
        assert code == 2
        assert len(err.strip().splitlines()) == 1 and str(model) in err, err
        assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- CRF
@pytest.mark.crf
def test_crf_end_to_end_two_workers(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    args = ["predict", "-m", models["torch"], paths[0], tmp_path / "broken.png", *paths[1:], "--crf",
            "--crf-workers", "2", "--crf-iterations", "3", "--rle", tmp_path / "crf.csv"]
    code, _, err = run_cli(args, capsys)
    assert code == 1 and err.count("error:") == 1 and "broken.png" in err
    rows = dict(read_submission(tmp_path / "crf.csv"))
    assert list(rows) == [p.name for p in paths]  # order kept around the failed file
    plain = predict_masks(models["torch"], paths)
    for p, ref in zip(paths, plain, strict=True):
        mask = read_png(p.with_name(f"{p.stem}_OUT.png"))
        assert mask.shape == ref.shape and set(np.unique(mask)) <= {0, 255}
        assert ((mask > 0) == ref).mean() > 0.8  # refined, not replaced
        assert np.array_equal(rle_decode(rows[p.name], mask.shape), (mask > 0).astype(np.uint8))


@pytest.mark.crf
def test_crf_three_classes(tmp_path, images):
    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(n_classes=3, base_channels=4), inference=InferenceConfig(scale=0.5))
    path = save_checkpoint(tmp_path / "k3.pth", cfg.model.build(), cfg)
    be = load_backend(path, device="cpu")
    summary = predict_files(be, images[:2], PredictOptions(crf=True, crf_workers=1, progress=False),
                            outputs=[tmp_path / "out"])
    assert summary.failed == 0
    for p in images[:2]:
        arr = read_png(tmp_path / "out" / f"{p.stem}_OUT.png")
        assert arr.shape == Image.open(p).size[::-1] and set(np.unique(arr)) <= {0, 1, 2}


def test_missing_pydensecrf_gives_install_hint(models, images, tmp_path):
    fake = tmp_path / "fake"
    (fake / "pydensecrf").mkdir(parents=True)
    (fake / "pydensecrf" / "__init__.py").write_text("raise ImportError('pydensecrf is not installed')\n")
    result = run_subprocess(["predict", "-m", models["torch"], images[0], "--crf", "-n"], cwd=tmp_path,
                            extra_path=str(fake))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install pydensecrf2" in lines[0], result.stderr


# ------------------------------------------------------------------------------------------- TTA
def _mirror_equivariant_checkpoint(path: Path) -> Path:
    """A random U-Net whose kernels are left-right symmetric: it commutes with horizontal flips."""
    torch.manual_seed(1)
    cfg = DeployConfig(model=ModelConfig(base_channels=4), inference=InferenceConfig(scale=1.0))
    model = cfg.model.build()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:
                p.copy_((p + p.flip(-1)) / 2)
    return save_checkpoint(path, model.eval(), cfg)


def _symmetric_image(path: Path, w: int = 64, h: int = 40) -> np.ndarray:
    rng = np.random.default_rng(5)
    img, _ = make_car(rng, w, h)
    half = img[:, : w // 2]
    img = np.concatenate([half, half[:, ::-1]], axis=1)
    Image.fromarray(img).save(path)
    return img


def test_tta_of_symmetric_input_equals_plain(tmp_path):
    ckpt = _mirror_equivariant_checkpoint(tmp_path / "sym.pth")
    img = _symmetric_image(tmp_path / "sym.png")
    be = load_backend(ckpt, device="cpu")
    x = preprocess(img, 1.0)[None]
    torch.testing.assert_close(torch.softmax(flip_tta(be)(x), 1), torch.softmax(be(x), 1), atol=1e-5, rtol=0)
    plain = predict_masks(ckpt, [tmp_path / "sym.png"])[0]
    tta = predict_masks(ckpt, [tmp_path / "sym.png"], tta=True)[0]
    assert np.array_equal(plain, tta)


def test_tta_is_mirror_consistent_and_differs_on_asymmetric_input(models, images, tmp_path):
    be = load_backend(models["torch"], device="cpu")
    img = _symmetric_image(tmp_path / "sym.png")
    x = preprocess(img, 1.0)[None]
    probs = torch.softmax(flip_tta(be)(x), 1)
    torch.testing.assert_close(probs, probs.flip(-1), atol=1e-5, rtol=0)  # averaged with its mirror
    # the averaged probabilities are exactly the mean of the two passes
    manual = (torch.softmax(be(x), 1) + torch.softmax(be(x[..., ::-1].copy()), 1).flip(-1)) / 2
    torch.testing.assert_close(probs, manual, atol=1e-5, rtol=0)

    x = preprocess(np.asarray(Image.open(images[1])), 0.5)[None]
    assert (torch.softmax(flip_tta(be)(x), 1) - torch.softmax(be(x), 1)).abs().max() > 1e-3
    plain = predict_masks(models["torch"], images)
    tta = predict_masks(models["torch"], images, tta=True)
    assert any(not np.array_equal(a, b) for a, b in zip(plain, tta, strict=True))
    for a, b in zip(plain, tta, strict=True):
        assert b.shape == a.shape and set(np.unique(b)) <= {0, 1}


@pytest.mark.export
def test_tta_with_every_backend_and_crf(models, images, tmp_path, capsys):
    masks = {name: predict_masks(path, images, tta=True, batch_size=2) for name, path in models.items()}
    total = sum(m.size for m in masks["torch"])
    for name in ("torchscript", "ort"):
        same = sum(int((a == b).sum()) for a, b in zip(masks["torch"], masks[name], strict=True))
        assert same / total >= 0.9999, name
    paths = copy_images(images[:2], tmp_path)
    code, _, err = run_cli(["predict", "-m", models["ort"], *paths, "--tta", "--crf", "--crf-workers", "1",
                            "--crf-iterations", "2"], capsys)
    assert code == 0, err
    for p in paths:
        arr = read_png(p.with_name(f"{p.stem}_OUT.png"))
        assert arr.shape == Image.open(p).size[::-1] and set(np.unique(arr)) <= {0, 255}


def test_seed_flags_checked_against_model_and_quiet(models, images, tmp_path, capsys):
    (p,) = copy_images(images[:1], tmp_path)
    code, out, err = run_cli(["predict", "-m", models["torch"], p, "-c", "3", "-n"], capsys)
    assert code == 2 and "--classes 3" in err and "2 classes" in err
    code, out, err = run_cli(["predict", "-m", models["torch"], p, "--bilinear", "-n"], capsys)
    assert code == 2 and "transposed" in err
    code, out, err = run_cli(["predict", "-m", models["torch"], p, "-c", "2", "--transposed", "-q",
                              "-t", "0.5", "-s", "0.5"], capsys)
    assert (code, out, err) == (0, "", "")
    assert p.with_name("car0_OUT.png").is_file()


# ------------------------------------------------------------------------------------------- review fixes
def _random_checkpoint(path: Path, n_classes: int = 2, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    cfg = DeployConfig(model=ModelConfig(n_classes=n_classes, base_channels=4),
                       inference=InferenceConfig(scale=0.5))
    return save_checkpoint(path, cfg.model.build().eval(), cfg)


def _one_class_copy(two_class: Path, path: Path) -> Path:
    """The trained two-class model as a one-class (sigmoid) model: sigmoid(l1 - l0) = softmax p1."""
    from unet_deploy.checkpoint import load_checkpoint

    ckpt = load_checkpoint(two_class)
    cfg = DeployConfig(model=ModelConfig(n_classes=1, base_channels=ckpt.config.model.base_channels),
                       inference=ckpt.config.inference)
    model = cfg.model.build()
    state = dict(ckpt.state_dict)
    for key in ("outc.conv.weight", "outc.conv.bias"):
        state[key] = state[key][1:2] - state[key][0:1]
    model.load_state_dict(state)
    return save_checkpoint(path, model.eval(), cfg)


def test_resume_never_reuses_masks_of_another_model(models, images, tmp_path, capsys):
    from unet_deploy.predict import mask_fingerprint

    other = _random_checkpoint(tmp_path / "other.pth")
    paths = copy_images(images, tmp_path / "run")
    sub_a, sub_b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert run_cli(["predict", "-m", models["torch"], *paths, "--rle", sub_a, "-q"], capsys)[0] == 0
    outs = [p.with_name(f"{p.stem}_OUT.png") for p in paths]
    stamps_a = [mask_fingerprint(o) for o in outs]
    assert all(stamps_a) and len(set(stamps_a)) == 1
    # a fresh run of the other model elsewhere: what the resumed run must reproduce
    fresh = copy_images(images, tmp_path / "fresh")
    assert run_cli(["predict", "-m", other, *fresh, "--rle", tmp_path / "fresh.csv", "-q"], capsys)[0] == 0
    expected = read_submission(tmp_path / "fresh.csv")
    assert expected != read_submission(sub_a)  # the two models really differ on these images

    code, out, err = run_cli(["predict", "-m", other, *paths, "--resume", "--rle", sub_b], capsys)
    assert code == 0, err
    assert "predicted 4 of 4 files" in out and "skipped" not in out
    assert read_submission(sub_b) == expected
    for o, f in zip(outs, fresh, strict=True):
        assert np.array_equal(read_png(o), read_png(f.with_name(f"{f.stem}_OUT.png")))
        assert mask_fingerprint(o) not in (None, stamps_a[0])
    # the same model again: everything reused; another threshold is another run
    code, out, err = run_cli(["predict", "-m", other, *paths, "--resume", "--rle", sub_b], capsys)
    assert code == 0 and "predicted 0 of 4 files, 4 skipped" in out, err
    assert read_submission(sub_b) == expected
    code, out, err = run_cli(["predict", "-m", other, *paths, "--resume", "-t", "0.7", "-n"], capsys)
    assert code == 0 and "predicted 4 of 4 files" in out, err


def test_masks_without_fingerprint_are_predicted_again(models, images, tmp_path, capsys):
    (p,) = copy_images(images[:1], tmp_path)
    out = p.with_name("car0_OUT.png")
    Image.fromarray(np.zeros(read_png(p).shape[:2], np.uint8)).save(out)  # e.g. written by Pytorch-UNet
    code, text, err = run_cli(["predict", "-m", models["torch"], p, "--resume"], capsys)
    assert code == 0 and "predicted 1 of 1" in text, err
    assert read_png(out).any()


@pytest.mark.crf
@pytest.mark.parametrize("n_classes", [1, 2])
def test_threshold_applies_with_crf(models, images, tmp_path, n_classes):
    model = models["torch"] if n_classes == 2 else _one_class_copy(models["torch"], tmp_path / "one.pth")
    fg = {t: sum(int(m.sum()) for m in predict_masks(model, images, crf=True, crf_workers=1, threshold=t))
          for t in (0.01, 0.5, 0.99)}
    assert fg[0.99] < fg[0.5] < fg[0.01], fg


def test_threshold_applies_to_two_class_softmax(models, images):
    masks = {t: predict_masks(models["torch"], images, threshold=t) for t in (0.1, 0.5, 0.9)}
    fg = {t: sum(int(m.sum()) for m in ms) for t, ms in masks.items()}
    assert fg[0.9] < fg[0.5] < fg[0.1], fg
    be = load_backend(models["torch"], device="cpu")
    for img, mask in zip(images, masks[0.9], strict=True):
        arr = np.asarray(Image.open(img).convert("RGB"))
        probs = torch.softmax(be(preprocess(arr, 0.5)[None]), 1)
        up = torch.nn.functional.interpolate(probs, size=arr.shape[:2], mode="bilinear")
        assert ((up[0, 1].numpy() > 0.9) == mask.astype(bool)).mean() > 0.98


@pytest.mark.parametrize("values, message", [
    ("0,300", "0 to 255"), ("-1,255", "0 to 255"), ("0,128,255", "exactly 2 values"),
])
def test_mask_values_checked_before_predicting(models, images, tmp_path, capsys, values, message):
    (p,) = copy_images(images[:1], tmp_path)
    code, _, err = run_cli(["predict", "-m", models["torch"], p, f"--mask-values={values}"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not p.with_name("car0_OUT.png").exists()
    code, _, err = run_cli(["predict", "-m", models["torch"], p, "--mask-values", "7,200", "-q"], capsys)
    assert code == 0, err
    assert set(np.unique(read_png(p.with_name("car0_OUT.png")))) <= {7, 200}


def test_unwritable_rle_target_fails_before_predicting(models, images, tmp_path, capsys):
    paths = copy_images(images[:2], tmp_path / "in")
    (tmp_path / "file.txt").write_text("x")
    for target, message in ((tmp_path, "is a folder"), (tmp_path / "file.txt" / "s.csv", "not a folder")):
        code, _, err = run_cli(["predict", "-m", models["torch"], *paths, "--rle", target], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not any(p.with_name(f"{p.stem}_OUT.png").exists() for p in paths)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["file.txt", "in"]  # no journal left


@pytest.mark.parametrize("kind, args, message", [
    ("ort", ["--threads", "-3"], "--threads -3"),
    ("ort", ["--threads", "0"], "--threads 0"),
    ("ort", ["--precision", "fp16"], "torch backend"),
    ("torchscript", ["--precision", "bf16"], "torch backend"),
    ("torch", ["--crf", "--crf-workers", "0"], "--crf-workers 0"),
])
def test_ignored_options_are_rejected(models, images, tmp_path, capsys, kind, args, message):
    (p,) = copy_images(images[:1], tmp_path)
    code, _, err = run_cli(["predict", p, "-n", "-m", models[kind], *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_classes_message_singular(images, tmp_path, capsys):
    model = _random_checkpoint(tmp_path / "one.pth", n_classes=1)
    (p,) = copy_images(images[:1], tmp_path)
    code, _, err = run_cli(["predict", "-m", model, p, "-c", "2", "-n"], capsys)
    assert code == 2 and "predicts 1 class;" in err, err


# ------------------------------------------------------------------------------------------- overlays
def _near(mask: np.ndarray) -> np.ndarray:
    """True where a pixel or one of its 4 neighbours is in ``mask``."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


@pytest.mark.parametrize("colour", [(255, 0, 0), (200, 20, 20), (0, 255, 0), (128, 128, 128), (255, 255, 255)])
def test_overlay_is_readable_on_any_colour(colour):
    from unet_deploy.predict import overlay_image

    image = np.empty((40, 60, 3), np.uint8)
    image[:] = colour
    mask = np.zeros((40, 60), np.uint8)
    mask[10:30, 15:45] = 1
    out = overlay_image(image, mask).astype(int)
    inside, fg = np.zeros_like(mask, bool), mask > 0
    inside[11:29, 16:44] = True  # the mask less its boundary
    distance = np.linalg.norm(out[inside] - np.array(colour), axis=1)
    assert distance.min() >= 100, f"tint too close to {colour}: {out[20, 30]}"
    border = fg & ~inside
    assert (out[border] == 255).all()  # white line on the car's side...
    outside_ring = _near(fg) & ~fg
    assert (out[outside_ring] == 0).all()  # ...beside a black line on the background's side
    far = ~_near(fg)
    assert (out[far] == np.array(colour)).all()


# ------------------------------------------------------------------------------------------- CLI behaviour
def test_ort_predict_never_imports_torch(models, images, tmp_path):
    (p,) = copy_images(images[:1], tmp_path)
    code = ("import sys\nfrom unet_deploy.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('rc', rc, 'torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, "predict", "--backend", "ort", "-m", str(models["ort"]),
                           str(p), "--viz", "--tta", "--rle", str(tmp_path / "s.csv")],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.stdout.strip().endswith("rc 0 no torch"), proc.stdout + proc.stderr
    ref = predict_masks(models["ort"], [p], tta=True)[0]
    assert np.array_equal(read_png(tmp_path / "car0_OUT.png"), ref * 255)
    assert (tmp_path / "car0_OVERLAY.png").is_file() and len(read_submission(tmp_path / "s.csv")) == 1


def test_numpy_postprocessing_equals_torch():
    from unet_deploy.images.postprocess import logits_to_mask, probabilities, upsample_logits

    rng = np.random.default_rng(0)
    for c, (h, w), size in [(1, (32, 48), (64, 97)), (2, (30, 47), (61, 95)), (3, (17, 23), (40, 50)),
                            (2, (40, 60), (20, 30))]:
        logits = rng.normal(0, 3, (2, c, h, w)).astype(np.float32)
        up_np, up_t = upsample_logits(logits, size), upsample_logits(torch.from_numpy(logits), size).numpy()
        np.testing.assert_allclose(up_np, up_t, atol=1e-4)  # float32 rounding of the weights differs
        np.testing.assert_allclose(probabilities(logits[0], size), probabilities(torch.from_numpy(logits[0]), size),
                                   atol=1e-5)
        for t in (0.3, 0.5):
            a, b = logits_to_mask(logits, size, t), logits_to_mask(torch.from_numpy(logits), size, t)
            assert a.dtype == b.dtype and (a == b).mean() >= 0.999


def test_positional_inputs_take_several_outputs(models, images, tmp_path, capsys):
    paths = copy_images(images[:2], tmp_path / "in")
    x, y = tmp_path / "x.png", tmp_path / "y.png"
    code, out, err = run_cli(["predict", "-m", models["ort"], *paths, "-o", x, y], capsys)
    assert code == 0, err
    ref = predict_masks(models["ort"], paths)
    assert np.array_equal(read_png(x), ref[0] * 255) and np.array_equal(read_png(y), ref[1] * 255)
    assert out.splitlines()[:2] == [f"wrote {x}", f"wrote {y}"]
    # seed style still works, and an -o before the inputs takes one value (a folder)
    x2, y2 = tmp_path / "x2.png", tmp_path / "y2.png"
    assert run_cli(["predict", "-m", models["ort"], "-i", *paths, "-o", x2, y2, "-q"], capsys)[0] == 0
    assert np.array_equal(read_png(x2), read_png(x)) and np.array_equal(read_png(y2), read_png(y))
    code, out, err = run_cli(["predict", "-o", tmp_path / "folder", "-m", models["ort"], *paths], capsys)
    assert code == 0, err
    assert sorted(q.name for q in (tmp_path / "folder").iterdir()) == ["car0_OUT.png", "car1_OUT.png"]


def test_predict_says_where_outputs_went(models, images, tmp_path, capsys):
    paths = copy_images(images, tmp_path / "in")
    code, out, err = run_cli(["predict", "-m", models["ort"], *paths[:2], "--viz"], capsys)
    assert code == 0, err
    masks = [p.with_name(f"{p.stem}_OUT.png") for p in paths[:2]]
    overlays = [p.with_name(f"{p.stem}_OVERLAY.png") for p in paths[:2]]
    assert out.splitlines()[:4] == [f"wrote {p}" for p in masks + overlays]
    assert all(p.is_file() for p in masks + overlays)
    code, out, err = run_cli(["predict", "-m", models["ort"], *paths, "-o", tmp_path / "many", "--viz"], capsys)
    assert code == 0, err
    assert out.splitlines()[:2] == [f"wrote 4 masks to {tmp_path / 'many'}/",
                                    f"wrote 4 overlays to {tmp_path / 'many'}/"]
    assert len(list((tmp_path / "many").glob("*_OUT.png"))) == 4
    code, out, err = run_cli(["predict", "-m", models["ort"], *paths, "-o", tmp_path / "q", "-q"], capsys)
    assert code == 0 and out == "" and err == ""
    # all failed: no per-image time in the summary
    code, out, err = run_cli(["predict", "-m", models["ort"], tmp_path / "missing.png"], capsys)
    assert code == 1 and "predicted 0 of 1 files, 1 failed in " in err and "per image" not in err


def _sigint_as_a_terminal_has_it() -> None:
    """Ctrl-C as a terminal sends it: the child gets SIGINT at its default (a test run started in the background
    inherits it ignored, and Python then keeps ignoring it, as a Unix program should)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_with_one_line_and_resume_continues(models, images, tmp_path):
    import time

    src = Image.open(images[1])
    folder = tmp_path / "in"
    folder.mkdir()
    n = 300
    for i in range(n):
        src.save(folder / f"c{i:03d}.png")
    out_dir = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "unet_deploy", "predict", "-m", str(models["ort"]), str(folder), "-o",
            str(out_dir), "--threads", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_as_a_terminal_has_it)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list(out_dir.glob("*_OUT.png"))) < 3:
            time.sleep(0.02)
        assert proc.poll() is None, "predict finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("interrupted: ") and f" of {n} files done; masks written so far are kept" in lines[0]
    assert "--resume" in lines[0]
    done = int(lines[0].split()[1])
    written = sorted(out_dir.glob("*_OUT.png"))
    # at least 3 masks were there before Ctrl-C, which may land between writing a mask and counting it
    assert done < n and len(written) >= 3 and len(written) in (done, done + 1), (done, len(written))
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]  # no half-written files
    assert all(read_png(p).shape == (61, 97) for p in written)
    proc = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"predicted {n - len(written)} of {n} files, {len(written)} skipped" in proc.stdout


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_sigterm_stops_like_ctrl_c_with_crf_workers_and_leaves_no_process(models, images, tmp_path):
    """A scheduler's SIGTERM (Slurm, Kubernetes): one line, the masks and journal rows written so far kept,
    the CRF worker processes and multiprocessing's resource tracker gone with it, and --resume goes on."""
    import time

    import psutil

    pytest.importorskip("pydensecrf.densecrf")
    src = Image.open(images[1])
    folder = tmp_path / "in"
    folder.mkdir()
    n = 150
    for i in range(n):
        src.save(folder / f"c{i:03d}.png")
    out_dir, sub = tmp_path / "out", tmp_path / "sub.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "unet_deploy", "predict", "-m", str(models["ort"]), str(folder), "-o",
            str(out_dir), "--threads", "1", "--crf", "--crf-workers", "2", "--rle", str(sub)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_sigint_as_a_terminal_has_it)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list(out_dir.glob("*_OUT.png"))) < 3:
            time.sleep(0.02)
        helpers = _descendants(proc.pid)  # 2 CRF workers and the resource tracker
        assert proc.poll() is None and len(helpers) >= 3, "predict finished before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("interrupted: ") and f" of {n} files done; masks written so far are kept" in lines[0]
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    written = len(list(out_dir.glob("*_OUT.png")))
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".tmp")]
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    import re

    predicted, total, reused = map(int, re.search(r"predicted (\d+) of (\d+) files, reused (\d+) \(journal rows",
                                                  resumed.stdout).groups())
    # the rows journaled before SIGTERM are reused (a mask may have been written just before it landed)
    assert total == n and predicted + reused == n and reused in (written - 1, written) and reused >= 3
    assert len(read_submission(sub)) == n
