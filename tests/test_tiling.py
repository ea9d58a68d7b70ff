"""Tiled inference (issue 15): the tile plan, blending, batching, the untiled identity, agreement with
whole-image masks on a fitted model, and ``--tile`` on predict, evaluate, serve and benchmark."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.cli import main
from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.predict import PredictOptions, predict_arrays
from unet_deploy.runtime import load_backend, resources
from unet_deploy.runtime.tiling import (
    ALIGN,
    Stitcher,
    Tiling,
    axis_plan,
    blend_weights,
    default_overlap,
    plan_tiles,
    tiled_logits,
    whole_or_tiled,
)

MIB = 1 << 20
LENGTHS = [16, 17, 31, 63, 64, 65, 97, 127, 128, 129, 191, 240, 255, 257, 640, 641, 959, 1000, 1280, 1918, 2560,
           3836]
TILES = [(16, 0), (32, 8), (64, 16), (96, 32), (100, 7), (256, 32), (640, 80), (1024, 128), (641, 63)]


# ----------------------------------------------------------------------------------------- helpers
def run_cli(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


class FakeRunner:
    """A Backend-like runner: ``logits(batch)`` -> (N, C, h, w); counts calls and their batch sizes."""

    def __init__(self, logits, channels: int = 2):
        self.logits = logits
        self.calls: list[int] = []
        self.config = DeployConfig(model=ModelConfig(base_channels=8, n_classes=channels),
                                   inference=InferenceConfig(scale=1.0))
        self.device, self.precision, self.name = "cpu", "fp32", "fake"

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        return self.logits(np.asarray(batch))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.run(batch)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, fit_on_heldout_cars) -> dict:
    """The session's base-8 U-Net fitted on held-out cars (192x128 images), as a checkpoint and a backend."""
    model, cfg, images = fit_on_heldout_cars(12, 30)
    d = tmp_path_factory.mktemp("tiling")
    path = save_checkpoint(d / "tiny.pth", model, cfg)
    return {"dir": d, "path": path, "backend": load_backend(path, "torch", "cpu"), "images": images}


# ------------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize(("tile", "overlap"), TILES)
def test_axis_plan_fewest_even_tiles_cover_with_overlap_and_meet_the_edge(tile: int, overlap: int) -> None:
    for length in LENGTHS:
        plan = axis_plan(length, tile, overlap)
        if length <= tile:
            assert plan.starts == (0,) and plan.side == length, (length, tile)
            continue
        k = plan.count
        assert k == math.ceil((length - overlap) / (tile - overlap)), (length, tile, overlap)  # fewest
        assert k * tile - (k - 1) * overlap >= length  # and k of them can cover it
        assert plan.side <= tile and plan.starts[0] == 0 and plan.starts[-1] + plan.side == length  # edges
        assert list(plan.starts) == sorted(set(plan.starts))
        gaps = np.diff(plan.starts)
        assert (plan.side - gaps >= overlap).all(), (length, tile, overlap, plan)  # overlap kept
        covered = np.zeros(length, bool)
        for s in plan.starts:
            covered[s:s + plan.side] = True
        assert covered.all()
        # even: the fewest tiles of the smallest side (rounded up to 16 when that fits in the tile)
        smallest = math.ceil((length + (k - 1) * overlap) / k)
        assert smallest <= plan.side <= max(smallest, math.ceil(smallest / ALIGN) * ALIGN)
        if math.ceil(smallest / ALIGN) * ALIGN <= tile:
            assert plan.side % ALIGN == 0


def test_plan_of_an_image_no_larger_than_the_tile_is_one_tile_and_the_grid_otherwise() -> None:
    assert plan_tiles(128, 192, 192, 32).count == 1
    assert plan_tiles(61, 97, 640, 80).shape == (61, 97)
    plan = plan_tiles(1280, 1918, 640, 80)
    assert (plan.rows.count, plan.cols.count, plan.shape) == (3, 4, (480, 544))
    assert len(list(plan.origins())) == plan.count == 12
    assert plan_tiles(1280, 1918, 1024, 128).count == 4
    assert default_overlap(640) == 80 and default_overlap(1024) == 128 and default_overlap(16) == 8


