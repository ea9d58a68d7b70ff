"""Fast paths: int8 / fp16 ONNX exports, tuned ONNX Runtime sessions, IO binding, eager bf16 /
channels_last / torch.compile, benchmark variants, targets and stage timing, the GPU check script, and the
training OOM message. Tiny models on tiny images; CUDA-only paths are skipped without a GPU."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from unet_deploy import bench
from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.errors import UserError
from unet_deploy.export import calibration_batches, convert_onnx_fp16, export_onnx, quantize_onnx_int8
from unet_deploy.export.parity import (
    INT8_MAX_REL_ERR,
    INT8_MIN_AGREEMENT,
    INT8_MIN_DICE,
    ParityThresholds,
    compare,
    image_cases,
    parity,
)
from unet_deploy.images.image_io import find_pairs, list_images
from unet_deploy.runtime import (
    OrtOptions,
    configure_cudnn,
    cpu_supports_bf16,
    load_backend,
    ort_session_options,
    physical_cores,
)

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (none visible)")

pytestmark = pytest.mark.export


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop(bench.QUICK_ENV, None)
    return env


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unet_deploy", *args], env=_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny U-Net (base 8) trained a few dozen steps on synthetic cars, its fp32 ONNX export, and a
    held-out set."""
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.train import TrainConfig, train

    root = tmp_path_factory.mktemp("fast")
    generate_dataset(root / "train", n=10, width=128, height=96, seed=0)
    generate_dataset(root / "heldout", n=4, width=128, height=96, seed=0 + 7)
    cfg = TrainConfig(data=root / "train", epochs=8, batch_size=2, learning_rate=3e-3, optimizer="adamw",
                      scale=0.5, base_channels=8, validation=20.0, device="cpu", checkpoint_dir=root / "ckpt",
                      progress=False, seed=0, max_steps=40)
    result = train(cfg, log=lambda _m: None)
    ckpt = load_checkpoint(result.last_path)
    onnx_path = export_onnx(ckpt.build_model("cpu"), ckpt.config, root / "model.onnx")
    return {"root": root, "ckpt": result.last_path, "config": ckpt.config, "onnx": onnx_path,
            "train_imgs": root / "train" / "imgs", "heldout": root / "heldout"}


@pytest.fixture(scope="module")
def int8_model(trained: dict) -> Path:
    images = list_images(trained["train_imgs"])[:6]
    return quantize_onnx_int8(trained["onnx"], trained["config"], trained["root"] / "model.int8.onnx",
                              calibration_batches(images, trained["config"]))


# ------------------------------------------------------------------------------------------- int8


def test_int8_export_has_qdq_nodes_and_metadata(int8_model: Path) -> None:
    model = onnx.load(str(int8_model))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "weights should be stored as int8"
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["unet_deploy.precision"] == "int8"
    backend = load_backend(int8_model, device="cpu")
    assert backend.precision == "int8" and backend.name == "ort"
    assert int8_model.stat().st_size < 0.5 * (int8_model.parent / "model.onnx").stat().st_size


def test_int8_up_path_runs_in_int8(int8_model: Path) -> None:
    """No float islands: the up-convolutions became int8 1x1 convolutions + DepthToSpace, and DepthToSpace
    and Pad read the uint8 tensors directly instead of sitting between Dequantize/Quantize pairs."""
    model = onnx.load(str(int8_model))
    producers = {o: n for n in model.graph.node for o in n.output}
    ops = [n.op_type for n in model.graph.node]
    assert "ConvTranspose" not in ops and ops.count("DepthToSpace") == 4
    moved = [n for n in model.graph.node if n.op_type in ("DepthToSpace", "Pad")]
    assert len(moved) == 8
    for node in moved:
        source = producers.get(node.input[0])
        assert source is not None and source.op_type != "DequantizeLinear", node.name


