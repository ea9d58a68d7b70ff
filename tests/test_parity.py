"""parity(): measures, thresholds, default cases, failure reporting -- eager models only (fast)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.errors import UserError
from unet_deploy.export.parity import (
    BF16_MAX_REL_ERR,
    BF16_MIN_AGREEMENT,
    BF16_MIN_DICE,
    CARVANA_HALF,
    FP16_MAX_REL_ERR,
    FP16_MIN_AGREEMENT,
    FP16_MIN_DICE,
    INT8_MAX_REL_ERR,
    INT8_MIN_AGREEMENT,
    INT8_MIN_DICE,
    ParityCase,
    ParityThresholds,
    compare,
    default_cases,
    parity,
)
from unet_deploy.images.image_io import scaled_size

CFG = DeployConfig(model=ModelConfig(base_channels=4, bilinear=True), inference=InferenceConfig(scale=0.5))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = CFG.model.build()
    m.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            m(torch.rand(2, 3, 48, 64) * 2)
    return m.eval()


def _cases() -> list[ParityCase]:
    """Small odd sizes (the default cases' shapes are checked in test_default_cases_shapes)."""
    g = torch.Generator().manual_seed(0)
    return [ParityCase("odd", torch.rand(1, 3, 45, 67, generator=g).numpy()),
            ParityCase("batch-2", torch.rand(2, 3, 33, 41, generator=g).numpy())]


def test_thresholds_by_precision() -> None:
    """The product's numbers as literals: loosening a constant must fail here, not pass silently."""
    fp32 = ParityThresholds.for_precision("fp32")
    assert fp32 == ParityThresholds()
    assert (fp32.max_rel_err, fp32.min_pixel_agreement, fp32.min_dice) == (1e-5, 0.9999, 0.9999)
    assert fp32.max_flipped_pixels == 2
    assert fp32.on_random == "all"
    limits = {p: ParityThresholds.for_precision(p) for p in ("bf16", "fp16", "int8")}
    assert {p: (t.max_rel_err, t.min_pixel_agreement, t.min_dice, t.on_random, t.precision)
            for p, t in limits.items()} == {"bf16": (0.3, 0.995, 0.99, "logits", "bf16"),
                                            "fp16": (0.1, 0.999, 0.998, "logits", "fp16"),
                                            "int8": (0.6, 0.99, 0.98, "none", "int8")}
    assert (BF16_MAX_REL_ERR, BF16_MIN_AGREEMENT, BF16_MIN_DICE) == (0.3, 0.995, 0.99)
    assert (FP16_MAX_REL_ERR, FP16_MIN_AGREEMENT, FP16_MIN_DICE) == (0.1, 0.999, 0.998)
    assert (INT8_MAX_REL_ERR, INT8_MIN_AGREEMENT, INT8_MIN_DICE) == (0.6, 0.99, 0.98)
    with pytest.raises(UserError, match="int4"):
        ParityThresholds.for_precision("int4")


def _help(command: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "unet_deploy", command, "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())  # rich wraps the text: compare with single spaces


def _sci(x: float) -> str:
    """1e-2 as the help text writes it (not 0.01 or 1e-02)."""
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def test_help_states_the_thresholds_parity_applies() -> None:
    reduced = _help("verify")
    for name, (rel, agreement, dice) in {"bf16": (BF16_MAX_REL_ERR, BF16_MIN_AGREEMENT, BF16_MIN_DICE),
                                         "fp16": (FP16_MAX_REL_ERR, FP16_MIN_AGREEMENT, FP16_MIN_DICE)}.items():
        assert (f"{name}: relative error <= {rel:g}, pixel agreement >= {agreement * 100:g} %, "
                f"dice >= {dice:g}") in reduced, reduced
    fp32 = ParityThresholds()
    assert (f"relative logit error <= {_sci(fp32.max_rel_err)}, mask pixel agreement >= "
            f"{fp32.min_pixel_agreement * 100:g} %, dice between the masks >= {fp32.min_dice:g}") in _help("export")


def test_default_cases_shapes(tmp_path) -> None:
    full = default_cases(CFG)
    assert full[0].shape == (1, 3, *CARVANA_HALF) == (1, 3, 640, 959)
    quick = default_cases(CFG, quick=True)
    assert quick[0].shape == (1, 3, 160, 239)
    for cases in (full, quick):
        assert cases[1].shape[2] % 16 and cases[1].shape[3] % 16
        assert cases[2].shape[0] == 2
        for c in cases:
            assert c.batch.dtype == np.float32 and 0 <= c.batch.min() and c.batch.max() <= 1
    rgb = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "car.jpg")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "grey.png")  # grey image -> 3 channels like predict
    with_images = default_cases(CFG, [tmp_path / "car.jpg", tmp_path / "grey.png"], quick=True)
    assert [(c.name, c.real) for c in quick] == [("quick-odd", False), ("odd", False), ("batch-2", False)]
    w, h = scaled_size(97, 61, 0.5)
    assert [c.shape for c in with_images[3:]] == [(1, 3, h, w)] * 2
    assert with_images[3].name == "image car.jpg" and with_images[3].real
    for c in with_images[3:]:  # real images scaled to [0, 1] like predict's input, not left at 0..255
        assert c.batch.dtype == np.float32 and 0 <= c.batch.min() and 0.5 < c.batch.max() <= 1


