"""The OpenVINO backend: IR export verified against eager, NNCF int8, masks equal ONNX Runtime's, the
compiled-model cache, option checks and one-line errors, and the benchmark variants.

Every test uses a width-8 model on small images (one ONNX export per module, made by a fixture)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.config import DeployConfig, ModelConfig
from unet_deploy.errors import UserError
from unet_deploy.export import export_onnx
from unet_deploy.export.exporter import ExportOptions, parse_formats, run_export
from unet_deploy.runtime import load_backend, read_embedded_config
from unet_deploy.runtime.backend_options import OpenVinoOptions, options_for

pytest.importorskip("openvino", reason="the OpenVINO backend needs the openvino extra")
pytestmark = pytest.mark.export

ROOT = Path(__file__).parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "unet_deploy", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _trained_like(seed: int = 0) -> tuple[torch.nn.Module, DeployConfig]:
    """Width 8, random weights and BatchNorm statistics as after some training."""
    cfg = DeployConfig(model=ModelConfig(base_channels=8))
    torch.manual_seed(seed)
    model = cfg.model.build().train()
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.3)
        for _ in range(3):
            model(torch.rand(2, 3, 48, 64))
    return model.eval(), cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A width-8 checkpoint, its ONNX file and its IR, both from one `unet-deploy export` (quick verify)."""
    d = tmp_path_factory.mktemp("ov")
    model, cfg = _trained_like()
    ckpt = save_checkpoint(d / "tiny.pth", model, cfg)
    done = run_export(ckpt, ExportOptions(formats=["openvino", "onnx"], output=d / "exported", quick_verify=True),
                      log=lambda _m: None)
    assert done.passed, done.results
    onnx_path = d / "exported" / "tiny.onnx"
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, mode, size in (("rgb.jpg", "RGB", (97, 61)), ("gray.png", "L", (64, 48)), ("rgba.png", "RGBA", (80, 53)),
                             ("pal.gif", "P", (72, 40))):
        pixels = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).convert(mode).save(images / name)
    return {"dir": d, "ckpt": ckpt, "onnx": onnx_path, "xml": d / "exported" / "tiny.xml", "images": images,
            "config": cfg, "model": model}


def test_export_writes_a_verified_ir_with_the_checkpoint_config(tiny) -> None:
    xml = tiny["xml"]
    assert xml.is_file() and xml.with_suffix(".bin").stat().st_size > 100_000
    # the IR was converted from the verified ONNX file; no staging folder and no temporary files are left
    assert sorted(p.name for p in xml.parent.iterdir()) == ["tiny.bin", "tiny.onnx", "tiny.xml"]
    embedded = read_embedded_config(xml)
    assert embedded is not None and embedded.model == tiny["config"].model
    assert embedded.source["abs_path"] == str(tiny["ckpt"].resolve())
    backend = load_backend(xml, device="cpu", cache=False, precision="fp32")
    assert backend.name == "openvino" and backend.precision == "fp32" and "OpenVINO" in backend.provider
    x = np.random.default_rng(1).random((2, 3, 61, 97), dtype=np.float32)
    with torch.no_grad():
        expected = tiny["model"](torch.from_numpy(x)).numpy()
    got = backend.run(x)
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_predict_masks_equal_onnx_runtime_on_odd_sizes_and_modes(tiny) -> None:
    out_ov, out_ort = tiny["dir"] / "masks-ov", tiny["dir"] / "masks-ort"
    r1 = _cli("predict", "-m", str(tiny["xml"]), "--precision", "fp32", str(tiny["images"]), "-o", str(out_ov),
              cwd=tiny["dir"])
    r2 = _cli("predict", "-m", str(tiny["onnx"]), str(tiny["images"]), "-o", str(out_ort), cwd=tiny["dir"])
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    assert "openvino (fp32)" in r1.stdout
    names = sorted(p.name for p in out_ort.iterdir())
    assert len(names) == 4 and names == sorted(p.name for p in out_ov.iterdir())
    for name in names:
        a, b = np.asarray(Image.open(out_ov / name)), np.asarray(Image.open(out_ort / name))
        assert a.shape == b.shape and (a == b).all(), name
        assert 0 < (a > 0).mean() < 1, f"{name}: a degenerate mask would hide a broken backend"


