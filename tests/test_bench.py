"""`unet-deploy benchmark` and unet_deploy.bench: real quick-mode runs (tiny width, small image), checked
for shape and sanity -- never for speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from unet_deploy import bench
from unet_deploy.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "torchscript", "ort")
NAMES = {"torch": "torch (eager)", "torchscript": "torchscript", "ort": "onnxruntime"}

pytestmark = pytest.mark.export


def _cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env.pop(bench.QUICK_ENV, None)
    return subprocess.run([sys.executable, "-m", "unet_deploy", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One quick CLI run over every backend x both scales, writing JSON, plot and markdown."""
    out = tmp_path_factory.mktemp("bench-cli")
    proc = _cli("benchmark", "--quick", "--backends", "torch", "torchscript", "ort", "--scales", "0.5", "1.0",
                "--device", "cpu", "--runs", "2", "--warmup", "0", "--base-channels", "4", "--threads", "1",
                "--roofline", "--json", str(out / "r.json"),
                "--plot", str(out / "r.png"), "--markdown", str(out / "RESULTS.md"), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"proc": proc, "dir": out, "report": json.loads((out / "r.json").read_text())}


def _assert_fp32_parity(par: dict, pixels: int) -> None:
    """The product's fp32 criteria, as literals (export and verify apply the same): relative logit error
    <= 1e-5, and masks within 99.99 % agreement and 0.9999 dice, or at most 2 flipped pixels."""
    assert par["passed"] is True, par
    assert par["max_rel_err"] <= 1e-5, par
    flipped = round((1 - par["pixel_agreement"]) * pixels)
    assert flipped <= 2 or (par["pixel_agreement"] >= 0.9999 and par["dice"] >= 0.9999), par


def test_json_has_every_backend_and_scale_with_sane_numbers(cli_run: dict) -> None:
    report = cli_run["report"]
    assert report["schema"] == bench.SCHEMA
    assert report["settings"]["quick"] is True
    assert report["settings"]["backends"] == list(BACKENDS)
    assert report["settings"]["scales"] == [0.5, 1.0]
    cases = report["cases"]
    assert sorted((c["backend"], c["scale"]) for c in cases) == sorted(
        (b, s) for b in BACKENDS for s in (0.5, 1.0))
    width, height = bench.QUICK_SIZE
    for c in cases:
        lat = c["latency"]
        assert lat["runs"] == 2 and len(lat["times_ms"]) == 2
        assert all(t > 0 for t in lat["times_ms"])
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["max_ms"]
        assert lat["images_per_s"] == pytest.approx(1000 / lat["p50_ms"])  # what the img/s column shows
        assert lat["images_per_s_mean"] == pytest.approx(1000 / lat["mean_ms"])
        assert c["warmup_calls"] == 0  # --warmup 0: no untimed call
        assert c["unsteady"] is (lat["p90_ms"] > 1.25 * lat["p50_ms"])
        assert c["peak_mib"] > 0 and math.isfinite(c["peak_mib"]), c
        assert c["memory_method"].startswith("peak RSS growth")
        assert c["file_mb"] > 0
        assert c["precision"] == "fp32"
        assert (c["input_width"], c["input_height"]) == (int(width * c["scale"]), int(height * c["scale"]))
        assert c["input"] == f"{c['input_width']}x{c['input_height']}"
        par = c["parity"]
        if c["backend"] == "torch":
            assert par["reference"] and par["max_abs_err"] == 0 and par["pixel_agreement"] == 1
        else:
            assert not par["reference"]
            _assert_fp32_parity(par, c["input_width"] * c["input_height"])
    assert {c["provider"] for c in cases if c["backend"] == "ort"} == {"CPUExecutionProvider"}
    speed = report["speedups"]
    assert len(speed) == len(cases)
    assert all(r["speedup_p50"] > 0 for r in speed)
    assert all(r["speedup_p50"] == 1 for r in speed if r["backend"] == "torch")
    flags = report["reliability"]
    reading = report["cpu_free"]  # how many CPUs other processes left free over the run, from /proc/stat
    assert flags["cores"] == reading["usable"] and 0 <= reading["free"] <= report["machine"]["cores_usable"] + 0.5
    assert flags["busy"] is (reading["free"] < reading["usable"] - 0.5)
    assert flags["reliable"] is (not flags["busy"] and not any(c["unsteady"] for c in cases))
    assert all(r["unreliable"] is (flags["busy"] or any(c["unsteady"] for c in cases if c["scale"] == r["scale"]
                                                        and c["backend"] in ("torch", r["backend"])))
               for r in speed)


