"""Dense-CRF post-processing (pydensecrf) and its parallel map."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_deploy.errors import UserError
from unet_deploy.images.crf import CRFParams, CRFParamsError, crf_map, dense_crf, require_crf

pytestmark = pytest.mark.crf

ROOT = Path(__file__).resolve().parents[1]


def two_region_case(h=48, w=64, flip=0.08, conf=0.75, seed=0):
    """Image of two flat colours split by an ellipse; probabilities = truth with flipped speckles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    truth = (((yy - h / 2) / (h * 0.3)) ** 2 + ((xx - w / 2) / (w * 0.35)) ** 2) < 1
    image = np.where(truth[..., None], [210, 50, 40], [40, 110, 190]).astype(np.float64)
    image = np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)
    fg = np.where(truth, conf, 1 - conf).astype(np.float32)
    speckle = rng.random(truth.shape) < flip
    fg[speckle] = 1 - fg[speckle]
    return image, fg, truth.astype(np.uint8)


def test_defaults_are_pytorch_unet_carvana_values():
    p = CRFParams()
    assert (p.gauss_sxy, p.gauss_compat, p.bilat_sxy, p.bilat_srgb, p.bilat_compat, p.iterations,
            p.clip, p.reference_side) == (20, 3, 30, 20, 10, 5, 1e-5, 1280)


def test_scale_rule_spatial_std_devs_follow_the_shorter_side():
    """sxy * min(H, W) / 1280: Carvana's own size keeps Pytorch-UNet's values, the demo's 192x128 cars get a tenth;
    colour and weights never change; reference_side=None turns the rule off."""
    p = CRFParams()
    assert p.at_size(1280, 1918) == replace(p, reference_side=None)
    small = p.at_size(128, 192)
    assert (small.gauss_sxy, small.bilat_sxy) == pytest.approx((2.0, 3.0))
    assert (small.bilat_srgb, small.gauss_compat, small.bilat_compat, small.reference_side) == (20, 3, 10, None)
    assert p.at_size(192, 128) == small  # the shorter side, whatever the orientation
    assert p.at_size(2560, 4000).gauss_sxy == pytest.approx(40.0)
    fixed = replace(p, reference_side=None)
    assert fixed.at_size(128, 192) is fixed
    with pytest.raises(CRFParamsError, match="reference_side"):
        CRFParams(reference_side=0)