def test_blend_weights_are_a_floored_gaussian_peaking_at_the_centre() -> None:
    w = blend_weights(64)
    assert w.dtype == np.float32 and w.shape == (64,) and np.allclose(w, w[::-1])
    assert w.max() <= 1 and w[31] > 0.99 and w[0] < 0.01 and w.min() >= 1e-3
    assert (blend_weights(40, full=True) == 1).all()


# ---------------------------------------------------------------------------------------- stitching
def test_constant_logits_stitch_back_to_the_constant_without_seams() -> None:
    runner = FakeRunner(lambda b: np.broadcast_to(np.array([1.5, -2.25], np.float32)[None, :, None, None],
                                                  (len(b), 2, b.shape[2], b.shape[3])).copy())
    image = np.zeros((157, 233, 3), np.uint8)
    plan = plan_tiles(157, 233, 64, 16)
    out = tiled_logits(runner, image, plan, batch_size=3)
    assert out.shape == (1, 2, 157, 233) and out.dtype == np.float32
    assert np.abs(out[0, 0] - 1.5).max() < 1e-5 and np.abs(out[0, 1] + 2.25).max() < 1e-5


def test_identity_runner_stitches_back_the_whole_input_at_the_right_places() -> None:
    """Logits = the tile's own pixels: any misplaced tile or unnormalised weight shows."""
    runner = FakeRunner(lambda b: b.copy(), channels=3)
    image = np.random.default_rng(0).integers(0, 255, (131, 203, 3), dtype=np.uint8)
    out = tiled_logits(runner, image, plan_tiles(131, 203, 48, 16), batch_size=4)
    want = image.transpose(2, 0, 1)[None].astype(np.float32) / 255
    assert np.abs(out - want).max() < 1e-5


def test_the_stitcher_normalises_by_separable_weight_sums() -> None:
    plan = plan_tiles(100, 150, 64, 16)
    st = Stitcher(plan, 1)
    total = np.zeros((100, 150), np.float32)
    h, w = plan.shape
    for y, x in plan.origins():
        total[y:y + h, x:x + w] += st.wy[:, None] * st.wx[None, :]
    assert np.allclose(total, st.sum_y[:, None] * st.sum_x[None, :], rtol=1e-5)


def test_tiles_run_in_batches_of_batch_size(tmp_path: Path) -> None:
    runner = FakeRunner(lambda b: np.zeros((len(b), 2, b.shape[2], b.shape[3]), np.float32))
    image = np.zeros((160, 240, 3), np.uint8)
    plan = plan_tiles(160, 240, 64, 16)
    assert plan.count == 15
    tiled_logits(runner, image, plan, batch_size=4)
    assert runner.calls == [4, 4, 4, 3]
    runner.calls.clear()
    list(predict_arrays(runner, [image], PredictOptions(tile=64, tile_overlap=16, batch_size=6)))  # type: ignore[arg-type]
    assert runner.calls == [6, 6, 3]