def test_json_has_machine_facts(cli_run: dict) -> None:
    m = cli_run["report"]["machine"]
    assert m["cpu"] and m["cores_usable"] >= 1 and m["cores_logical"] >= 1 and m["ram_gib"] > 0
    for lib in ("torch", "numpy", "python", "onnxruntime", "onnx"):
        assert m["versions"][lib]
    assert "CPUExecutionProvider" in m["ort_providers"]
    assert m["gpu"] is None  # --device cpu
    assert cli_run["report"]["model"]["architecture"] == "unet-transposed-w4-c3-k2"
    assert cli_run["report"]["settings"]["threads"] == 1
    assert cli_run["report"]["command"].startswith("unet-deploy benchmark --quick")
    command = cli_run["report"]["command"]
    assert "--base-channels 4" in command and "--threads 1" in command
    assert command.endswith(f"--json {cli_run['dir'] / 'r.json'} --plot {cli_run['dir'] / 'r.png'} "
                            f"--markdown {cli_run['dir'] / 'RESULTS.md'}")


def test_plot_is_a_real_png(cli_run: dict) -> None:
    path = cli_run["dir"] / "r.png"
    assert path.stat().st_size > 10_000
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= 800 and img.height >= 300
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # bars and text, not a blank canvas
    assert not list(cli_run["dir"].glob(".*.tmp"))  # atomic writes leave no temporaries


def test_table_has_a_row_per_backend_and_scale(cli_run: dict) -> None:
    out = cli_run["proc"].stdout
    header = next(line for line in out.splitlines() if "backend" in line and "parity vs eager" in line)
    for col in ("precision", "scale", "input", "p50 ms", "p90 ms", "img/s", "peak MiB", "file MB"):
        assert col in header
    for c in cli_run["report"]["cases"]:
        rows = [line for line in out.splitlines()
                if NAMES[c["backend"]] in line and f" {c['scale']:g} " in line and c["input"] in line]
        assert len(rows) == 1, (c["backend"], c["scale"], out)
        assert f"{c['latency']['p50_ms']:.1f}" in rows[0]
    assert "speed-up vs eager" in out
    busy = cli_run["report"]["reliability"]["busy"]  # a real run: either way
    assert ("? machine busy (other processes left " in out) is busy
    assert "target:" not in out


def test_markdown_is_labelled_and_reproducible(cli_run: dict) -> None:
    text = (cli_run["dir"] / "RESULTS.md").read_text()
    assert "**Quick mode**" in text
    assert "| backend | precision | scale | input | parity vs eager | p50 ms | p90 ms | img/s (p50) | peak MiB | " \
           "file MB |" in text
    assert "### Targets" not in text  # the project's targets only with --targets
    header = text.index("| backend | precision | scale | input | parity vs eager")
    latency_table = text[header:text.index("\n\n", header)].splitlines()[2:]  # below the header and |---|
    assert len(latency_table) == len(cli_run["report"]["cases"])
    assert all(" fp32 " in row for row in latency_table)
    assert cli_run["report"]["command"] in text
    assert bench.FULL_RUN in text
    assert "### Ratios against eager PyTorch fp32 (same run)" in text


def test_roofline_reports_work_throughput_and_floors(cli_run: dict) -> None:
    report = cli_run["report"]
    roof = report["roofline"]
    # ONNX Runtime's u8 x s8 convolution does 2-4x the work per cycle of its fp32 one (VNNI on AVX-512: 804
    # vs 212 in benchmarks/RESULTS.md; AVX2 vpmaddubsw: 85 vs 38 on a loaded 2-core AMD EPYC), best of 10
    best = roof["peaks"]["layer"]["best"]  # the best rate any installed runtime reaches on one layer
    assert best["int8"]["gops"] > best["fp32"]["gops"] > 0, best
    assert {e["input"] for e in roof["sizes"]} == {c["input"] for c in report["cases"]}
    for entry in roof["sizes"]:
        for c in (c for c in report["cases"] if c["input"] == entry["input"]):
            achieved = entry["cases"][c["backend"]]["gflops"]
            assert achieved == pytest.approx(entry["gflop"] / (c["latency"]["p50_ms"] / 1e3))
        assert entry["ceiling_speedup"]["int8"] > 0 and entry["ceiling_speedup"]["fp32"] > 0
    assert "--roofline" in report["command"]
    assert "roofline" in cli_run["proc"].stdout
    assert "### Compute ceiling (roofline)" in (cli_run["dir"] / "RESULTS.md").read_text()