def _thin_part_case(h=128, w=192, seed=0):
    """A body with a thin dark part 4 px wide at its bottom edge (like a tyre seen from the side) above a dark
    floor shadow of nearly its colour, probabilities that are right but unsure (0.7) with 5 % speckle."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.uint8)
    truth[30:90, 20:170] = 1
    truth[90:94, 30:160] = 1  # the thin part
    image = np.full((h, w, 3), 200, np.float64)
    image[30:90, 20:170] = [40, 90, 200]
    image[90:110, 10:180] = [60, 60, 60]  # the floor shadow: not the car
    image[90:94, 30:160] = [45, 45, 45]
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    fg = np.where(truth == 1, 0.7, 0.3).astype(np.float32)
    speckle = rng.random(truth.shape) < 0.05
    fg[speckle] = 1 - fg[speckle]
    return image, fg, truth


def test_scaled_defaults_keep_thin_parts_that_carvana_size_kernels_cut():
    """On a 192x128 image Pytorch-UNet's kernels at their Carvana size (20/30 px) eat a thin part; scaled to the
    image (2/3 px) they clean the speckle and keep it."""
    image, fg, truth = _thin_part_case()
    scaled = dense_crf(image, fg)
    fixed = dense_crf(image, fg, replace(CRFParams(), reference_side=None))
    thin = np.zeros_like(truth, bool)
    thin[90:94, 30:160] = True
    plain_errors = int(((fg > 0.5) != truth).sum())
    assert int((scaled != truth).sum()) < plain_errors // 5
    assert scaled[thin].mean() > 0.95, scaled[thin].mean()  # measured: 0.998
    assert fixed[thin].mean() < 0.5, fixed[thin].mean()  # measured: 0.0, the whole part is gone
    assert _dice(scaled, truth) > _dice(fixed, truth)


def test_choice_round_trip_and_model_crf_rule():
    from unet_deploy.images.crf import CRFChoice, model_crf

    tuned = replace(CRFParams(), bilat_srgb=40.0)
    helps = CRFChoice(tuned, True, 0.9973, 0.9930, 7)
    assert CRFChoice.from_dict(helps.to_dict()) == helps
    assert model_crf(helps.to_dict()) == (tuned, None)  # the stored parameters are used
    mine = CRFParams(iterations=2)
    assert model_crf(helps.to_dict(), mine) == (mine, None)  # explicit --crf-* values win
    assert model_crf(None) == (CRFParams(), None)  # no choice stored: the scaled defaults
    off = CRFChoice(tuned, False, 0.9901, 0.9930, 7)
    params, note = model_crf(off.to_dict())
    assert params is None and "\n" not in note
    assert "left off" in note and "0.9901" in note and "0.9930" in note and "--crf-" in note
    assert model_crf(off.to_dict(), mine) == (mine, None)


@pytest.mark.parametrize("kwargs", [
    {"gauss_sxy": 0}, {"bilat_sxy": -1}, {"bilat_srgb": float("nan")}, {"gauss_compat": -0.1},
    {"bilat_compat": float("inf")}, {"iterations": 0}, {"iterations": 2.5}, {"iterations": True},
    {"clip": 0}, {"clip": 0.5}, {"gauss_sxy": "20"},
])
def test_params_validation(kwargs):
    with pytest.raises(CRFParamsError) as exc:
        CRFParams(**kwargs)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, UserError)
    assert next(iter(kwargs)) in str(exc.value)


def test_params_frozen():
    with pytest.raises(AttributeError):
        CRFParams().iterations = 3


def test_output_mask_shape_dtype_values():
    image, fg, _ = two_region_case()
    probs = np.stack([1 - fg, fg])
    out = dense_crf(image, probs, CRFParams(iterations=2))
    assert out.shape == fg.shape and np.issubdtype(out.dtype, np.integer)
    assert set(np.unique(out)) <= {0, 1}


def test_removes_speckle_noise():
    image, fg, truth = two_region_case(h=64, w=96)
    before = int(((fg > 0.5) != truth).sum())
    after = int((dense_crf(image, np.stack([1 - fg, fg])) != truth).sum())
    assert before > 300
    assert after < before // 10, (before, after)


def test_single_channel_forms_equal_two_channel():
    image, fg, _ = two_region_case()
    two = dense_crf(image, np.stack([1 - fg, fg]))
    np.testing.assert_array_equal(dense_crf(image, fg), two)
    np.testing.assert_array_equal(dense_crf(image, fg[None]), two)
    np.testing.assert_array_equal(dense_crf(image, fg.astype(np.float64)), two)


def test_hard_zero_one_probabilities_are_clipped():
    image, _, truth = two_region_case()
    out = dense_crf(image, truth.astype(np.float32))
    assert np.isfinite(out).all()
    assert (out != truth).mean() < 0.02


def test_three_classes():
    h, w = 36, 90
    truth = np.repeat(np.repeat(np.arange(3)[None], 30, axis=1), h, axis=0)  # three vertical bands
    colours = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230]], dtype=np.uint8)
    image = colours[truth]
    rng = np.random.default_rng(3)
    noisy = truth.copy()
    speckle = rng.random(truth.shape) < 0.1
    noisy[speckle] = rng.integers(0, 3, speckle.sum())
    probs = np.full((3, h, w), 0.15, np.float32)
    np.put_along_axis(probs, noisy[None], 0.7, axis=0)
    out = dense_crf(image, probs)
    assert out.shape == (h, w) and set(np.unique(out)) == {0, 1, 2}
    assert (out != truth).sum() < (noisy != truth).sum() // 5


def test_grey_image_accepted():
    image, fg, _ = two_region_case()
    out = dense_crf(image[..., 0], fg, CRFParams(iterations=1))
    assert out.shape == fg.shape


@pytest.mark.parametrize("image_shape,probs_shape,match", [
    ((48, 64, 3), (2, 48, 65), "48x64"),
    ((48, 64, 3), (2, 40, 64), "resize"),
    ((48, 64, 4), (2, 48, 64), r"\(H, W, 3\)"),
    ((48, 64, 3), (2, 2, 48, 64), r"\(C, H, W\)"),
    ((48, 64, 3), (0, 48, 64), r"\(C, H, W\)"),
])
def test_shape_validation(image_shape, probs_shape, match):
    with pytest.raises(ValueError, match=match):
        dense_crf(np.zeros(image_shape, np.uint8), np.full(probs_shape, 0.5, np.float32))


def test_read_only_image_like_a_decoded_pil_image_is_accepted():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    probs = rng.random((20, 30)).astype(np.float32)
    frozen = np.asarray(Image.fromarray(image))
    assert not frozen.flags.writeable
    assert np.array_equal(dense_crf(frozen, probs), dense_crf(image.copy(), probs))


def test_dtype_validation():
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(np.zeros((4, 4, 3), np.float32), np.full((2, 4, 4), 0.5, np.float32))
    with pytest.raises(ValueError, match="floating"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.int64))
    with pytest.raises(ValueError, match="NaN"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((2, 4, 4), np.nan, np.float32))


def _cases(n):
    return [two_region_case(h=24 + 4 * i, w=40 + 2 * i, seed=i)[:2] for i in range(n)]


def test_crf_map_inline_matches_dense_crf():
    params = CRFParams(iterations=3)
    cases = _cases(3)
    got = list(crf_map(iter(cases), params, workers=1))
    for (image, fg), mask in zip(cases, got, strict=True):
        np.testing.assert_array_equal(mask, dense_crf(image, fg, params))


def test_crf_map_parallel_equals_sequential_in_order():
    params = CRFParams(iterations=3)
    cases = _cases(7)  # every case has its own size, so a reordering would show as a shape mismatch
    consumed = 0
    yielded = 0

    def items():
        nonlocal consumed
        for case in cases:
            consumed += 1
            # bounded in-flight work: never more than max_in_flight items ahead of the consumer
            assert consumed - yielded <= 3
            yield case

    sequential = list(crf_map(cases, params, workers=1))
    parallel = []
    for mask in crf_map(items(), params, workers=2, max_in_flight=3):
        yielded += 1
        parallel.append(mask)
    assert len(parallel) == len(sequential) == 7
    for a, b in zip(parallel, sequential, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_crf_map_parallel_propagates_errors():
    image, fg = _cases(1)[0]
    bad = [(image, fg), (image, fg[:, :-1])]
    it = crf_map(bad, CRFParams(iterations=1), workers=2)
    with pytest.raises(ValueError, match="resize"):
        list(it)


def test_missing_pydensecrf_gives_one_line_hint(monkeypatch):
    # A None entry in sys.modules makes "import pydensecrf..." raise ImportError.
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    for call in (require_crf,
                 lambda: dense_crf(np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 0.5, np.float32)),
                 lambda: next(crf_map([], workers=2))):
        with pytest.raises(UserError) as exc:
            call()
        message = str(exc.value)
        assert "\n" not in message
        assert "--crf needs pydensecrf" in message and "pip install pydensecrf2" in message


def test_crf_map_closing_early_stops_cleanly():
    consumed = 0

    def items():
        nonlocal consumed
        for case in _cases(20):
            consumed += 1
            yield case

    it = crf_map(items(), CRFParams(iterations=1), workers=2, max_in_flight=2)
    first = next(it)
    it.close()  # shuts the pool down; the rest of the input is never read
    assert first.shape == (24, 40)
    assert consumed <= 3


@pytest.mark.parametrize("t", [0.0, 0.05, 0.3, 0.5, 0.8, 0.99, 1.0])
def test_threshold_prior_moves_the_decision_point(t):
    from unet_deploy.images.crf import threshold_prior

    p = np.linspace(0, 1, 1001, dtype=np.float32).reshape(7, 143)
    q = threshold_prior(p, t)
    assert q.shape == (2, 7, 143) and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1, atol=1e-6)
    far = np.abs(p - t) > 1e-4  # float rounding decides pixels exactly at the threshold
    assert np.array_equal((q[1] > 0.5)[far], (p > t)[far])
    if t == 0.5:
        assert np.allclose(q[1], p)
    assert np.all(np.diff(q[1].ravel()) >= 0)  # order of the pixels kept


def test_threshold_prior_changes_crf_output():
    from unet_deploy.images.crf import threshold_prior

    image, probs, _ = two_region_case(conf=0.7)
    base = dense_crf(image, probs).sum()
    assert dense_crf(image, threshold_prior(probs, 0.9)).sum() < base < dense_crf(
        image, threshold_prior(probs, 0.1)).sum()
    with pytest.raises(ValueError, match="two classes"):
        threshold_prior(np.full((3, 4, 4), 1 / 3, np.float32), 0.5)


# ------------------------------------------------------------------ ORT + CRF against eager + CRF and truth


@pytest.fixture(scope="module")
def fitted_cars(tmp_path_factory, fit_tiny_unet):
    """Eight synthetic cars (128x96), a base-8 U-Net fitted on them at scale 0.5, its checkpoint and ONNX
    export, and the ground-truth masks at full size."""
    import torch

    from unet_deploy.checkpoint import save_checkpoint
    from unet_deploy.export import export_onnx
    from unet_deploy.images.image_io import find_pairs, load_image, load_mask, preprocess, preprocess_mask
    from unet_deploy.images.synth import generate_dataset

    root = tmp_path_factory.mktemp("crf-cars")
    generate_dataset(root / "data", n=8, width=128, height=96, seed=5)
    pairs = find_pairs(root / "data" / "imgs", root / "data" / "masks")
    truth = [load_mask(p.mask).astype(np.uint8) for p in pairs]
    x = torch.from_numpy(np.stack([preprocess(load_image(p.image), 0.5) for p in pairs]))
    y = torch.from_numpy(np.stack([preprocess_mask(m, 0.5) for m in truth])).long()
    model, cfg = fit_tiny_unet(x, y, 40)
    return {"images": [p.image for p in pairs], "truth": truth,
            "torch": save_checkpoint(root / "best.pth", model, cfg),
            "ort": export_onnx(model, cfg, root / "model.onnx")}


def _masks(model_path, images, **options):
    from unet_deploy.predict import PredictOptions, iter_predictions, plan_jobs
    from unet_deploy.runtime import load_backend

    backend = load_backend(model_path, device="cpu")
    opts = PredictOptions(progress=False, crf_workers=1, **options)
    results = list(iter_predictions(backend, plan_jobs(images, save=False), opts))
    assert all(r.ok for r in results), [r.error for r in results]
    return [r.mask for r in results]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / max(int(a.sum() + b.sum()), 1)


def test_ort_crf_masks_match_eager_crf_and_the_truth(fitted_cars):
    """ONNX Runtime + CRF gives eager + CRF's masks, and they are the cars: an all-background mask, a
    shifted one or CRF run on the wrong probabilities fails."""
    images, truth = fitted_cars["images"], fitted_cars["truth"]
    ort_crf = _masks(fitted_cars["ort"], images, crf=True)
    eager_crf = _masks(fitted_cars["torch"], images, crf=True)
    plain = _masks(fitted_cars["ort"], images)
    total = sum(m.size for m in truth)
    same = sum(int((a == b).sum()) for a, b in zip(ort_crf, eager_crf, strict=True))
    assert same / total >= 0.999
    for mask, want in zip(ort_crf, truth, strict=True):
        assert mask.shape == want.shape and set(np.unique(mask)) <= {0, 1}
    crf_dice = [_dice(m, t) for m, t in zip(ort_crf, truth, strict=True)]
    plain_dice = [_dice(m, t) for m, t in zip(plain, truth, strict=True)]
    assert min(crf_dice) >= 0.9, crf_dice  # measured: 0.980-0.990 (without CRF 0.956-0.972)
    assert np.mean(crf_dice) > np.mean(plain_dice), (crf_dice, plain_dice)  # CRF ran and used the image


# ------------------------------------------------------------------ --crf auto: chosen, stored, reused


def test_auto_crf_is_stored_with_the_model_and_reused(fitted_cars, tmp_path):
    """`train --crf auto`'s choice goes into the checkpoint's config, from there into an export, and
    `predict --crf` (no --crf-* flags) runs with it; a choice that did not help keeps the CRF off."""
    import shutil

    from unet_deploy.checkpoint import load_checkpoint
    from unet_deploy.export import export_onnx
    from unet_deploy.images.crf import CRFChoice
    from unet_deploy.images.image_io import find_pairs
    from unet_deploy.runtime import load_backend
    from unet_deploy.runtime.loader import read_embedded_config
    from unet_deploy.train import evaluate_model
    from unet_deploy.train.crf_tune import auto_crf, candidates, store_crf

    folder = fitted_cars["images"][0].parent
    pairs = find_pairs(folder, folder.parent / "masks")
    val, held = pairs[:4], pairs[4:]
    ckpt = Path(shutil.copy(fitted_cars["torch"], tmp_path / "best.pth"))
    choice = auto_crf(ckpt, val, budget_s=30)
    assert choice.images == 4 and choice.params in candidates()
    assert read_embedded_config(ckpt).inference.crf == choice.to_dict()
    assert choice.helps == (choice.dice_crf > choice.dice_plain)
    result = evaluate_model(load_backend(ckpt, device="cpu"), held, crf=True)
    assert result["crf"] == (choice.params.to_dict() if choice.helps else None)
    if not choice.helps:
        assert result["dice_crf"] == result["dice"]

    # a stored choice with unusual parameters: the export carries it and predict --crf uses it
    odd = CRFParams(gauss_compat=0.0, bilat_compat=0.0, iterations=1)  # no pairwise terms: the plain masks
    store_crf(ckpt, CRFChoice(odd, True, 0.99, 0.98, 4))
    loaded = load_checkpoint(ckpt)
    onnx_path = export_onnx(loaded.build_model("cpu"), loaded.config, tmp_path / "best.onnx")
    assert read_embedded_config(onnx_path).inference.crf["params"] == odd.to_dict()
    images = [p.image for p in held]
    reused = _masks(onnx_path, images, crf=True)
    for a, b in zip(reused, _masks(onnx_path, images, crf=True, crf_params=odd), strict=True):
        np.testing.assert_array_equal(a, b)
    defaults = _masks(onnx_path, images, crf=True, crf_params=CRFParams())
    assert any((a != b).any() for a, b in zip(reused, defaults, strict=True))  # not the defaults

    # a choice that did not help: predict --crf gives the masks without CRF, and the CLI says so in one line
    store_crf(ckpt, CRFChoice(CRFParams(), False, 0.97, 0.98, 4))
    loaded = load_checkpoint(ckpt)
    off_path = export_onnx(loaded.build_model("cpu"), loaded.config, tmp_path / "off.onnx")
    for a, b in zip(_masks(off_path, images, crf=True), _masks(off_path, images), strict=True):
        np.testing.assert_array_equal(a, b)
    proc = subprocess.run([sys.executable, "-m", "unet_deploy", "predict", str(images[0]), "-m", str(off_path),
                           "--crf", "-o", str(tmp_path / "car_mask.png")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if "left off" in ln]
    assert len(notes) == 1 and "0.9700 with it, 0.9800 without" in notes[0], proc.stderr
    assert "next: unet-deploy serve -m" in proc.stdout and "--crf" not in proc.stdout.splitlines()[-1]