# ------------------------------------------------------------------------------ real model, identity
def test_one_tile_is_bit_identical_to_the_untiled_path(fitted: dict) -> None:
    be = fitted["backend"]
    image = np.asarray(Image.open(fitted["images"][0]).convert("RGB"))[:101, :173]  # odd size
    whole = next(predict_arrays(be, [image], PredictOptions(scale=1.0))).require_mask()
    one = next(predict_arrays(be, [image], PredictOptions(scale=1.0, tile=256))).require_mask()
    assert np.array_equal(whole, one)
    a, b = whole_or_tiled(be, image, 1.0, None), whole_or_tiled(be, image, 1.0, Tiling(256, 32))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tiled_masks_agree_with_whole_image_masks_of_a_fitted_model(fitted: dict) -> None:
    be = fitted["backend"]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in fitted["images"][12:16]]
    whole = [r.require_mask() for r in predict_arrays(be, images, PredictOptions(scale=1.0))]
    tiled = [r.require_mask() for r in predict_arrays(be, images, PredictOptions(scale=1.0, tile=96,
                                                                               batch_size=4))]
    agree = np.mean([(w == t).mean() for w, t in zip(whole, tiled, strict=True)])
    assert all(w.shape == t.shape == (128, 192) for w, t in zip(whole, tiled, strict=True))
    assert 0.01 < np.mean([w.mean() for w in whole]) < 0.99  # the masks are not trivial
    assert agree >= 0.99, agree
    # with flip TTA the tiles run mirrored too and still agree
    tta = next(predict_arrays(be, images[:1], PredictOptions(scale=1.0, tile=96, tta=True))).require_mask()
    assert (tta == whole[0]).mean() >= 0.98