def test_checkpoint_without_eager_backend_still_gets_parity(tmp_path: Path) -> None:
    """-m with only torchscript: an untimed eager call supplies the parity reference."""
    from unet_deploy.checkpoint import save_checkpoint
    from unet_deploy.config import DeployConfig, ModelConfig

    torch.manual_seed(1)
    cfg = DeployConfig(model=ModelConfig(base_channels=4, bilinear=True))
    ckpt = save_checkpoint(tmp_path / "tiny.pth", cfg.model.build(), cfg)
    settings = bench.BenchSettings(checkpoint=ckpt, backends=("torchscript",), scales=(0.5,), quick=True,
                                   runs=1, warmup=0, device="cpu")
    report = bench.run_benchmark(settings, cache_dir=tmp_path / "cache")
    (case,) = report["cases"]
    assert case["backend"] == "torchscript" and case["scale"] == 0.5
    assert not case["parity"]["reference"]
    _assert_fp32_parity(case["parity"], case["input_width"] * case["input_height"])
    assert case["peak_mib"] > 0 and case["latency"]["p50_ms"] > 0
    assert report["model"]["architecture"] == "unet-bilinear-w4-c3-k2"
    assert report["speedups"] == []  # no eager row to compare with
    assert list((tmp_path / "cache").glob("ckpt-*/model.ts"))  # exports kept for the next run


def test_parity_and_latency_stats() -> None:
    a = np.zeros((1, 2, 4, 4), np.float32)
    a[:, 1, :2] = 4.0
    b = a.copy()
    b[0, 0, 0, 0] = 5.0  # flips one pixel of 16, error 5 / max 4
    p = bench.parity(a, b)
    assert p["max_abs_err"] == 5.0 and p["max_rel_err"] == 1.25 and p["pixel_agreement"] == 15 / 16
    assert p["passed"] is False  # the same thresholds export verifies with
    assert bench.parity(a, a + 1e-7)["passed"] is True
    with pytest.raises(ValueError, match="shapes differ"):
        bench.parity(a, a[:, :, :2])
    s = bench.latency_stats([0.01, 0.01, 0.04])  # one slow run: the mean (20 ms) is not the median
    assert s["p50_ms"] == pytest.approx(10.0) and s["mean_ms"] == pytest.approx(20.0)
    assert s["images_per_s"] == pytest.approx(100.0)  # agrees with p50
    assert s["images_per_s_mean"] == pytest.approx(50.0) and s["runs"] == 3
    assert bench.latency_stats([0.01, 0.01, 0.04], batch=4)["images_per_s"] == pytest.approx(400.0)


def test_settings_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bench.QUICK_ENV, raising=False)
    full = bench.resolve_settings(bench.BenchSettings(device="cpu"))
    assert (full.base_channels, full.image_size, full.warmup, full.runs) == (64, (1918, 1280), 1, 3)
    # every installed runtime: OpenVINO is an extra (installed in CI)
    assert full.backends == bench.default_backends() == ("torch", "torchscript", "ort", "openvino")
    assert full.scales == (0.5, 1.0)
    monkeypatch.setenv(bench.QUICK_ENV, "1")
    quick = bench.resolve_settings(bench.BenchSettings(device="cpu", backends=("ort", "torch")))
    assert quick.quick and quick.base_channels == 8 and quick.image_size == bench.QUICK_SIZE
    assert quick.backends == ("torch", "ort")  # table order
    for bad, flag in [(dict(backends=("tensorrt",)), "--backends tensorrt"),
                      (dict(scales=(0,)), "--scales 0"),
                      (dict(scales=(0.01,)), "--scales 0.01"), (dict(runs=0), "--runs 0"),
                      (dict(warmup=-1), "--warmup -1"), (dict(device="tpu"), "--device tpu"),
                      (dict(checkpoint=Path("m.onnx")), "-m m.onnx")]:
        with pytest.raises(UserError, match=flag.replace(".", r"\.")):
            bench.resolve_settings(bench.BenchSettings(**cast(dict[str, Any], bad)))