def test_int8_masks_agree_with_fp32_on_heldout_images(trained: dict, int8_model: Path) -> None:
    fp32 = load_backend(trained["onnx"], device="cpu")
    int8 = load_backend(int8_model, device="cpu")
    images = [p.image for p in find_pairs(trained["heldout"] / "imgs", trained["heldout"] / "masks")]
    thresholds = ParityThresholds.for_precision("int8")
    for case in image_cases(images, trained["config"]):
        r = compare(fp32(case.batch), int8(case.batch), thresholds)
        assert r["pixel_agreement"] >= INT8_MIN_AGREEMENT, r
        assert r["passed"], r


def test_int8_thresholds_are_mask_based() -> None:
    t = ParityThresholds.for_precision("int8")
    assert t.max_rel_err == INT8_MAX_REL_ERR == 0.6
    assert (t.min_pixel_agreement, t.min_dice) == (INT8_MIN_AGREEMENT, INT8_MIN_DICE)
    assert "rel err <= 0.6" in t.describe() and "car photos only" in t.describe()
    a = torch.zeros(1, 2, 40, 40)
    a[:, 1, 10:30, 10:30] = 5.0
    b = a * 0.7  # logits 30 % off, same masks: passes for int8, fails for fp32
    assert compare(a, b, t)["passed"] and not compare(a, b, ParityThresholds())["passed"]
    assert not compare(a, a * 0.3, t)["passed"]  # 70 % off: beyond int8's own error
    c = a.clone()
    c[:, 1, 10:30, 10:14] = -5.0  # 80 of 1600 pixels flipped: 95 % agreement fails
    assert not compare(a, c, t)["passed"]