# -------------------------------------------------------------------------------------------- CLI
def test_cli_predict_tile_on_an_odd_sized_image_writes_a_mask_of_its_size(fitted: dict, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    img = Image.open(fitted["images"][12]).convert("RGB").crop((0, 0, 187, 123))
    img.save(tmp_path / "odd.png")
    code, _, err = run_cli(["predict", "-m", fitted["path"], "--device", "cpu", "-s", "1", "--tile", "64",
                            "--tile-overlap", "16", "-b", "3", "-q", tmp_path / "odd.png",
                            "-o", tmp_path / "odd_mask.png"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "odd_mask.png") as m:
        assert m.size == (187, 123)
        tiled = np.asarray(m)
    assert set(np.unique(tiled)) <= {0, 255}
    code, _, err = run_cli(["predict", "-m", fitted["path"], "--device", "cpu", "-s", "1", "-q",
                            tmp_path / "odd.png", "-o", tmp_path / "whole.png"], capsys)
    assert code == 0, err
    assert (np.asarray(Image.open(tmp_path / "whole.png")) == tiled).mean() > 0.98


def test_cli_evaluate_with_tile(fitted: dict, synth_heldout: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for sub in ("imgs", "masks"):
        (data / sub).mkdir(parents=True)
        for p in sorted((synth_heldout / sub).iterdir())[12:15]:
            shutil.copy(p, data / sub / p.name)
    args = ["evaluate", "-m", fitted["path"], "--device", "cpu", "--data", data, "-s", "1", "-q"]
    code, whole_out, err = run_cli([*args, "--json", tmp_path / "whole.json"], capsys)
    assert code == 0, err
    code, tiled_out, err = run_cli([*args, "--tile", "64", "--json", tmp_path / "tiled.json"], capsys)
    assert code == 0, err
    whole, tiled = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "tiled"))
    assert tiled["n"] == whole["n"] == 3 and abs(tiled["dice"] - whole["dice"]) < 0.02


@pytest.mark.parametrize("command", ["predict", "evaluate", "serve", "benchmark"])
def test_bad_tile_flags_are_one_line_errors_with_exit_2(command: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    extras: dict[str, list[Any]] = {"predict": [tmp_path / "x.png"], "evaluate": ["--data", tmp_path], "serve": [],
                                    "benchmark": ["--quick"]}
    extra = extras[command]
    for flags, words in ((["--tile", "0"], "--tile 0"), (["--tile", "-8"], "--tile -8"),
                         (["--tile", "64", "--tile-overlap", "64"], "--tile-overlap 64"),
                         (["--tile", "64", "--tile-overlap", "-1"], "--tile-overlap -1")):
        code, _, err = run_cli([command, *flags, *extra], capsys)
        line = one_line(err)
        assert code == 2 and words in line, (command, flags, err)


def test_automatic_tiling_when_the_whole_image_cannot_fit(fitted: dict, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    src = fitted["images"][12]
    # 192x128 at scale 2 is 384x256: base 8 eager torch needs ~90 MiB whole; give it 80 MiB
    monkeypatch.setattr(resources, "available_memory", lambda: (80 * MIB, "test limit"))
    code, _, err = run_cli(["predict", "-m", fitted["path"], "--device", "cpu", "-s", "2", "-q", src,
                            "-o", tmp_path / "auto.png"], capsys)
    assert code == 0, err
    line = one_line(err)
    assert line.startswith("notice: ") and str(src) in line and "--tile " in line, line
    assert "needs about" in line and "80 MiB is available (test limit)" in line
    with Image.open(tmp_path / "auto.png") as m:
        assert m.size == (192, 128)
    # with room for the whole image: no notice, the untiled path
    monkeypatch.setattr(resources, "available_memory", lambda: (8 << 30, "test limit"))
    code, _, err = run_cli(["predict", "-m", fitted["path"], "--device", "cpu", "-s", "2", "-q", src,
                            "-o", tmp_path / "whole.png"], capsys)
    assert code == 0 and err == ""
    # not even the smallest tile fits: refused before the model runs, one line naming --tile
    monkeypatch.setattr(resources, "available_memory", lambda: (1 * MIB, "test limit"))
    code, _, err = run_cli(["predict", "-m", fitted["path"], "--device", "cpu", "-s", "2", "-q", src,
                            "-o", tmp_path / "none.png"], capsys)
    line = one_line(err)
    assert code == 2 and "needs about" in line and "not even 64 px tiles fit" in line
    assert not (tmp_path / "none.png").exists()


# ----------------------------------------------------------------------------------- serve, bench
def test_serve_with_tile_answers_the_tiled_mask_of_predict(fitted: dict, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from serve_helpers import Server, png_pixels

    path = fitted["path"]  # scale 0.5: 187x123 is a 93x61 network input, run as 32 px tiles
    Image.open(fitted["images"][13]).convert("RGB").crop((0, 0, 187, 123)).save(tmp_path / "odd.png")
    code, _, err = run_cli(["predict", "-m", path, "--device", "cpu", "--tile", "32", "-q", tmp_path / "odd.png",
                            "-o", tmp_path / "want.png"], capsys)
    assert code == 0, err
    srv = Server(["-m", str(path), "--device", "cpu", "--tile", "32", "--max-batch", "4"], tmp_path)
    try:
        reply = srv.post("/v1/predict", (tmp_path / "odd.png").read_bytes())
        assert reply.status == 200, reply.body[:300]
        got = png_pixels(reply.body)
        assert got.shape == (123, 187)
        assert np.array_equal(got, np.asarray(Image.open(tmp_path / "want.png")))
        assert srv.get("/v1/model").json()["tile"] == 32
    finally:
        assert srv.stop() == 0


def test_benchmark_tile_quick_reports_the_tiled_section(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, err = run_cli(["benchmark", "--quick", "--backends", "ort", "--tile", "64", "--runs", "1",
                              "--warmup", "0", "--threads", "1", "-q", "--json", tmp_path / "t.json"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "t.json").read_text())
    section = report["tiled"]["backends"]["ort"]
    assert report["cases"] == [] and report["tiled"]["tile"] == 64 and report["tiled"]["tile_overlap"] == 16
    assert set(section["cases"]) == {"whole-half", "whole", "tiled", "tiled-double"}
    assert section["cases"]["tiled-double"]["image"] == [480, 320]
    assert section["cases"]["tiled"]["plan"]["tiles"] == 15 and 0.9 <= section["agreement"] <= 1
    assert 0 <= section["whole_foreground"] <= 1 and isinstance(section["agreement_informative"], bool)
    assert "--tile 64" in report.get("command", "") and "masks agree" in out
    code, again, _ = run_cli(["benchmark", "--from-json", tmp_path / "t.json"], capsys)
    assert code == 0 and "masks agree" in again
