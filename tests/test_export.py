"""Export to TorchScript and ONNX, verified against eager PyTorch; bare-runtime loading; failure paths.

ONNX exports take several seconds each, so every exported file is made once per module by a fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import unet_deploy.model as model_mod
from unet_deploy.checkpoint import load_checkpoint, save_checkpoint
from unet_deploy.cli import app, main
from unet_deploy.config import CONFIG_KEY, DeployConfig, InferenceConfig, ModelConfig
from unet_deploy.errors import UserError
from unet_deploy.export import export_onnx, export_torchscript
from unet_deploy.export.parity import ParityCase, default_cases, parity
from unet_deploy.fileio import sha256_file
from unet_deploy.runtime import load_backend

pytestmark = pytest.mark.export

ROOT = Path(__file__).parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet_deploy", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


def _trained_like(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    """Random weights and non-trivial BatchNorm running statistics, as after some training."""
    torch.manual_seed(seed)
    m = cfg.build()
    m.train()
    with torch.no_grad():
        for bn in (mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.1, 0.3)
        for _ in range(3):
            m(torch.rand(2, cfg.n_channels, 48, 64))
    return m.eval()


def _small_cases(c: int = 3) -> list[ParityCase]:
    g = torch.Generator().manual_seed(3)
    return [ParityCase("odd", torch.rand(1, c, 61, 97, generator=g).numpy()),
            ParityCase("batch-2", torch.rand(2, c, 45, 83, generator=g).numpy())]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two real JPEGs: an ellipse 'car' on a noisy background."""
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(97, 61), (80, 50)]):
        yy, xx = np.mgrid[:h, :w]
        inside = ((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2 < 1
        rgb = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)
        rgb[inside] = (200, 40 + 30 * i, 40)
        Image.fromarray(rgb).save(folder / f"car_{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """This project's checkpoint of a small transposed-conv U-Net at CWD/checkpoints/best.pth."""
    cwd = tmp_path_factory.mktemp("run")
    cfg = DeployConfig(model=ModelConfig(base_channels=8, bilinear=False),
                       inference=InferenceConfig(scale=0.5, mask_values=[0, 1]))
    save_checkpoint(cwd / "checkpoints" / "best.pth", _trained_like(cfg.model), cfg, {"epoch": 3})
    return cwd


@pytest.fixture(scope="module")
def cli_export(trained) -> dict:
    """`unet-deploy export --format all --json` with the default -m and the full cases (959x640)."""
    proc = _cli("export", "--format", "all", "--json", "report.json", cwd=trained)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"cwd": trained, "stdout": proc.stdout, "stderr": proc.stderr,
            "report": json.loads((trained / "report.json").read_text())}


@pytest.fixture(scope="module", params=["bilinear", "transposed"])
def pytorch_unet_export(request, tmp_path_factory, images) -> dict:
    """A Pytorch-UNet MODEL.pth (bare state dict + mask_values) exported by the CLI, with real images."""
    bilinear = request.param == "bilinear"
    cwd = tmp_path_factory.mktemp(request.param)
    model = _trained_like(ModelConfig(base_channels=8, bilinear=bilinear), seed=1)
    state = dict(model.state_dict())
    state["mask_values"] = [0, 1]
    torch.save(state, cwd / "MODEL.pth")
    proc = _cli("export", "-m", "MODEL.pth", "--format", "all", "-o", "out", "--name", "unet",
                "--quick-verify", "--images", str(images), "--json", "r.json", cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"cwd": cwd, "bilinear": bilinear, "model": model, "stdout": proc.stdout,
            "report": json.loads((cwd / "r.json").read_text())}


# --------------------------------------------------------------------------- trained checkpoint, CLI


def test_cli_export_prints_files_table_and_next_command(cli_export) -> None:
    out, cwd = cli_export["stdout"], cli_export["cwd"]
    for name in ("best.onnx", "best.ts"):
        path = cwd / "exported" / name
        assert path.is_file() and path.stat().st_size > 10_000
        assert f"wrote exported/{name} (" in out and " MB, exported in " in out
    # the training data folder is not here, so the hint is one that works when pasted here
    assert "next: unet-deploy verify exported/best.onnx" in out
    assert "next: unet-deploy verify exported/best.ts" in out
    assert "carvana-0.5" in out and "rel err" in out and "1x3x640x959" in out
    assert not [p for p in (cwd / "exported").iterdir() if p.name.startswith(".")]  # no staging left
    assert cli_export["stderr"].strip() == ""  # the exporter's chatter is silenced


def test_cli_export_parity_at_carvana_odd_and_batch_sizes(cli_export) -> None:
    formats = cli_export["report"]["formats"]
    assert set(formats) == {"onnx", "torchscript", "openvino"}  # "all": OpenVINO is installed (the CI extra)
    for entry in formats.values():
        rep = entry["parity"]
        assert rep["passed"] and entry["written"]
        shapes = [tuple(r["shape"]) for r in rep["rows"]]
        assert shapes == [(1, 3, 640, 959), (1, 3, 61, 97), (2, 3, 75, 113)]
        for row in rep["rows"]:
            assert row["rel_err"] <= 1e-5 and row["pixel_agreement"] >= 0.9999 and row["dice"] >= 0.9999


def test_onnx_file_checker_opset_dynamic_dims_and_metadata(cli_export) -> None:
    import onnx

    cwd = cli_export["cwd"]
    path = cwd / "exported" / "best.onnx"
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    opset = {o.domain: o.version for o in proto.opset_import}
    assert (opset.get("", opset.get("ai.onnx")) or 0) >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, False, True, True]
    assert dims[1].dim_value == 3
    assert len({dims[0].dim_param, dims[2].dim_param, dims[3].dim_param}) == 3
    meta = {p.key: p.value for p in proto.metadata_props}
    ckpt = cwd / "checkpoints" / "best.pth"
    assert meta["unet_deploy.classes"] == "2"
    assert json.loads(meta["unet_deploy.mask_values"]) == [0, 1]
    assert float(meta["unet_deploy.scale"]) == 0.5 and float(meta["unet_deploy.threshold"]) == 0.5
    assert json.loads(meta["unet_deploy.preprocessing"])["divide_by"] == 255.0
    assert meta["unet_deploy.architecture"] == "unet-transposed-w8-c3-k2"
    assert meta["unet_deploy.source_sha256"] == sha256_file(ckpt)
    assert {"torch", "onnx", "unet_deploy"} <= set(json.loads(meta["unet_deploy.versions"]))
    embedded = DeployConfig.from_json(meta[CONFIG_KEY])
    assert embedded.source["path"] == str(Path("checkpoints/best.pth"))
    assert embedded.model == ModelConfig(base_channels=8, bilinear=False)
    # the decoder is exported without its skip concatenations (model.export_form): no Concat of feature
    # maps along channels, a convolution pair + Add per decoder block instead
    channel_concats = [n for n in proto.graph.node if n.op_type == "Concat"
                       and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
    assert not channel_concats
    assert sum(n.op_type == "Add" for n in proto.graph.node) >= 4


def test_torchscript_embeds_config(cli_export) -> None:
    cwd = cli_export["cwd"]
    extra = {CONFIG_KEY: ""}
    torch.jit.load(str(cwd / "exported" / "best.ts"), _extra_files=extra)
    cfg = DeployConfig.from_json(extra[CONFIG_KEY])
    assert cfg.model.architecture == "unet-transposed-w8-c3-k2"
    assert cfg.inference.mask_values == [0, 1]
    assert cfg.source["sha256"] == sha256_file(cwd / "checkpoints" / "best.pth")


BARE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import torch

    folder = sys.argv[1]
    x = np.load(folder + "/input.npy")
    extra = {"unet_deploy.json": ""}
    ts = torch.jit.load(folder + "/model.ts", _extra_files=extra)
    with torch.no_grad():
        np.save(folder + "/ts.npy", ts(torch.from_numpy(x)).numpy())
    sess = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
    np.save(folder + "/ort.npy", sess.run(None, {sess.get_inputs()[0].name: x})[0])
    meta = sess.get_modelmeta().custom_metadata_map
    assert sys.modules.get("unet_deploy") is None, "the bare runtimes must not need this package"
    print(json.dumps({"ts_classes": json.loads(extra["unet_deploy.json"])["model"]["n_classes"],
                      "ort_classes": meta["unet_deploy.classes"]}))
""")


def _bare_run(onnx_path: Path, ts_path: Path, x: np.ndarray, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Run both files in a fresh interpreter that cannot import unet_deploy."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_path.read_bytes())
    (folder / "model.ts").write_bytes(ts_path.read_bytes())
    np.save(folder / "input.npy", x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import sys; sys.modules['unet_deploy'] = None\n" + BARE_SCRIPT  # importing it would fail
    proc = subprocess.run([sys.executable, "-c", script, str(folder)], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"ts_classes": 2, "ort_classes": "2"}
    return np.load(folder / "ts.npy"), np.load(folder / "ort.npy")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def test_bare_torch_and_onnxruntime_give_eager_logits(cli_export, tmp_path) -> None:
    cwd = cli_export["cwd"]
    x = torch.rand(2, 3, 61, 97, generator=torch.Generator().manual_seed(5)).numpy()
    exported = cwd / "exported"
    ts, ort_out = _bare_run(exported / "best.onnx", exported / "best.ts", x, tmp_path / "bare")
    eager = load_checkpoint(cwd / "checkpoints" / "best.pth").build_model()
    with torch.no_grad():
        ref = eager(torch.from_numpy(x)).numpy()
    assert ts.shape == ort_out.shape == ref.shape == (2, 2, 61, 97)
    assert _rel(ref, ts) <= 1e-5 and _rel(ref, ort_out) <= 1e-5


def test_verify_uses_recorded_checkpoint_and_writes_json(cli_export) -> None:
    cwd = cli_export["cwd"]
    runner = CliRunner()
    old = Path.cwd()
    os.chdir(cwd)
    try:
        res = runner.invoke(app, ["verify", "exported/best.ts", "--quick", "--json", "verify.json"])
    finally:
        os.chdir(old)
    assert res.exit_code == 0, res.output
    assert "parity PASS" in res.output
    data = json.loads((cwd / "verify.json").read_text())
    assert data["passed"] and [r["shape"][2:] for r in data["rows"]][0] == [160, 239]


# --------------------------------------------------------------------------- Pytorch-UNet state dicts


def test_pytorch_unet_state_dict_exports_and_verifies(pytorch_unet_export) -> None:
    e = pytorch_unet_export
    cwd = e["cwd"]
    for entry in e["report"]["formats"].values():
        rep = entry["parity"]
        assert rep["passed"]
        names = [r["case"] for r in rep["rows"]]
        assert names == ["quick-odd", "odd", "batch-2", "image car_00.jpg", "image car_01.jpg"]
        assert rep["rows"][3]["shape"] == [1, 3, 30, 48]  # 97x61 at the model's scale 0.5
    arch = f"unet-{'bilinear' if e['bilinear'] else 'transposed'}-w8-c3-k2"
    for name in ("unet.onnx", "unet.ts"):
        be = load_backend(cwd / "out" / name, device="cpu")
        assert be.config.model.architecture == arch
        assert be.config.inference.mask_values == [0, 1]
        assert be.config.source["format"] == "pytorch-unet"
        report = parity(e["model"], be, _small_cases())
        assert report.passed, report.summary()


def test_pytorch_unet_exports_load_in_bare_runtimes(pytorch_unet_export, tmp_path) -> None:
    e = pytorch_unet_export
    x = torch.rand(1, 3, 77, 51, generator=torch.Generator().manual_seed(6)).numpy()
    ts, ort_out = _bare_run(e["cwd"] / "out" / "unet.onnx", e["cwd"] / "out" / "unet.ts", x, tmp_path / "b")
    with torch.no_grad():
        ref = e["model"](torch.from_numpy(x)).numpy()
    assert _rel(ref, ts) <= 1e-5 and _rel(ref, ort_out) <= 1e-5


# --------------------------------------------------------------------------- wrong exports are caught


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, DeployConfig]:
    cfg = DeployConfig(model=ModelConfig(base_channels=4, bilinear=False))
    return _trained_like(cfg.model, seed=2), cfg


def _pad_with_python_ints(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Padding whose sizes leave the tensor world as Python ints: tracing bakes them in as constants.

    (The eager ``model._pad_like_eager`` happens to stay dynamic under torch 2.13's tracer, which records
    the size arithmetic; ``int()`` -- like Pytorch-UNet's old ``torch.tensor([...])`` padding -- does not.)
    """
    dy = int(x2.size(2)) - int(x1.size(2))
    dx = int(x2.size(3)) - int(x1.size(3))
    return torch.nn.functional.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_trace_with_baked_in_sizes_fails_parity(small, tmp_path, monkeypatch) -> None:
    model, cfg = small
    good = export_torchscript(model, cfg, tmp_path / "good.ts", example_shape=(1, 3, 61, 97))
    assert parity(model, load_backend(good, device="cpu"), _small_cases()).passed
    monkeypatch.setattr(model_mod, "pad_to", _pad_with_python_ints)
    bad = export_torchscript(model, cfg, tmp_path / "bad.ts", example_shape=(1, 3, 61, 97))
    monkeypatch.undo()
    report = parity(model, load_backend(bad, device="cpu"), _small_cases())
    assert not report.passed
    assert report.rows[0].passed  # the traced size itself still matches: only other sizes reveal it
    assert not report.rows[1].passed and "Sizes of tensors must match" in report.rows[1].error


def test_perturbed_weights_fail_parity_in_both_formats(small, cli_export, tmp_path) -> None:
    import onnx
    from onnx import numpy_helper

    model, cfg = small
    wrong = _trained_like(cfg.model, seed=2)
    with torch.no_grad():
        drifted = cast(torch.nn.Conv2d, wrong.get_submodule("up4.conv.double_conv.3"))
        drifted.weight.mul_(1.001)  # 0.1 %: a small but real drift
    ts = export_torchscript(wrong, cfg, tmp_path / "wrong.ts")
    report = parity(model, load_backend(ts, device="cpu"), _small_cases())
    assert not report.passed and all(r.rel_err > 1e-5 for r in report.rows)

    cwd = cli_export["cwd"]
    proto = onnx.load(str(cwd / "exported" / "best.onnx"))
    init = next(t for t in proto.graph.initializer if "outc" in t.name and len(t.dims) == 4)
    arr = numpy_helper.to_array(init) * np.float32(1.001)
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save_model(proto, str(tmp_path / "wrong.onnx"))
    eager = load_checkpoint(cwd / "checkpoints" / "best.pth").build_model()
    report = parity(eager, load_backend(tmp_path / "wrong.onnx", device="cpu"), _small_cases())
    assert not report.passed and all(r.rel_err > 1e-5 for r in report.rows)
    # ...and the verify command says so with exit code 1
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "wrong.onnx"), "-m",
                                   str(cwd / "checkpoints" / "best.pth"), "--quick"])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_static_onnx_fails_parity_at_other_sizes(small, tmp_path) -> None:
    model, cfg = small
    path = export_onnx(model, cfg, tmp_path / "static.onnx", example_shape=(1, 3, 61, 97), dynamic=False)
    report = parity(model, load_backend(path, device="cpu"), _small_cases())
    assert report.rows[0].passed  # the one baked-in shape works
    assert not report.passed and report.rows[1].error  # batch 2 at 45x83 cannot run


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_cli_failed_parity_exits_1_and_leaves_no_file(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(model_mod, "pad_to", _pad_with_python_ints)
    out = tmp_path / "exp"
    out.mkdir()
    old = out / "best.ts"
    old.write_bytes(b"previous good export")
    runner = CliRunner()
    ckpt = str(trained / "checkpoints" / "best.pth")
    res = runner.invoke(app, ["export", "-m", ckpt, "--format", "torchscript", "-o", str(out),
                              "--quick-verify"])
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and "parity FAILED" in res.output and "batch-2" in res.output
    assert old.read_bytes() == b"previous good export"  # not replaced by the failed export
    assert sorted(p.name for p in out.iterdir()) == ["best.ts"]  # nothing half-written or staged
    res = runner.invoke(app, ["export", "-m", ckpt, "--format", "torchscript", "-o", str(out), "--name", "new",
                              "--quick-verify"])
    assert res.exit_code == 1 and not (out / "new.ts").exists()


def test_atomic_write_keeps_the_original_on_failure(small, tmp_path, monkeypatch) -> None:
    model, cfg = small
    target = tmp_path / "model.ts"
    target.write_bytes(b"original")

    def broken_save(module, path, _extra_files=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_torchscript(model, cfg, target)
    assert target.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]


# --------------------------------------------------------------------------- CLI errors


def _main_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, trained) -> None:
    monkeypatch.chdir(tmp_path)
    assert "unet-deploy train" in _main_error(["export"], capsys)  # no checkpoints/best.pth here
    ckpt = str(trained / "checkpoints" / "best.pth")
    assert "--format" in _main_error(["export", "-m", ckpt, "--format", "tflite"], capsys)
    assert "--opset 12" in _main_error(["export", "-m", ckpt, "--format", "onnx", "--opset", "12"], capsys)
    assert "nope.pth" in _main_error(["export", "-m", "nope.pth"], capsys)
    assert "verify" in _main_error(["export", "-m", "model.onnx"], capsys)
    assert "--images" in _main_error(["export", "-m", ckpt, "--images", "missing_dir"], capsys)
    assert "not found" in _main_error(["verify", "nothing.onnx"], capsys)


def test_verify_without_recorded_checkpoint_needs_m(small, tmp_path, capsys) -> None:
    model, cfg = small
    ts = export_torchscript(model, cfg, tmp_path / "x.ts")  # config records no source checkpoint
    assert "pass -m" in _main_error(["verify", str(ts)], capsys)


def test_default_cases_feed_parity_from_python(small) -> None:
    model, cfg = small
    cases = default_cases(cfg, quick=True)
    report = parity(model, _trained_like(cfg.model, seed=2), cases)
    assert report.passed and len(report.rows) == 3
    with pytest.raises(UserError):
        parity(model, model, [])


def test_no_verify_moves_the_file_unchecked(trained, tmp_path) -> None:
    ckpt = str(trained / "checkpoints" / "best.pth")
    args = ["export", "-m", ckpt, "--format", "torchscript", "-o", str(tmp_path), "--no-verify"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "parity not checked" in res.output and "rel err" not in res.output
    assert load_backend(tmp_path / "best.ts", device="cpu").config.model.base_channels == 8