@pytest.mark.parametrize("args, expected", [
    (["--backends", "tensorrt"], "--backends tensorrt: unknown backend"),
    (["--backends", "torch", "tensorrt"], "tensorrt: not a backend"),
    (["--scales", "0.5", "abc"], "abc: not a backend (torch, torchscript, ort, openvino), precision"),
    (["--scales", "0"], "--scales 0: a scale must be in (0, 4]"),
    (["--scales", "x"], "--scales x: not a number"),
    (["--plot", "out.jpg"], "--plot out.jpg: the plot is a PNG"),
    (["-m", "missing.pth"], "-m missing.pth: checkpoint not found"),
    (["--runs", "0"], "--runs 0: time at least 1 run"),
])
def test_cli_errors_are_one_line(args: list[str], expected: str, capsys: pytest.CaptureFixture,
                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from unet_deploy.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["benchmark", "--quick", "--device", "cpu", *args])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_bad_option_exits_nonzero_without_traceback() -> None:
    proc = _cli("benchmark", "--backends", "onnx", "--device", "cpu")
    assert proc.returncode != 0
    assert "--backends onnx: unknown backend" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc peak-RSS reset")
def test_peak_rss_after_reset_sees_a_short_allocation_below_an_earlier_peak() -> None:
    """A 300 MiB peak during 'imports', then a 100 MiB temporary: the reset counter reports the 100 MiB
    that ru_maxrss (stuck at the import-time peak) cannot see."""
    code = (
        "import numpy as np\n"
        "from unet_deploy import bench\n"
        "a = np.ones(300 << 17); del a\n"  # 300 MiB of float64, touched
        "assert bench.reset_peak_rss()\n"
        "import psutil; base = psutil.Process().memory_info().rss\n"
        "b = np.ones(100 << 17); del b\n"
        "print((bench.peak_rss_bytes() - base) >> 20)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 90 <= int(proc.stdout.strip()) <= 130


# ------------------------------------------------------------------ output for a person (synthetic runs)


def _report(p50: dict[str, float], load: tuple[float, float] = (0.3, 0.5), cores: int = 2,
            spread: dict[str, float] | None = None) -> dict:
    """A full-size CPU report as run_benchmark writes it, from p50 ms per variant at 959x640."""
    cases = []
    for name, ms in p50.items():
        p90 = ms * (spread or {}).get(name, 1.02)
        cases.append({"backend": name, "runtime": name.split("-")[0], "scale": 0.5, "input": "959x640",
                      "input_width": 959, "input_height": 640, "precision": "fp32",
                      "provider": "CPUExecutionProvider" if name.startswith("ort") else "cpu",
                      "latency": {"p50_ms": ms, "p90_ms": p90, "mean_ms": ms * 1.3, "runs": 3},
                      "peak_mib": 1000.0 if name == "torch" else 400.0, "file_mb": 124.2,
                      "memory_method": "peak RSS growth", "parity": {"reference": name == "torch", "passed": True,
                                                                     "max_rel_err": 1e-6, "pixel_agreement": 1.0}})
    report = {"schema": bench.SCHEMA, "started": "2026-11-30T12:00:00+00:00", "duration_s": 60.0,
              "settings": {"quick": False, "image_size": list(bench.CARVANA_SIZE), "device": "cpu", "scales": [0.5],
                           "warmup": 1, "runs": 3, "threads": None, "backends": list(p50)},
              "model": {"architecture": "unet-transposed-w64-c3-k2", "source": "fresh init (seed 0)"},
              "machine": {"cpu": "test CPU", "cores_usable": cores, "cores_logical": cores, "ram_gib": 8,
                          "torch_threads": cores, "gpu": None, "python": "3", "platform": "linux",
                          "versions": {"torch": "2", "numpy": "2"}, "load_avg_1m": load[1]},
              "load_avg": {"start": load[0], "end": load[1]}, "cases": cases,
              "command": "unet-deploy benchmark --device cpu"}
    report["speedups"] = bench.speedups(report)
    report["targets"] = bench.targets(report)
    return report


def _terminal(report: dict) -> str:
    """What `unet-deploy benchmark` prints for the report: the table and the lines below it."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=200).print(bench.render_table(report))
    return buffer.getvalue() + bench.render_speedups(report)


def _row(text: str, label: str) -> str:
    return next(line for line in text.splitlines() if f" {label} " in line and "959x640" in line)


def test_busy_machine_marks_every_ratio_and_says_why() -> None:
    report = _report({"torch": 5000.0, "ort": 140.0}, load=(1.2, 4.1), cores=2)
    warning = "machine busy (load 4.1 on 2 cores): ratios unreliable, rerun on a quiet machine"
    text = _terminal(report)
    assert warning in text
    assert "onnxruntime 35.71x ?" in text  # the ratio is flagged, not stated with confidence
    assert "5000.0 ?" in _row(text, "torch (eager)") and "140.0 ?" in _row(text, "onnxruntime (CPU)")
    md = bench.render_markdown(report)
    assert f"> ? {warning}" in md and "| 0.5 | 959x640 | onnxruntime | 35.71x ? | 0.40x |" in md
    flags = bench.reliability(report)
    assert flags["busy"] is True and flags["reliable"] is False and flags["load"] == 4.1
    assert all(r["unreliable"] for r in bench.speedups(report))
    assert bench.reliability(_report({"torch": 1.0}, load=(2.5, 0.4), cores=2))["busy"]  # busy at the start


def test_the_cpus_idle_time_decides_busy_over_the_lagging_load_average() -> None:
    """Right after training the load average is still high though the machine is quiet: the run's reading of
    the CPUs' idle time (``cpu_free``) decides, and the note says what it saw."""
    quiet_after_training = _report({"torch": 5000.0, "ort": 2000.0}, load=(2.6, 2.2), cores=2)
    quiet_after_training["cpu_free"] = {"usable": 2, "free": 1.93}
    assert bench.reliability(quiet_after_training)["reliable"] is True
    assert "busy" not in _terminal(quiet_after_training)
    busy = _report({"torch": 5000.0, "ort": 2000.0}, load=(0.3, 0.9), cores=2)
    busy["cpu_free"] = {"usable": 2, "free": 0.8}
    flags = bench.reliability(busy)
    assert flags["busy"] is True and flags["free_cpus"] == 0.8
    assert "? machine busy (other processes left 0.8 of 2 CPUs free): ratios unreliable" in _terminal(busy)


def test_unsteady_case_is_marked_alone_and_named() -> None:
    report = _report({"torch": 5000.0, "torchscript": 4000.0, "ort": 2000.0}, spread={"ort": 1.5})
    text = _terminal(report)
    assert "unsteady timings, p90/p50 above 1.25: onnxruntime at 0.5 (1.50x)" in text
    assert "machine busy" not in text
    assert "2000.0 ?" in _row(text, "onnxruntime (CPU)")
    assert "?" not in _row(text, "torch (eager)") and "?" not in _row(text, "torchscript")
    assert "onnxruntime 2.50x ?" in text and "torchscript 1.25x (" in text  # only the unsteady one's ratio
    flags = bench.reliability(report)
    assert [(c["backend"], c["spread"]) for c in flags["unsteady"]] == [("ort", pytest.approx(1.5))]
    assert bench.unsteady(report["cases"][2]) and not bench.unsteady(report["cases"][1])
    assert "unsteady timings" in bench.render_markdown(report)


def test_quiet_run_shows_no_warning_and_img_s_agrees_with_p50() -> None:
    report = _report({"torch": 5000.0, "ort": 2000.0})  # mean 1.3x p50, p90 1.02x p50
    text = _terminal(report)
    assert "?" not in text and "busy" not in text and "unsteady" not in text
    assert "onnxruntime 2.50x (0.40x memory)" in text
    assert "img/s (p50)" in text
    assert " 0.50 " in _row(text, "onnxruntime (CPU)")  # 1000 / 2000 ms, not 1000 / the mean
    assert bench.reliability(report)["reliable"] is True
    assert not bench.reliability_notes(report)


def test_targets_only_with_the_flag() -> None:
    report = _report({"torch": 5000.0, "ort": 2000.0})
    assert report["targets"]  # a full-size CPU run: the project's targets are judged and kept in the JSON
    assert "target" not in _terminal(report).lower()
    assert "target" not in bench.render_markdown(report).split("## Reproduce")[0].lower()
    md = bench.render_markdown(report, show_targets=True)
    assert "### Targets" in md and "| onnxruntime >= 2.5x eager fp32 at 959x640 | 2.50x | met |" in md
    assert bench.render_targets(report)[0] == "target: onnxruntime >= 2.5x eager fp32 at 959x640: 2.50x (met)"


def test_cli_prints_targets_only_with_targets_flag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from unet_deploy.cli import main

    path = tmp_path / "r.json"
    bench.write_json(_report({"torch": 5000.0, "ort": 140.0}, load=(4.1, 4.1)), path)
    outs = []
    for extra in ([], ["--targets", "--markdown", str(tmp_path / "R.md")]):
        with pytest.raises(SystemExit) as exc:
            main(["benchmark", "--from-json", str(path), "--quiet", *extra])
        assert exc.value.code == 0
        outs.append(capsys.readouterr().out)
    assert "target:" not in outs[0] and "machine busy (load 4.1 on 2 cores)" in outs[0]
    assert "target: onnxruntime >= 2.5x eager fp32 at 959x640: 35.71x (met)" in outs[1]
    assert "### Targets" in (tmp_path / "R.md").read_text()


@pytest.mark.parametrize("warmup, runs", [(0, 2), (3, 1)])
def test_warmup_n_makes_exactly_n_untimed_calls(warmup: int, runs: int, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    class Counting:
        precision, provider = "fp32", "cpu"

        def __call__(self, batch: np.ndarray) -> torch.Tensor:
            calls.append(1)
            return torch.full((1, 2, 4, 4), float(len(calls)))

    monkeypatch.setattr("unet_deploy.runtime.load_backend", lambda *a, **k: Counting())
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 4, 4), np.float32))
    spec = bench.CaseSpec(backend="torch", model_path="unused.pth", device="cpu", input=str(tmp_path / "x.npy"),
                          runs=runs, warmup=warmup,
                          logits_out=str(tmp_path / "logits.npy"))
    result = bench.run_case(spec)
    assert len(calls) == warmup + runs
    assert result["latency"]["runs"] == runs and result["warmup_calls"] == warmup
    assert np.load(tmp_path / "logits.npy")[0, 0, 0, 0] == 1.0  # the first call's logits, for parity


