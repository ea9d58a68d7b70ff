"""The public Python API (unet_deploy.api) and the per-backend option objects, on real files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_deploy.api import Predictor, export
from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.errors import UserError
from unet_deploy.export.parity import default_cases, parity
from unet_deploy.runtime import OrtOptions, TorchOptions, TorchScriptOptions, load_backend, options_for

ROOT = Path(__file__).resolve().parents[1]
EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, fit_on_heldout_cars) -> dict:
    """A base-8 U-Net fitted on 12 synthetic cars, its checkpoint, and its exports made through the API."""
    model, cfg, images = fit_on_heldout_cars(12, 30)
    d = tmp_path_factory.mktemp("api")
    checkpoint = save_checkpoint(d / "tiny.pth", model, cfg)
    lines: list[str] = []
    done = export(checkpoint, "all", output=d / "exported", quick_verify=True, images=[images[12]],
                  log=lambda line: lines.append(str(line)))
    return {"model": model, "checkpoint": checkpoint, "done": done, "lines": lines, "images": images[12:],
            "dir": d}


def test_export_writes_verified_files_and_reports_them(model_files: dict) -> None:
    done = model_files["done"]
    out = model_files["dir"] / "exported"
    assert done.passed and done.failed == []
    # "all": every format whose runtime is installed (CI installs the openvino extra)
    assert done.written == [("onnx", out / "tiny.onnx"), ("torchscript", out / "tiny.ts"),
                            ("openvino", out / "tiny.xml")]
    assert all(p.stat().st_size > 10_000 for _, p in done.written)
    data = done.to_dict()
    assert data["checkpoint"] == str(model_files["checkpoint"])
    for fmt in ("onnx", "torchscript", "openvino"):
        entry = data["formats"][fmt]
        assert entry["written"] is True and entry["parity"]["passed"] is True
        assert entry["parity"]["thresholds"]["max_rel_err"] == 1e-5  # the product's fp32 threshold
    assert any(line.startswith(f"wrote {out / 'tiny.onnx'}") for line in model_files["lines"])
    assert sorted(p.name for p in out.iterdir()) == ["tiny.bin", "tiny.onnx", "tiny.ts", "tiny.xml"], \
        "the staging folder must be gone"


def test_export_refuses_bad_options_before_writing(model_files: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^--format tflite: unknown format"):
        export(model_files["checkpoint"], "tflite", output=tmp_path / "x")
    with pytest.raises(UserError, match="^--int8 derives from the ONNX or OpenVINO export"):
        export(model_files["checkpoint"], "torchscript", output=tmp_path / "x", int8=True)
    with pytest.raises(UserError, match="export starts from a .pth checkpoint"):
        export(model_files["dir"] / "exported" / "tiny.onnx", "onnx", output=tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("suffix", [".pth", ".ts", ".onnx"])
def test_predictor_masks_are_the_masks_predict_writes(model_files: dict, tmp_path: Path, suffix: str) -> None:
    path = model_files["checkpoint"] if suffix == ".pth" else model_files["dir"] / "exported" / f"tiny{suffix}"
    predictor = Predictor.load(path, device="cpu")
    image = tmp_path / "odd.png"
    Image.open(model_files["images"][0]).resize((191, 127)).save(image)  # not a multiple of 16 at any scale
    mask = predictor.predict(image)
    assert mask.shape == (127, 191) and mask.dtype == np.uint8
    assert 0.05 < mask.mean() < 0.95, "the fixture model should find a car and background"
    summary = predictor.predict_files([image], outputs=[tmp_path / "out.png"])
    assert summary.exit_code == 0 and summary.masks == [tmp_path / "out.png"]
    written = np.asarray(Image.open(tmp_path / "out.png"))
    np.testing.assert_array_equal(written, np.asarray(predictor.mask_image(mask)))
    assert set(np.unique(written)) <= {0, 255}


def test_the_cli_predicts_what_the_api_predicts(model_files: dict, tmp_path: Path) -> None:
    onnx_file = model_files["dir"] / "exported" / "tiny.onnx"
    image = model_files["images"][1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "unet_deploy", "predict", "--backend", "ort", "-m", str(onnx_file),
                          str(image), "-o", str(tmp_path / "cli.png")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    predictor = Predictor.load(onnx_file, device="cpu")
    expected = np.asarray(predictor.mask_image(predictor.predict(image)))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli.png")), expected)


def test_images_in_memory_give_the_masks_of_their_files(model_files: dict, tmp_path: Path) -> None:
    predictor = Predictor.load(model_files["dir"] / "exported" / "tiny.onnx", device="cpu")
    path = model_files["images"][2]
    by_path = predictor.predict(path)
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    np.testing.assert_array_equal(predictor.predict(rgb), by_path)
    np.testing.assert_array_equal(predictor.predict(np.asarray(rgb)), by_path)
    # a photo stored sideways with an EXIF rotation is predicted upright, like the file read by `predict`
    sideways = rgb.transpose(Image.Transpose.ROTATE_90)
    exif = sideways.getexif()
    exif[EXIF_ORIENTATION] = 8  # "rotate 90 CW to view"
    rotated_file = tmp_path / "sideways.jpg"
    sideways.save(rotated_file, exif=exif, quality=100)
    with Image.open(rotated_file) as img:
        from_pil = predictor.predict(img)
    np.testing.assert_array_equal(from_pil, predictor.predict(rotated_file))
    assert from_pil.shape == by_path.shape


def test_predict_many_batches_and_keeps_the_order(model_files: dict) -> None:
    predictor = Predictor.load(model_files["checkpoint"], device="cpu", batch_size=2)
    images = model_files["images"][:5]
    batched = list(predictor.predict_many(images))
    single = Predictor.load(model_files["checkpoint"], device="cpu")
    for mask, path in zip(batched, images, strict=True):
        agree = (mask == single.predict(path)).mean()
        assert agree >= 0.9999, f"{path.name}: batched and single masks agree on {agree:.6f} of pixels"


def test_arrays_of_every_layout_and_bad_inputs(model_files: dict, tmp_path: Path) -> None:
    predictor = Predictor.load(model_files["checkpoint"], device="cpu")
    rgb = np.asarray(Image.open(model_files["images"][3]).convert("RGB"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:8, :8, 3] = 0  # transparent corner: composited on white, as a file's would be
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(predictor.predict(rgba), predictor.predict(tmp_path / "rgba.png"))
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    from_file = predictor.predict(tmp_path / "grey.png")
    np.testing.assert_array_equal(predictor.predict(grey), from_file)
    np.testing.assert_array_equal(predictor.predict(grey[:, :, None]), from_file)
    with pytest.raises(UserError, match=r"^predict: give a uint8 image array .* not float32 \(32, 32, 3\)$"):
        predictor.predict(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(UserError, match=r"^predict: give a uint8 image array .* not uint8 \(32, 32, 2\)$"):
        predictor.predict(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(UserError, match="^missing.png: image not found; check the path$"):
        predictor.predict(Path("missing.png"))


def test_option_objects_refuse_what_their_backend_does_not_take(model_files: dict) -> None:
    assert options_for("ort", threads=2, precision="fp32", channels_last=False) == OrtOptions(threads=2)
    assert options_for("torchscript", threads=None, compile=None) == TorchScriptOptions()
    with pytest.raises(UserError, match=r"^--precision bf16 applies to the eager torch backend .* and --backend "
                                        r"openvino only, not to ort; a \.ts / \.onnx model on ONNX Runtime runs at "
                                        r"the precision it was exported with"):
        options_for("ort", precision="bf16")
    with pytest.raises(UserError, match="^--threads applies to --backend ort .* not to torchscript; drop --threads"):
        options_for("torchscript", threads=4)
    with pytest.raises(UserError, match="^--precision int8: unknown precision; use fp32, fp16, bf16$"):
        TorchOptions(precision="int8")
    with pytest.raises(UserError, match="^--compile fast: unknown mode"):
        TorchOptions(compile="fast")
    with pytest.raises(UserError, match="^--threads 0: use 1 or more"):
        OrtOptions(threads=0)
    onnx_file = model_files["dir"] / "exported" / "tiny.onnx"
    with pytest.raises(UserError, match="TorchOptions are for --backend torch, not ort"):
        load_backend(onnx_file, device="cpu", options=TorchOptions())
    with pytest.raises(TypeError, match="either an options object or option keywords"):
        load_backend(onnx_file, device="cpu", options=OrtOptions(), threads=2)
    loaded = load_backend(onnx_file, device="cpu", options=OrtOptions(threads=1))
    assert loaded.options == OrtOptions(threads=1, io_binding=False)  # IO binding resolved: off on the CPU


def test_parity_runs_modules_and_backends_through_the_runner_protocol(model_files: dict) -> None:
    onnx_file = model_files["dir"] / "exported" / "tiny.onnx"
    candidate = load_backend(onnx_file, device="cpu")
    cases = default_cases(candidate.config, quick=True)
    report = parity(model_files["model"], candidate, cases)
    assert report.passed, report.summary()
    assert report.reference.startswith("eager UNet (cpu)")
    assert report.candidate.startswith("ort (fp32) on CPUExecutionProvider from ")
    broken = Predictor.load(onnx_file, device="cpu").runner.wrapped(lambda batch: candidate.run(batch) * 1.01,
                                                                      "scaled")
    assert not parity(model_files["model"], broken, cases).passed