def test_onnx_file_on_openvino_and_a_batch_through_parallel_streams(tiny) -> None:
    on_onnx = load_backend(tiny["onnx"], "openvino", device="cpu", cache=False)
    assert on_onnx.config.model == tiny["config"].model  # metadata read from the ONNX file
    x = np.random.default_rng(2).random((3, 3, 48, 80), dtype=np.float32)
    one_by_one = np.concatenate([on_onnx.run(x[i:i + 1]) for i in range(3)])
    parallel = on_onnx.run(x)  # hint "auto": a batch of 3 runs on the throughput-compiled model
    runner: Any = on_onnx.call  # the OpenVINO runner: its compiled models and parallel requests
    assert runner.requests and "THROUGHPUT" in runner.compiled
    np.testing.assert_allclose(parallel, one_by_one, rtol=1e-5, atol=1e-5)
    latency = load_backend(tiny["onnx"], "openvino", device="cpu", hint="latency", cache=False)
    np.testing.assert_allclose(latency.run(x), one_by_one, rtol=1e-5, atol=1e-5)
    assert cast(Any, latency.call).requests is None


def test_compiled_model_cache_is_used_and_never_stale(tiny, tmp_path: Path) -> None:
    """A second load comes from the cache; new weights under the same file name are not served stale."""
    xml = tmp_path / "m.xml"
    for suffix in (".xml", ".bin"):
        xml.with_suffix(suffix).write_bytes(tiny["xml"].with_suffix(suffix).read_bytes())
    x = np.random.default_rng(3).random((1, 3, 48, 64), dtype=np.float32)
    first = load_backend(xml, device="cpu").run(x)
    assert any((tmp_path / ".openvino-cache").iterdir())
    second = load_backend(xml, device="cpu")
    assert cast(Any, second.call).compiled["LATENCY"].get_property("LOADED_FROM_CACHE")
    np.testing.assert_array_equal(second.run(x), first)
    other, cfg = _trained_like(seed=5)  # re-export other weights to the same name
    from unet_deploy.export.openvino_writer import convert_onnx_to_ir

    convert_onnx_to_ir(export_onnx(other, cfg, tmp_path / "other.onnx"), cfg, xml)
    third = load_backend(xml, device="cpu").run(x)
    with torch.no_grad():
        assert np.abs(third - other(torch.from_numpy(x)).numpy()).max() < 1e-4
    assert np.abs(third - first).max() > 1e-2


