"""Memory limits: the cgroup/rlimit reader, the calibrated estimates, refusals before a run, and
out-of-memory failures (MemoryError, torch, ONNX Runtime) as one line without a traceback."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_deploy.checkpoint import save_checkpoint
from unet_deploy.cli import main
from unet_deploy.config import DeployConfig, ModelConfig
from unet_deploy.errors import UserError
from unet_deploy.runtime import Backend, resources
from unet_deploy.runtime.resources import (
    available_memory,
    cgroup_memory_left,
    check_train_memory,
    estimate_inference_bytes,
    out_of_memory_kind,
)

MIB = 1 << 20
GIB = 1 << 30


def _limit_address_space(gib: int):  # noqa: ANN202 - a preexec_fn
    """Children of these tests can never take more than ``gib`` GiB, whatever goes wrong in them."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (gib * GIB, gib * GIB))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------ cgroup reader
def test_cgroup_v2_limit_minus_usage_and_the_tightest_parent(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/user.slice/app.scope\n")
    root = tmp_path / "fs"
    app = root / "user.slice" / "app.scope"
    _write(app / "memory.max", "1073741824\n")
    _write(app / "memory.current", str(256 * MIB))
    _write(app / "memory.stat", f"anon 1\ninactive_file {64 * MIB}\nactive_file 5\n")
    assert cgroup_memory_left(proc, root) == GIB - (256 - 64) * MIB  # page cache is reclaimable
    _write(root / "user.slice" / "memory.max", str(512 * MIB))
    _write(root / "user.slice" / "memory.current", str(400 * MIB))
    assert cgroup_memory_left(proc, root) == 112 * MIB


def test_cgroup_v2_max_means_no_limit(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/a\n")
    _write(tmp_path / "fs" / "a" / "memory.max", "max\n")
    _write(tmp_path / "fs" / "a" / "memory.current", str(GIB))
    assert cgroup_memory_left(proc, tmp_path / "fs") is None


def test_cgroup_v1_memory_controller_and_unlimited(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "5:cpu,cpuacct:/docker/x\n4:memory:/docker/x\n0::/\n")
    box = tmp_path / "fs" / "memory" / "docker" / "x"
    _write(box / "memory.limit_in_bytes", str(2 * GIB))
    _write(box / "memory.usage_in_bytes", str(GIB + 100 * MIB))
    _write(box / "memory.stat", f"cache 1\ntotal_inactive_file {100 * MIB}\n")
    assert cgroup_memory_left(proc, tmp_path / "fs") == GIB
    _write(box / "memory.limit_in_bytes", "9223372036854771712\n")  # v1's "unlimited"
    assert cgroup_memory_left(proc, tmp_path / "fs") is None


def test_cgroup_path_outside_the_namespace_is_read_at_the_mount(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/../../host/path\n")
    _write(tmp_path / "fs" / "memory.max", str(300 * MIB))
    _write(tmp_path / "fs" / "memory.current", str(100 * MIB))
    assert cgroup_memory_left(proc, tmp_path / "fs") == 200 * MIB
    assert cgroup_memory_left(tmp_path / "missing", tmp_path / "fs") is None


def test_available_memory_is_the_least_of_system_cgroup_and_rlimit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "cgroup_memory_left", lambda: 123 * MIB)
    assert available_memory() == (123 * MIB, "cgroup memory limit")
    code = ("import psutil, resource; from unet_deploy.runtime.resources import available_memory; "
            "vms = psutil.Process().memory_info().vms; "
            "resource.setrlimit(resource.RLIMIT_AS, (vms + 300 * 2**20, resource.RLIM_INFINITY)); "
            "print(*available_memory(), sep='|')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    have, source = out.stdout.strip().split("|")
    assert source == "RLIMIT_AS, ulimit -v" and 0 < int(have) <= 300 * MIB


def test_importing_resources_does_not_import_torch() -> None:
    code = "import sys, unet_deploy.runtime.resources; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------- the estimate
_MEASURE = r"""
import sys, numpy as np
from unet_deploy.runtime import load_backend
from unet_deploy.bench import peak_rss_bytes, reset_peak_rss
backend = load_backend(sys.argv[1], device="cpu", threads=2 if sys.argv[1].endswith(".onnx") else None)
backend(np.zeros((1, 3, 64, 64), np.float32))  # warm-up: the runtime's one-time allocations
x = np.zeros((1, 3, int(sys.argv[2]), int(sys.argv[3])), np.float32)
if not reset_peak_rss():
    sys.exit(3)
base = peak_rss_bytes()
backend(x)
print(peak_rss_bytes() - base + x.nbytes)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("runtime", "low", "high"), [("torch", 0.75, 1.5), ("ort", 0.9, 1.3)])
def test_estimate_is_within_its_stated_factor_of_the_measured_peak(runtime: str, low: float, high: float,
                                                                   tmp_path: Path) -> None:
    """The docstring's calibration, re-measured at sizes where activations dominate: ONNX Runtime is
    steady; eager torch's peak moves with glibc's mmap threshold from one process to the next (by about
    50 MiB: at 480x320 that alone is a factor of 1.5), hence its wider band."""
    cfg = DeployConfig(model=ModelConfig(base_channels=16))
    path = save_checkpoint(tmp_path / "w16.pth", cfg.model.build().eval(), cfg)
    if runtime == "ort":
        from unet_deploy.export import export_onnx

        path = export_onnx(cfg.model.build().eval(), cfg, tmp_path / "w16.onnx")
    for h, w in ((640, 960), (1280, 1920)):  # where activations dominate the fixed overhead
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(h), str(w)], capture_output=True,
                             text=True, timeout=300, preexec_fn=_limit_address_space(12))
        if run.returncode == 3:
            pytest.skip("the kernel cannot reset the peak RSS (/proc/self/clear_refs)")
        assert run.returncode == 0, run.stderr[-2000:]
        measured = int(run.stdout.split()[-1])
        estimate = estimate_inference_bytes(cfg.model, h, w, 1, runtime)
        assert low <= estimate / measured <= high, (h, w, estimate / MIB, measured / MIB)


def test_estimate_scales_with_pixels_batch_width_and_runtime() -> None:
    small, big = ModelConfig(base_channels=16), ModelConfig(base_channels=64)
    one = estimate_inference_bytes(small, 640, 960, 1, "ort")
    assert estimate_inference_bytes(small, 1280, 1920, 1, "ort") == pytest.approx(4 * one, rel=0.01)
    assert estimate_inference_bytes(small, 640, 960, 2, "ort") == pytest.approx(2 * one, rel=0.01)
    assert estimate_inference_bytes(big, 640, 960, 1, "ort") > 3.5 * one
    assert estimate_inference_bytes(small, 640, 960, 1, "torch") > 2 * one
    assert estimate_inference_bytes(small, 640, 960, 1, "ort", "int8") < 0.5 * one


# ----------------------------------------------------------------------------- refusals before a run
def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_synth_with_a_huge_size_is_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "data"
    run = subprocess.run([sys.executable, "-m", "unet_deploy", "synth", "--out", str(out), "--n", "1",
                          "--width", "100000", "--height", "100000"], capture_output=True, text=True,
                         timeout=120, preexec_fn=_limit_address_space(4))
    assert run.returncode != 0
    line = _one_error_line(run.stderr)
    assert "--width 100000 --height 100000" in line and "745.1 GiB" in line and "--width/--height" in line
    assert not (out / "imgs").exists()  # refused before anything was made


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("oom")
    cfg = DeployConfig(model=ModelConfig(base_channels=8))
    model = save_checkpoint(d / "w8.pth", cfg.model.build().eval(), cfg)
    for name in ("car.png", "car2.png"):
        pixels = np.random.default_rng(len(name)).integers(0, 255, (160, 240, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(d / name)
    return model, d / "car.png"


def main_exit(argv: list[str]) -> None:
    """Run the CLI in-process and require exit 0."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (0, None)


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = Backend.run  # every model call, whole image or tile, ends here

    def counting(self: Backend, batch: np.ndarray) -> object:
        calls.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(Backend, "run", counting)
    return calls


def test_predict_at_scale_4_tiles_when_the_whole_image_cannot_fit(
        tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """100 MiB: the whole 960x640 input does not fit, so predict tiles it (one notice line) and writes the
    mask; 4 GiB: it runs whole, in one call."""
    model, image = tiny_model
    monkeypatch.setattr(resources, "available_memory", lambda: (100 * MIB, "test limit"))
    calls = _count_runs(monkeypatch)
    main_exit(["predict", "-m", str(model), "-s", "4", "-o", str(tmp_path / "m.png"), str(image)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice: ") and str(image) in err[0], err
    needed = estimate_inference_bytes(ModelConfig(base_channels=8), 640, 960, 1, "torch", source_pixels=240 * 160)
    assert f"needs about {resources.format_bytes(needed)}" in err[0] and "in tiles of at most" in err[0]
    assert len(calls) > 1 and Image.open(tmp_path / "m.png").size == (240, 160)

    monkeypatch.setattr(resources, "available_memory", lambda: (4 * GIB, "test limit"))
    calls.clear()
    main_exit(["predict", "-m", str(model), "-s", "4", "-o", str(tmp_path / "m2.png"), str(image)])
    assert calls == [1] and (tmp_path / "m2.png").exists()


def test_predict_is_refused_before_the_model_runs_when_not_even_small_tiles_fit(
        tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    model, image = tiny_model
    monkeypatch.setattr(resources, "available_memory", lambda: (1 * MIB, "test limit"))
    calls = _count_runs(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "-m", str(model), "-s", "4", "-o", str(tmp_path / "m.png"), str(image)])
    assert exit_.value.code == 2 and calls == []
    line = _one_error_line(capsys.readouterr().err)
    assert "960x640 px (240x160 at scale 4)" in line and "(estimate) but only 1 MiB" in line
    assert "not even 64 px tiles fit" in line
    assert not (tmp_path / "m.png").exists()


def test_training_batch_that_cannot_fit_is_refused(tiny_model: tuple[Path, Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, image = tiny_model
    monkeypatch.setattr(resources, "available_memory", lambda: (200 * MIB, "test limit"))
    check_train_memory(ModelConfig(base_channels=8), image, 0.5, 2, 10_000)  # 120x80: fits
    with pytest.raises(UserError, match=r"training on batches of 8 image\(s\) of 960x640 px \(scale 4\) needs "
                                        r"about .* -b/--batch-size or -s/--scale"):
        check_train_memory(ModelConfig(base_channels=8), image, 4, 8, 10_000)
    check_train_memory(ModelConfig(base_channels=8), image, 4, 8, 10_000, device="cuda:0")  # GPU: not host RAM


def test_train_refuses_a_step_that_cannot_fit_before_the_first_epoch(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.train import TrainConfig, train

    generate_dataset(tmp_path / "data", n=4, width=64, height=64)
    monkeypatch.setattr(resources, "available_memory", lambda: (8 * MIB, "test limit"))
    cfg = TrainConfig(data=tmp_path / "data", epochs=1, batch_size=2, scale=1.0, base_channels=8, device="cpu",
                      validation=25.0, checkpoint_dir=tmp_path / "ck", progress=False)
    with pytest.raises(UserError, match=r"training on batches of 2 image\(s\) of 64x64 px \(scale 1\) needs about "
                                        r"\d+ MiB \(estimate\) but only 8 MiB"):
        train(cfg, log=lambda _: None)
    assert not (tmp_path / "ck" / "last.pth").exists()


# ------------------------------------------------------------------------------ out-of-memory errors
def _ort_bad_alloc() -> Exception:
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    return RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                            "running Conv node. Name:'/inc/double_conv/double_conv.0/Conv' Status Message: "
                            "std::bad_alloc")


def test_out_of_memory_kinds_are_recognised_and_others_are_not() -> None:
    import torch

    assert "ONNX Runtime ran out of memory (bad_alloc)" in (out_of_memory_kind(_ort_bad_alloc()) or "")
    arena = RuntimeError("bfc_arena.cc:376 Failed to allocate memory for requested buffer of size 1234")
    assert (out_of_memory_kind(arena) or "").startswith("torch ran out of memory (Failed to allocate memory")
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert (out_of_memory_kind(cuda) or "").startswith("the GPU ran out of memory")
    assert out_of_memory_kind(MemoryError()) == "out of memory (MemoryError)"
    assert out_of_memory_kind(RuntimeError("shape mismatch")) is None
    assert out_of_memory_kind(ValueError("out of memory")) is None  # only runtime failures are read


@pytest.mark.parametrize("error", [MemoryError, _ort_bad_alloc])
def test_main_prints_one_line_for_out_of_memory_in_a_command(
        error: type[Exception], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import unet_deploy.images.synth

    def fail(*_: object, **__: object) -> None:
        raise error()

    monkeypatch.setattr(unet_deploy.images.synth, "generate_dataset", fail)
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--out", str(tmp_path / "d"), "--width", "64", "--height", "64"])
    assert exit_.value.code == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "out of memory" in line and "use a smaller --width/--height" in line


def test_main_still_raises_bugs_that_are_not_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import unet_deploy.images.synth

    def fail(*_: object, **__: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(unet_deploy.images.synth, "generate_dataset", fail)
    with pytest.raises(ZeroDivisionError):
        main(["synth", "--out", str(tmp_path / "d")])


def test_ort_bad_alloc_during_predict_is_one_line_for_the_run(
        tiny_model: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    model, image = tiny_model
    calls: list[int] = []

    def bad_alloc(self: Backend, batch: np.ndarray) -> None:
        calls.append(len(batch))
        raise _ort_bad_alloc()

    monkeypatch.setattr(Backend, "native", bad_alloc)
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "-m", str(model), "-n", str(image), str(image.with_name("car2.png"))])
    assert exit_.value.code == 1 and calls == [1]  # the run stops at the first failure
    line = _one_error_line(capsys.readouterr().err)
    assert "running the model on 1 image(s) of 120x80 px: ONNX Runtime ran out of memory (bad_alloc)" in line
    assert "lower -s/--scale or -b/--batch-size" in line and "inference failed" not in line