def test_reduced_precisions_add_a_car_photo_unless_real_images_are_given(tmp_path) -> None:
    """Reduced precisions are judged by the masks of photos: the user's images, else a synthetic car."""
    from unet_deploy.export.parity import reduced_precision_cases

    plain = default_cases(CFG, quick=True)
    added = reduced_precision_cases(plain, CFG, quick=True)
    assert [c.name for c in added] == ["quick-odd", "odd", "batch-2", "quick-car"]
    car = added[-1]
    assert car.real and car.shape == (1, 3, 160, 239) and 0 <= car.batch.min() and car.batch.max() <= 1
    assert car.batch.std() > 0.05  # a photo, not a flat image
    assert len(reduced_precision_cases(plain, CFG)) == 4 and reduced_precision_cases(plain, CFG)[-1].shape[2:] == (
        640, 959)
    rgb = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "mine.png")
    mine = default_cases(CFG, [tmp_path / "mine.png"], quick=True)
    assert reduced_precision_cases(mine, CFG, quick=True) == mine  # the user's own image is the photo


def test_identical_models_pass(model) -> None:
    report = parity(model, copy.deepcopy(model), _cases(), config=CFG)
    assert report.passed
    assert len(report.rows) == 2
    for row in report.rows:
        assert row.rel_err == 0 and row.max_abs_err == 0
        assert row.pixel_agreement == 1.0 and row.dice == 1.0 and row.flipped_pixels == 0


def test_perturbed_weights_fail(model) -> None:
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.up2.conv.double_conv[0].weight.mul_(1.01)
    report = parity(model, wrong, _cases(), config=CFG)
    assert not report.passed
    assert all(not r.passed and r.rel_err > 1e-5 for r in report.rows)


