"""The benchmark's recommendation: for the user's model (or the seed width at scale 0.5), only among paths whose
parity passed here, printed after its commands ran once -- and the printed command works when pasted."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from unet_deploy.bench import recommend_check
from unet_deploy.bench.recommend import how_to_run, ranked_variants, render_recommendation
from unet_deploy.images.synth import generate_dataset

ROOT = Path(__file__).parents[1]


def _case(backend: str, p50: float, passed: bool = True, scale: float = 0.5) -> dict:
    return {"backend": backend, "input": "959x640" if scale == 0.5 else "1918x1280", "scale": scale,
            "latency": {"p50_ms": p50, "p90_ms": p50}, "parity": {"passed": passed, "reference": backend == "torch"}}


def _report(cases: list[dict], quick: bool = False, checkpoint: str | None = None) -> dict:
    return {"settings": {"quick": quick, "checkpoint": checkpoint, "scales": [0.5, 1.0], "seed": 0},
            "machine": {"cores_usable": 2}, "load_avg": {"start": 0.1, "end": 0.1}, "cases": cases}


def test_commands_name_the_model_the_file_export_writes_and_the_images() -> None:
    assert how_to_run("openvino-int8", "runs/m.pth", "data/imgs") == [
        ["unet-deploy", "export", "-m", "runs/m.pth", "--format", "openvino", "--int8", "--calibration", "data/imgs"],
        ["unet-deploy", "predict", "--backend", "openvino", "-m", "exported/m.int8.xml", "IMAGES"]]
    assert how_to_run("torch-bf16-cl") == [["unet-deploy", "predict", "-m", "checkpoints/best.pth",
                                            "--precision=bf16", "--channels-last", "IMAGES"]]
    assert how_to_run("ort")[1][-3:] == ["-m", "exported/best.onnx", "IMAGES"]


def test_only_verified_deployable_variants_at_scale_half_are_ranked() -> None:
    report = _report([_case("torch", 900), _case("ort", 500), _case("ort-int8", 100, passed=False),
                      _case("openvino-int8-plain", 50), _case("openvino-int8", 200),
                      _case("openvino-bf16", 10, scale=1.0)])
    assert ranked_variants(report) == ["openvino-int8", "ort", "torch"]
    quick = _report(report["cases"], quick=True)
    assert ranked_variants(quick) == []
    assert (render_recommendation(quick) or "").startswith("no recommendation: quick run")


def test_a_failing_command_falls_back_to_the_next_fastest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ran: list[str] = []

    def fake(steps: list[list[str]], cwd: Path) -> str | None:
        ran.append(steps[0][steps[0].index("--format") + 1] if "--format" in steps[0] else steps[0][1])
        return "`unet-deploy export -m` exited 1: boom" if len(ran) == 1 else None

    monkeypatch.setattr(recommend_check, "_run_steps", fake)
    report = _report([_case("torch", 900), _case("ort", 500), _case("openvino-int8", 200)])
    image = tmp_path / "car.jpg"
    checked = recommend_check.check_recommendation(report, tmp_path / "m.pth", image, tmp_path, (96, 64))
    assert checked is not None and ran == ["openvino", "onnx"] and checked["ok"] and checked["backend"] == "ort"
    assert checked["failed"] == [{"backend": "openvino-int8", "error": "`unet-deploy export -m` exited 1: boom"}]
    report["recommendation"] = checked
    line = render_recommendation(report) or ""
    assert "ort, the fastest backend whose parity passed" in line and "openvino-int8 was faster but" in line
    assert line.endswith("unet-deploy predict --backend ort -m exported/best.onnx IMAGES (ran once here in 0 s)")


@pytest.mark.precision
@pytest.mark.timeout(900)
def test_the_recommended_command_ran_and_works_when_pasted(tmp_path: Path) -> None:
    """A user's model: the benchmark recommends among the paths verified here, runs the command once, and the
    printed command (IMAGES filled in) works in the user's folder."""
    from test_openvino import _trained_like  # a width-8 model with trained-like BatchNorm statistics

    pytest.importorskip("openvino")
    from unet_deploy.checkpoint import save_checkpoint

    generate_dataset(tmp_path / "data", n=6, width=96, height=64, seed=4)
    model, cfg = _trained_like()
    (tmp_path / "checkpoints").mkdir()
    save_checkpoint(tmp_path / "checkpoints" / "best.pth", model, cfg)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `unet-deploy` as pasted
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": path}
    r = subprocess.run([sys.executable, "-m", "unet_deploy", "benchmark", "-m", "checkpoints/best.pth", "--quick",
                        "--backends", "torch", "ort", "openvino", "openvino-int8", "openvino-int8-plain",
                        "--scales", "0.5", "--runs", "2", "--json", "bench.json"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=800)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("recommended on this machine for your model: "))
    assert "plain" not in line.split(":")[1].split(",")[0], line
    command = line.split("): ", 1)[1].rsplit(" (ran once here in", 1)[0]
    assert "checkpoints/best.pth" in command and ("--calibration data/imgs" in command or "--int8" not in command)
    image = sorted((tmp_path / "data" / "imgs").iterdir())[0]
    pasted = subprocess.run(command.replace("IMAGES", shlex.quote(str(image))), shell=True, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert pasted.returncode == 0, pasted.stderr[-2000:]
    assert image.with_name(f"{image.stem}_OUT.png").is_file()