def test_a_failing_ir_is_not_written_and_the_older_file_stays(tiny, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "exported"
    out.mkdir()
    (out / "tiny.xml").write_text("older xml")
    (out / "tiny.bin").write_bytes(b"older bin")
    from unet_deploy.runtime import openvino_backend as backend_openvino

    real = backend_openvino._OpenVinoRunner.__call__
    monkeypatch.setattr(backend_openvino._OpenVinoRunner, "__call__", lambda self, b: real(self, b) + 1.0)
    lines: list[str] = []
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in sorted(tiny["images"].iterdir())[:2]:
        (calib / path.name).write_bytes(path.read_bytes())
    done = run_export(tiny["ckpt"], ExportOptions(formats=["openvino"], output=out, quick_verify=True, int8=True,
                                                  calibration=calib), log=lambda m: lines.append(str(m)))
    assert not done.passed and done.failed == ["openvino", "openvino-int8"]
    assert (out / "tiny.xml").read_text() == "older xml" and (out / "tiny.bin").read_bytes() == b"older bin"
    skipped = next(m for m in lines if "int8: skipped" in m)  # names the file that failed, and a way forward
    assert f"the fp32 openvino export ({out / 'tiny.xml'}) did not pass its parity check" in skipped
    assert "`unet-deploy export --format openvino --no-verify --int8` writes it unchecked" in skipped
    assert sorted(p.name for p in out.iterdir()) == ["tiny.bin", "tiny.xml"]


def test_nncf_int8_ir_is_verified_on_real_images(fit_on_heldout_cars, tmp_path: Path) -> None:
    """A fitted model quantised on 6 car images by `export --int8` (its own process, as users run it);
    checked by int8 mask criteria on held-out ones."""
    model, cfg, images = fit_on_heldout_cars(12, 30)
    calib = tmp_path / "calib"
    calib.mkdir()
    for path in images[:8]:
        (calib / path.name).write_bytes(path.read_bytes())
    ckpt = save_checkpoint(tmp_path / "car.pth", model, cfg)
    r = _cli("export", "-m", str(ckpt), "--format", "openvino", "-o", str(tmp_path / "exp"), "--quick-verify",
             "--int8", "--calibration", str(calib), "--calibration-count", "6", "--json", "report.json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import json

    entry = json.loads((tmp_path / "report.json").read_text())["formats"]["openvino-int8"]
    assert entry["written"] and len(entry["calibration_images"]) == 6
    assert entry["parity"]["thresholds"]["precision"] == "int8" and entry["parity"]["passed"]
    int8 = load_backend(tmp_path / "exp" / "car.int8.xml", device="cpu", cache=False)
    assert int8.precision == "int8"
    fp32 = load_backend(tmp_path / "exp" / "car.xml", device="cpu", cache=False)
    from unet_deploy.images.image_io import load_image, preprocess

    batch = preprocess(load_image(images[13]), cfg.inference.scale)[None]
    masks_int8, masks_fp32 = int8.run(batch).argmax(1), fp32.run(batch).argmax(1)
    assert (masks_int8 == masks_fp32).mean() >= 0.99
    assert 0 < masks_fp32.mean() < 1, "the fitted model should find car and background"


def test_options_and_errors_are_one_line(tiny, tmp_path: Path) -> None:
    assert options_for("openvino", precision="bf16", threads=2) == OpenVinoOptions(precision="bf16", threads=2)
    with pytest.raises(UserError, match="--backend openvino"):
        options_for("ort", precision="bf16")
    with pytest.raises(UserError, match="int8"):
        OpenVinoOptions(precision="int8")
    with pytest.raises(UserError, match="does not run on CUDA"):
        load_backend(tiny["xml"], device="cuda")
    with pytest.raises(UserError, match="torch model file cannot run on --backend openvino"):
        load_backend(tiny["ckpt"], "openvino")
    broken = tmp_path / "broken.xml"
    broken.write_text("<net><layers>")
    with pytest.raises(UserError, match="not a readable OpenVINO IR"):
        read_embedded_config(broken)
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(tiny["xml"].read_bytes())  # no .bin beside it
    r = _cli("predict", "-m", str(lonely), str(tiny["images"] / "rgb.jpg"), "-o", str(tmp_path / "m.png"),
             cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lonely.xml" in r.stderr and "re-export" in r.stderr


@pytest.mark.precision
def test_bf16_hint_runs_bf16_or_says_it_cannot(tiny, tmp_path: Path) -> None:
    from unet_deploy.runtime.openvino_backend import openvino_cpu_has

    r = _cli("predict", "-m", str(tiny["xml"]), "--precision", "bf16", str(tiny["images"] / "rgb.jpg"),
             "-o", str(tmp_path / "m.png"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    if openvino_cpu_has("bf16"):
        assert "openvino (bf16)" in r.stdout
    else:
        assert "openvino (fp32)" in r.stdout and "no bf16 kernels here; it runs fp32" in r.stderr


def test_all_formats_include_openvino_only_when_installed(monkeypatch) -> None:
    from unet_deploy.bench.variants import default_backends

    assert parse_formats("all") == ["onnx", "torchscript", "openvino"]
    assert parse_formats("ov,onnx") == ["openvino", "onnx"]
    assert default_backends() == ("torch", "torchscript", "ort", "openvino")
    monkeypatch.setitem(sys.modules, "openvino", None)  # what an import of a missing package finds
    assert parse_formats("all") == ["onnx", "torchscript"]
    assert default_backends() == ("torch", "torchscript", "ort")


@pytest.mark.precision
def test_benchmark_runs_the_openvino_variants_and_the_plain_recipe(tmp_path: Path) -> None:
    """Every OpenVINO variant, the plain int8 recipe among them; our int8 IR runs its other layers at bf16 where
    the CPU has it; a quick run of a fresh width-8 model recommends nothing and says what would."""
    from unet_deploy.runtime.openvino_backend import openvino_cpu_has

    r = _cli("benchmark", "--quick", "--backends", "openvino", "openvino-int8", "openvino-plain",
             "openvino-int8-plain", "--scales", "0.5", "--runs", "2", "--json", "bench.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    report = json.loads((tmp_path / "bench.json").read_text())
    rows = {c["backend"]: c for c in report["cases"]}
    assert set(rows) == {"openvino", "openvino-int8", "openvino-plain", "openvino-int8-plain"}
    assert rows["openvino-int8"]["precision"] == "int8" and rows["openvino"]["parity"]["passed"]
    assert rows["openvino"]["file_mb"] > rows["openvino-int8"]["file_mb"] > 0  # with the .bin
    rest = "bf16" if openvino_cpu_has("bf16") else "fp32"
    assert f"int8, other layers {rest}" in rows["openvino-int8"]["provider"]
    assert rows["openvino-int8-plain"]["precision"] == "int8" and rows["openvino-int8-plain"]["parity"]["passed"]
    assert "OpenVINO's default precision" in rows["openvino-int8-plain"]["provider"]
    assert "no recommendation: quick run" in r.stdout and "unet-deploy benchmark --scales 0.5" in r.stdout


@pytest.mark.precision
def test_export_records_each_runtime_precision_and_auto_runs_the_fastest_verified(fit_on_heldout_cars, tiny,
                                                                                  tmp_path: Path) -> None:
    """A model fitted on cars: the IR's metadata holds this CPU's verdicts; without --precision predict runs the
    fastest verified one and says so; --precision fp32 forces fp32; bf16 masks are the fp32 masks but for near
    ties."""
    import json

    from unet_deploy.runtime.openvino_backend import openvino_cpu_has, read_ir_metadata
    from unet_deploy.runtime.precision import VERDICTS_KEY

    model, cfg, _images = fit_on_heldout_cars(12, 30)
    ckpt = save_checkpoint(tmp_path / "car.pth", model, cfg)
    lines: list[str] = []
    done = run_export(ckpt, ExportOptions(formats=["openvino"], output=tmp_path / "exp", quick_verify=True),
                      log=lambda m: lines.append(str(m)))
    assert done.passed, done.results
    xml = tmp_path / "exp" / "car.xml"
    record = json.loads(read_ir_metadata(xml)[VERDICTS_KEY])
    has_bf16 = openvino_cpu_has("bf16")
    assert record["precisions"]["fp32"]["passed"] and ("bf16" in record["precisions"]) == has_bf16
    auto = load_backend(xml, device="cpu", cache=False)
    if has_bf16:
        assert record["precisions"]["bf16"]["passed"], record
        assert auto.precision == "bf16" and "auto: bf16 verified for this model on this CPU" in auto.provider
        assert any("openvino bf16 on this CPU" in m and "runs bf16 here by default" in m for m in lines)
    else:
        assert auto.precision == "fp32" and "auto: fp32: this CPU has no bf16 kernels" in auto.provider
        assert any("openvino bf16: not checked, this CPU has no bf16 kernels" in m for m in lines)
    r = _cli("predict", "-m", str(xml), str(tiny["images"] / "rgb.jpg"), "-o", str(tmp_path / "auto.png"),
             cwd=tmp_path)
    forced = _cli("predict", "-m", str(xml), "--precision", "fp32", str(tiny["images"] / "rgb.jpg"),
                  "-o", str(tmp_path / "fp32.png"), cwd=tmp_path)
    assert r.returncode == 0 and forced.returncode == 0, r.stderr + forced.stderr
    assert f"openvino ({auto.precision})" in r.stdout and "openvino (fp32)" in forced.stdout
    a, b = np.asarray(Image.open(tmp_path / "auto.png")), np.asarray(Image.open(tmp_path / "fp32.png"))
    assert (a != b).mean() <= 0.002


@pytest.mark.precision
def test_a_failing_reduced_precision_never_blocks_the_ir(tiny, tmp_path: Path, monkeypatch) -> None:
    """bf16 judged by impossible thresholds: the IR is still written (its fp32 check passed), the verdict says
    failed, and auto runs fp32 and says why; on a CPU without bf16 it is not checked at all."""
    from unet_deploy.export import parity
    from unet_deploy.runtime.openvino_backend import openvino_cpu_has

    strict = parity.ParityThresholds(max_rel_err=0.0, min_pixel_agreement=1.0, min_dice=1.0, max_flipped_pixels=0,
                                     precision="bf16")
    real = parity.ParityThresholds.for_precision.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(parity.ParityThresholds, "for_precision",
                        classmethod(lambda cls, p: strict if p == "bf16" else real(cls, p)))
    lines: list[str] = []
    done = run_export(tiny["ckpt"], ExportOptions(formats=["openvino"], output=tmp_path / "exp", quick_verify=True),
                      log=lambda m: lines.append(str(m)))
    assert done.passed and (tmp_path / "exp" / "tiny.xml").is_file()
    auto = load_backend(tmp_path / "exp" / "tiny.xml", device="cpu", cache=False)
    assert auto.precision == "fp32"
    if openvino_cpu_has("bf16"):
        assert done.results["openvino"]["runtime_precisions"]["bf16"]["passed"] is False
        assert "bf16 failed its parity check at export" in auto.provider
        assert any("parity failed" in m and "tiny.xml is written (fp32 passed) and runs fp32 here" in m
                   for m in lines)