def test_cli_int8_and_fp16_export(trained: dict, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    proc = _cli("export", "-m", str(trained["ckpt"]), "--format", "onnx", "--int8", "--fp16", "--calibration",
                str(trained["train_imgs"]), "--calibration-count", "6", "--quick-verify", "-o", str(out),
                "--name", "tiny", "--json", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("tiny.onnx", "tiny.int8.onnx", "tiny.fp16.onnx"):
        assert (out / name).is_file(), name
    report = json.loads((tmp_path / "r.json").read_text())["formats"]
    assert report["onnx-int8"]["written"] and report["onnx-int8"]["parity"]["passed"]
    assert len(report["onnx-int8"]["calibration_images"]) == 6
    # int8 is checked on the held-out calibration-folder images (real images, not noise)
    assert all(r["case"].startswith("image ") for r in report["onnx-int8"]["parity"]["rows"])
    assert report["onnx-fp16"]["parity"]["thresholds"]["precision"] == "fp16"
    # `evaluate` runs the int8 file like any ONNX model, and int8 keeps the fp32 model's held-out dice
    dice = {}
    for name in ("tiny.onnx", "tiny.int8.onnx"):
        ev = _cli("evaluate", "-m", str(out / name), "--data", str(trained["heldout"]),
                  "--json", str(tmp_path / "ev.json"), "--quiet")
        assert ev.returncode == 0, ev.stderr[-2000:]
        dice[name] = json.loads((tmp_path / "ev.json").read_text())["dice"]
    assert dice["tiny.onnx"] >= 0.9, dice  # the fitted model finds the held-out cars (0.962 measured)
    assert abs(dice["tiny.int8.onnx"] - dice["tiny.onnx"]) <= 0.01, dice  # 0.961 measured


@pytest.mark.parametrize("args, message", [
    (["--int8", "--calibration", "no/such/dir"], "--calibration no/such/dir: no such folder"),
    (["--int8", "--calibration-count", "0"], "--calibration-count 0"),
    (["--int8", "--format", "torchscript"], "--int8 derives from the ONNX or OpenVINO export"),
])
def test_cli_int8_errors_are_one_line(trained: dict, tmp_path: Path, args: list[str], message: str) -> None:
    base = ["export", "-m", str(trained["ckpt"]), "-o", str(tmp_path / "x")]
    if "--format" not in args:
        base += ["--format", "onnx"]
    if "--calibration" not in args:
        base += ["--calibration", str(trained["train_imgs"])]
    proc = _cli(*base, *args)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("*.onnx"))


def test_quantize_without_calibration_images_is_a_user_error(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no calibration images"):
        quantize_onnx_int8(trained["onnx"], trained["config"], tmp_path / "x.onnx", iter(()))
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------------------------------- fp16


def test_fp16_onnx_keeps_fp32_io_and_matches_eager(trained: dict, tmp_path: Path) -> None:
    path = convert_onnx_fp16(trained["onnx"], trained["config"], tmp_path / "m.fp16.onnx")
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    halves = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert len(halves) > 10
    backend = load_backend(path, device="cpu")  # ORT's CPU provider runs it (with inserted casts)
    assert backend.precision == "fp16"
    eager = load_checkpoint(trained["ckpt"]).build_model("cpu")
    cases = image_cases(list_images(trained["train_imgs"])[:2], trained["config"])
    report = parity(eager, backend, cases)
    assert report.passed, report.summary()
    assert 0 < report.worst_rel_err <= 1e-2  # really half precision, within fp16 thresholds


# ----------------------------------------------------------------------------------- ONNX Runtime


def test_ort_session_options_tuned_and_default() -> None:
    import onnxruntime as ort

    tuned = ort_session_options()
    assert tuned.intra_op_num_threads == physical_cores() >= 1
    assert tuned.enable_cpu_mem_arena is False
    assert tuned.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert tuned.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert ort_session_options(threads=1).intra_op_num_threads == 1
    default = ort_session_options(profile="default")
    assert default.enable_cpu_mem_arena is True and default.intra_op_num_threads == 0
    with pytest.raises(UserError, match="profile"):
        ort_session_options(profile="fastest")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc tuning is glibc's (Linux)")
def test_release_large_frees_returns_freed_blocks_to_the_system() -> None:
    """In a fresh process: after release_large_frees(), 2 MiB blocks that were written and freed leave no
    resident memory behind. Without it (checked by hand: 127 of 128 MiB stay) a 16 MiB free first raises
    glibc's mmap threshold, the blocks come from the heap, and the one still in use pins them all."""
    code = textwrap.dedent("""
        import ctypes, ctypes.util, psutil
        from unet_deploy.runtime import release_large_frees
        assert release_large_frees() and release_large_frees()   # in force, idempotent
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
        rss = psutil.Process().memory_info().rss
        blocks = [libc.malloc(2 << 20) for _ in range(64)]
        for b in blocks:
            ctypes.memset(b, 1, 2 << 20)
        held = psutil.Process().memory_info().rss - rss
        for b in blocks[:-1]:  # the last one stays: on the heap it would pin everything below it
            libc.free(b)
        left = psutil.Process().memory_info().rss - rss
        print(held >> 20, left >> 20)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held, left = (int(v) for v in proc.stdout.split())
    assert held >= 120  # the 128 MiB were really resident
    assert left <= 10, f"{left} MiB stayed resident after free (one 2 MiB block is still in use)"


def test_ort_profiles_and_io_binding_give_the_same_logits(trained: dict) -> None:
    x = image_cases(list_images(trained["train_imgs"])[:1], trained["config"])[0].batch
    plain = load_backend(trained["onnx"], device="cpu", io_binding=False)
    default = load_backend(trained["onnx"], device="cpu", profile="default")
    bound = load_backend(trained["onnx"], device="cpu", io_binding=True)
    assert bound.options == OrtOptions(io_binding=True) and plain.options == OrtOptions(io_binding=False)
    assert isinstance(default.options, OrtOptions)
    assert default.options.profile == "default" and default.options.io_binding is False  # off on the CPU
    assert "default options" in default.provider
    ref = plain(x)
    torch.testing.assert_close(default(x), ref, rtol=1e-5, atol=1e-5)
    out = bound(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bound(torch.from_numpy(x)), ref, rtol=1e-5, atol=1e-5)  # torch input too
    two = np.concatenate([x, x[:, :, ::-1].copy()])  # a batch of 2, new shape: buffers follow it
    torch.testing.assert_close(bound(two), plain(two), rtol=1e-5, atol=1e-5)


def test_io_binding_with_fp16_model(trained: dict, tmp_path: Path) -> None:
    path = convert_onnx_fp16(trained["onnx"], trained["config"], tmp_path / "h.onnx")
    x = image_cases(list_images(trained["train_imgs"])[:1], trained["config"])[0].batch
    torch.testing.assert_close(load_backend(path, device="cpu", io_binding=True)(x),
                               load_backend(path, device="cpu", io_binding=False)(x), rtol=1e-3, atol=1e-3)


@needs_cuda
def test_ort_cuda_io_binding_keeps_output_on_gpu(trained: dict) -> None:
    backend = load_backend(trained["onnx"], device="cuda")
    if backend.provider.split(",")[0] != "CUDAExecutionProvider":
        pytest.skip(f"ONNX Runtime has no working CUDA provider here ({backend.provider})")
    x = image_cases(list_images(trained["train_imgs"])[:1], trained["config"])[0].batch
    out = backend(torch.from_numpy(x).cuda())
    assert out.is_cuda
    ref = load_backend(trained["onnx"], device="cpu")(x)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------ eager torch


def test_torch_channels_last_and_bf16(trained: dict) -> None:
    x = image_cases(list_images(trained["train_imgs"])[:1], trained["config"])[0].batch
    ref = load_backend(trained["ckpt"], device="cpu")(x)
    cl = load_backend(trained["ckpt"], device="cpu", channels_last=True)
    torch.testing.assert_close(cl(x), ref, rtol=1e-4, atol=1e-4)
    bf16 = load_backend(trained["ckpt"], device="cpu", precision="bf16", channels_last=True)
    assert bf16.precision == "bf16"
    out = bf16(x)
    assert out.dtype == torch.float32
    r = compare(ref, out, ParityThresholds.for_precision("bf16"))
    assert 1e-4 < r["rel_err"] <= 1e-2, r  # really bfloat16 (~7e-3 measured), not float32
    assert r["passed"], r  # a real image passes the documented bf16 criteria


def test_cpu_supports_bf16_agrees_with_cpuinfo() -> None:
    """Native bfloat16 is the AVX-512 BF16 or AMX BF16 flag (Linux lists them in /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    flags = next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), None)
    if flags is None:
        pytest.skip("no x86 flags in /proc/cpuinfo")
    native = bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.backends.mkldnn.is_available()
    assert cpu_supports_bf16() is native, sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_torch_fp16_on_cpu_is_refused(trained: dict) -> None:
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        load_backend(trained["ckpt"], device="cpu", precision="fp16")


def test_compile_only_for_eager_and_known_modes(trained: dict) -> None:
    with pytest.raises(UserError, match="--compile applies to the eager torch backend"):
        load_backend(trained["onnx"], device="cpu", compile="default")
    with pytest.raises(UserError, match="unknown mode"):
        load_backend(trained["ckpt"], device="cpu", compile="fastest")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile (inductor) needs a C compiler on CPU")
def test_torch_compile_on_cpu_matches_eager(trained: dict) -> None:
    x = image_cases(list_images(trained["train_imgs"])[:1], trained["config"])[0].batch
    ref = load_backend(trained["ckpt"], device="cpu")(x)
    compiled = load_backend(trained["ckpt"], device="cpu", compile="default")
    assert "compiled (default)" in compiled.provider
    torch.testing.assert_close(compiled(x), ref, rtol=1e-3, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_cuda_fp16_channels_last(trained: dict, compile_mode: str | None) -> None:
    x = image_cases(list_images(trained["train_imgs"])[:1], trained["config"])[0].batch
    ref = load_backend(trained["ckpt"], device="cpu")(x)
    fast = load_backend(trained["ckpt"], device="cuda", precision="fp16", channels_last=True,
                        compile=compile_mode)
    first = fast(x)
    second = fast(x[:, :, ::-1].copy())  # CUDA graphs reuse output buffers: the first result must survive
    assert torch.backends.cudnn.benchmark
    assert compare(ref, first.cpu(), ParityThresholds.for_precision("fp16"))["passed"]
    assert not torch.equal(first, second)


def test_configure_cudnn_sets_autotune_and_workspace_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDNN_CONV_WSCAP_DBG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    configure_cudnn(256)
    assert torch.backends.cudnn.benchmark is True
    assert os.environ["CUDNN_CONV_WSCAP_DBG"] == "256"
    configure_cudnn(512)  # an explicit value already in the environment wins
    assert os.environ["CUDNN_CONV_WSCAP_DBG"] == "256"


# ------------------------------------------------------------------------------------- benchmark


def test_parse_and_expand_variants() -> None:
    v = bench.parse_variant("torch-cl-bf16")
    assert (v.backend, v.precision, v.channels_last, v.name) == ("torch", "bf16", True, "torch-bf16-cl")
    assert bench.parse_variant("ort-int8").file_key == "ort-int8"
    assert bench.parse_variant("ort-default").ort_profile == "default"
    assert bench.parse_variant("torch-fp16-cl-cgraph", "cuda").compile == "reduce-overhead"
    assert bench.parse_variant("ort-iob").io_binding is True
    for bad in ("tensorrt", "torchscript-bf16", "torch-int8", "ort-cl", "torch-fast"):
        with pytest.raises(UserError):
            bench.parse_variant(bad)
    with pytest.raises(UserError, match="needs CUDA"):
        bench.parse_variant("torch-fp16", "cpu")
    got = bench.expand_variants(["torch", "torchscript", "ort"], ["fp32", "bf16", "int8"], channels_last=True,
                                device="cpu")
    assert got == ["torch-cl", "torch-bf16-cl", "torchscript", "ort", "ort-int8"]
    assert bench.expand_variants(["torch"], ["fp16"], device="cuda", compile="reduce-overhead") == \
        ["torch-fp16-cgraph"]


def _fake_report(device: str, cases: list[tuple[str, int, float, float]], quick: bool = False) -> dict:
    rows = [{"backend": b, "scale": 0.5 if w == 959 else 1.0, "input": f"{w}x{w * 2 // 3}", "input_width": w,
             "latency": {"p50_ms": ms}, "peak_mib": mib, "parity": {"passed": True}}
            for b, w, ms, mib in cases]
    return {"settings": {"quick": quick, "image_size": list(bench.CARVANA_SIZE), "device": device,
                         "scales": [0.5, 1.0]}, "cases": rows}


def test_targets_are_judged_from_the_measurements() -> None:
    report = _fake_report("cpu", [("torch", 959, 5000, 1000), ("ort", 959, 2000, 400), ("ort-int8", 959, 700, 300),
                                  ("torch", 1918, 20000, 4000), ("ort", 1918, 9000, 2500)])
    goals = {g["target"]: g for g in bench.targets(report)}
    assert goals["onnxruntime >= 2.5x eager fp32 at 959x639"]["met"] is True  # 2.5x exactly
    assert goals["onnxruntime int8 >= 6.5x eager fp32 at 959x639"]["met"] is True  # 7.1x
    assert goals["onnxruntime peak RSS <= 0.5x eager at 959x639"]["met"] is True
    assert goals["onnxruntime peak RSS <= 0.5x eager at 1918x1278"]["met"] is False  # 0.62x
    assert bench.targets({**report, "settings": {**report["settings"], "quick": True}}) == []
    gpu = bench.targets(_fake_report("cuda", [("torch", 959, 9.0, 1500), ("torch-fp16-cl", 959, 1.5, 400)]))
    assert [g["met"] for g in gpu] == [True, True]  # 1.5 ms <= 1.6 ms; 400/1500 = 0.27x <= 0.3x
    pairs = bench.before_after(_fake_report("cpu", [("ort-default", 959, 2500, 800), ("ort", 959, 2000, 400)]))
    assert len(pairs) == 1 and pairs[0]["speedup"] == pytest.approx(1.25) and pairs[0]["memory_ratio"] == 0.5


def test_benchmark_cli_runs_variants_and_stages(tmp_path: Path) -> None:
    proc = _cli("benchmark", "--quick", "--device", "cpu", "--backends", "torch", "ort-default", "ort",
                "--precision", "fp32", "bf16", "int8", "--channels-last", "--scales", "0.5", "--runs", "1",
                "--warmup", "0", "--base-channels", "4", "--threads", "1", "--stages", "2",
                "--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "R.md"),
                "--merge", str(ROOT / "benchmarks" / "int8-eval.json"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r.json").read_text())
    names = [c["backend"] for c in report["cases"]]
    assert names == ["torch-cl", "torch-bf16-cl", "ort-default", "ort-int8-default", "ort", "ort-int8"]
    by = {c["backend"]: c for c in report["cases"]}
    assert by["torch-bf16-cl"]["precision"] == "bf16" and by["ort-int8"]["precision"] == "int8"
    for name in ("torch-cl", "ort-default", "ort"):  # fp32: the product's criteria, literally
        par = by[name]["parity"]
        assert par["passed"] is True and par["max_rel_err"] <= 1e-5, (name, par)
    assert by["ort"]["runtime"] == "ort" and by["torch-cl"]["runtime"] == "torch"
    st = report["stages"]
    assert st["images"] == 2 and set(st["stage_ms"]) == {"decode", "preprocess", "model", "postprocess", "write"}
    assert st["pipeline_images_per_s"] > 0 and st["slowest_ratio"] > 0
    md = (tmp_path / "R.md").read_text()
    assert "End-to-end prediction stages" in md and "int8 accuracy on a held-out set" in md
    assert "onnxruntime int8" in md and "torch (eager) bf16 cl" in md
    # render again from the JSON alone: same numbers, nothing re-run
    again = _cli("benchmark", "--from-json", str(tmp_path / "r.json"), "--merge",
                 str(ROOT / "benchmarks" / "int8-eval.json"), "--markdown", str(tmp_path / "R2.md"), "--quiet")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "R2.md").read_text() == md
    wrong = _cli("benchmark", "--from-json", str(ROOT / "benchmarks" / "int8-eval.json"))
    assert wrong.returncode != 0 and "not a benchmark result" in wrong.stderr


def test_measure_stages_with_crf(trained: dict, tmp_path: Path) -> None:
    pytest.importorskip("pydensecrf.densecrf")
    images = list_images(trained["train_imgs"])[:2]
    st = bench.measure_stages(trained["onnx"], "ort", "cpu", images, tmp_path / "out", crf=True, threads=1,
                              crf_workers=1)
    assert st["crf"] and "crf" in st["stage_ms"] and st["slowest_stage"] in st["stage_ms"]
    assert len(list((tmp_path / "out" / "pipeline").glob("*_OUT.png"))) == 2


# ----------------------------------------------------------------------------- GPU check script


def test_gpu_check_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke(tmp_path: Path) -> None:
    env = {**_env(), "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_QUICK": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "check")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "check"
    report = json.loads((out / "bench.json").read_text())
    assert {c["backend"] for c in report["cases"]} >= {"torch", "torch-bf16-cl", "ort", "ort-int8"}
    assert {c["scale"] for c in report["cases"]} == {0.5, 1.0}
    assert json.loads((out / "train.json").read_text())["images_per_s"] > 0
    text = (out / "RESULTS.md").read_text()
    assert "Training throughput" in text and "onnxruntime int8" in text
    assert "| torch (eager) |" in proc.stdout  # the whole table is printed


# ------------------------------------------------------------------------------------------ training


def test_training_out_of_memory_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.model import UNet
    from unet_deploy.train import TrainConfig, train

    generate_dataset(tmp_path / "d", n=4, width=64, height=48, seed=0)

    def boom(self: UNet, x: torch.Tensor) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(UNet, "forward", boom)
    cfg = TrainConfig(data=tmp_path / "d", epochs=1, batch_size=2, scale=1.0, base_channels=4, device="cpu",
                      checkpoint_dir=tmp_path / "c", progress=False, validation=25.0)
    with pytest.raises(UserError) as err:
        train(cfg, log=lambda _m: None)
    msg = str(err.value)
    assert "out of GPU memory" in msg and "--scale" in msg and "--batch-size" in msg and "--amp" in msg
    assert "\n" not in msg