def test_fp32_bound_allows_what_eager_fp32_itself_misses_and_no_more(model) -> None:
    """A model whose BatchNorm subtracts large, close numbers: eager fp32 is ~1e-4 from the exact result. An
    export that computes the exact result passes (its table notes both errors); one 5x further off fails."""
    touchy = copy.deepcopy(model)
    with torch.no_grad():
        for bn in (m for m in touchy.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.add_(500.0)
            bn.bias.add_(bn.weight * 500.0 / torch.sqrt(bn.running_var + bn.eps))
    exact_model = copy.deepcopy(touchy).double()

    def exact(batch):
        with torch.no_grad():
            return exact_model(torch.as_tensor(batch).double()).float()

    def drifted(batch):
        with torch.no_grad():
            eager = touchy(torch.as_tensor(batch))
            truth = exact(batch)
        return truth + 5 * (eager - truth).abs().max()

    report = parity(touchy, exact, _cases(), config=CFG)
    assert report.passed, report.summary()
    assert all(r.rel_err > 1e-5 and r.note.startswith("(vs float64: ") for r in report.rows)
    assert not parity(touchy, drifted, _cases(), config=CFG).passed
    plain = parity(model, exact, _cases(), ParityThresholds.for_precision("bf16"), config=CFG)  # fp32 only
    assert all(r.note == "" for r in plain.rows)


def test_candidate_errors_and_wrong_shapes_are_failed_rows(model) -> None:
    def raises(batch):
        raise RuntimeError("Sizes of tensors must match\nmore detail")

    report = parity(model, raises, _cases(), config=CFG)
    assert not report.passed
    assert all("RuntimeError: Sizes of tensors must match" == r.error for r in report.rows)
    assert all(math.isinf(r.rel_err) for r in report.rows)

    def cropped(batch):
        return model(torch.as_tensor(batch))[..., :-1]

    report = parity(model, cropped, _cases(), config=CFG)
    assert not report.passed and "output shape" in report.rows[0].error


def test_nan_output_fails(model) -> None:
    def nan_pixel(batch):
        out = model(torch.as_tensor(batch)).detach().clone()
        out[0, 0, 0, 0] = math.nan
        return out

    report = parity(model, nan_pixel, _cases(), config=CFG)
    assert not report.passed and all(math.isinf(r.rel_err) for r in report.rows)


def _tied_logits(n_tied: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits where ``n_tied`` pixels are decided by one float32 ulp, flipped in ``b``."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 2, 40, 50, generator=g) * 20 - 10
    a[0, 1] = a[0, 0] + 5  # class 1 everywhere, clearly
    b = a.clone()
    idx = torch.arange(n_tied)
    ys, xs = idx // 50, idx % 50
    a[0, 0, ys, xs] = 1.0
    a[0, 1, ys, xs] = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    b[0, 0, ys, xs] = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    b[0, 1, ys, xs] = 1.0
    return a, b


def test_one_flipped_pixel_passes_a_real_drift_fails() -> None:
    th = ParityThresholds()
    a, b = _tied_logits(1)
    one = compare(a, b, th)
    assert one["flipped_pixels"] == 1 and one["rel_err"] < 1e-6
    assert one["passed"]
    a, b = _tied_logits(200)  # 10 % of the pixels flip, logits still within 1e-6
    many = compare(a, b, th)
    assert many["rel_err"] < 1e-5 and many["flipped_pixels"] == 200
    assert many["pixel_agreement"] == pytest.approx(0.9) and many["dice"] < 0.95
    assert not many["passed"]


def test_fp16_thresholds_are_looser(model) -> None:
    def noisy(batch):
        out = model(torch.as_tensor(batch))
        return out + 1e-3 * out.abs().max()

    strict = parity(model, noisy, _cases(), config=CFG)
    loose = parity(model, noisy, _cases(), ParityThresholds.for_precision("fp16"), config=CFG)
    assert not strict.passed
    assert loose.passed and loose.thresholds.precision == "fp16"


def _small_fg_logits(n_flipped: int) -> tuple[torch.Tensor, torch.Tensor]:
    """100x100 two-class logits, 2000 foreground pixels; in ``b`` ``n_flipped`` of them, tied to within
    1e-3 in ``a``, fall to background (dice 2(F-k)/(2F-k)), the way half precision flips near-ties."""
    a = torch.zeros(1, 2, 100, 100)
    a[0, 1] = -5.0
    a[0, 1, :20] = 5.0  # foreground: rows 0-19
    a[0, 1, 10, :n_flipped] = 1e-3
    b = a.clone()
    b[0, 1, 10, :n_flipped] = -1e-3
    return a, b


def test_half_precision_mask_criteria_are_applied() -> None:
    """More than max_flipped_pixels flips: the agreement and dice thresholds decide."""
    half = ParityThresholds.for_precision("fp16")
    six = compare(*_small_fg_logits(6), half)  # dice 0.9985: passes fp16, fails fp32
    assert six["flipped_pixels"] == 6 and six["rel_err"] <= FP16_MAX_REL_ERR
    assert FP16_MIN_DICE <= six["dice"] < 0.999 and six["pixel_agreement"] >= FP16_MIN_AGREEMENT
    assert six["passed"] and not compare(*_small_fg_logits(6), ParityThresholds())["passed"]
    nine = compare(*_small_fg_logits(9), half)  # dice 0.9977 < 0.998 with agreement 99.91 %: dice fails it
    assert nine["pixel_agreement"] >= FP16_MIN_AGREEMENT and nine["dice"] < FP16_MIN_DICE
    assert not nine["passed"]
    # random noise is judged by its logits only at reduced precision: the same flips pass there ...
    assert compare(*_small_fg_logits(9), half, real=False)["passed"]
    a, b = _small_fg_logits(9)
    drifted = compare(a, b + 0.2 * a.abs().max(), half, real=False)  # ... a real drift of the logits does not
    assert drifted["rel_err"] > FP16_MAX_REL_ERR and not drifted["passed"]
    assert not compare(a, b + 0.4 * a.abs().max(), ParityThresholds.for_precision("bf16"), real=False)["passed"]
    # int8 judges car photos only (calibrated ranges do not cover noise); non-finite logits fail everywhere
    int8 = ParityThresholds.for_precision("int8")
    assert compare(a, b + 0.7 * a.abs().max(), int8, real=False)["passed"]
    assert not compare(a, b + 0.7 * a.abs().max(), int8)["passed"]
    assert not compare(a, b * float("nan"), int8, real=False)["passed"]
    two = compare(*_small_fg_logits(2), ParityThresholds())  # within max_flipped_pixels: fp32 passes
    assert two["flipped_pixels"] == 2 and two["dice"] < 0.9999 and two["rel_err"] > 1e-5
    assert not two["passed"]  # ... on the masks, but the logits moved by 4e-4 relative


def test_report_renders_as_table_and_json(model) -> None:
    def broken(batch):
        raise ValueError("boom")

    report = parity(model, broken, _cases(), config=CFG)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["passed"] is False
    assert data["rows"][0]["shape"] == [1, 3, 45, 67] and data["rows"][0]["rel_err"] == "inf"
    assert data["thresholds"]["max_rel_err"] == 1e-5
    console = Console(record=True, width=160)
    console.print(report.table())
    text = console.export_text()
    for word in ("odd", "batch-2", "2x3x33x41", "FAIL", "rel err", "ValueError: boom"):
        assert word in text
    assert "parity FAIL" in report.summary()


def test_no_cases_is_a_user_error(model) -> None:
    with pytest.raises(UserError, match="no input cases"):
        parity(model, model, [], config=CFG)