def test_case_in_a_fresh_process_returns_its_json_or_one_line_error() -> None:
    from unet_deploy.bench.isolated import run_in_fresh_process

    # json.tool reads spec.json and writes it to result.json: a round trip through a real child process
    assert run_in_fresh_process("json.tool", {"a": [1, 2]}, "case x", 60, "hint") == {"a": [1, 2]}
    with pytest.raises(UserError, match=r"^case y failed in its process: .*No module named unet_deploy\.nothing"):
        run_in_fresh_process("unet_deploy.nothing", {}, "case y", 60, "hint")
    with pytest.raises(UserError, match=r"^case z ran over 0 s; use fewer --runs$"):
        run_in_fresh_process("json.tool", {}, "case z", 0.001, "use fewer --runs")


@pytest.mark.parametrize("name", ["results-serve.json", "results-serve-seed.json", "results-serve-hostile.json"])
def test_serve_load_tables_are_the_committed_json(name: str) -> None:
    """Every table of benchmarks/RESULTS-serve.md is `serve_load.py --table` of a committed JSON, whose
    targets are all met."""
    result = json.loads((ROOT / "benchmarks" / name).read_text())
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--table",
                            str(ROOT / "benchmarks" / name)], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert table.stdout in (ROOT / "benchmarks" / "RESULTS-serve.md").read_text(), f"{name}: table differs"
    assert result["command"] in (ROOT / "benchmarks" / "RESULTS-serve.md").read_text()
    assert all(target["met"] for target in result["targets"].values()), result["targets"]


def test_committed_results_md_is_the_render_of_the_committed_json(tmp_path: Path) -> None:
    """benchmarks/RESULTS.md holds no typed-in number: rendering its JSON files again gives the same file."""
    from unet_deploy.bench.render.markdown import FAST_PATH_RUNS, RESULTS_MERGE

    assert FAST_PATH_RUNS.rstrip().endswith(RESULTS_MERGE)
    args = RESULTS_MERGE.split()[1:]
    out = tmp_path / "RESULTS.md"
    args[args.index("--markdown") + 1] = str(out)
    r = _cli(*args, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_text() == (ROOT / "benchmarks" / "RESULTS.md").read_text()
