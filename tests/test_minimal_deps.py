"""``python -m unet_deploy`` train, export, predict and benchmark on the GPU machine's package set.

That machine has torch, numpy, pillow, typer, rich, onnx, onnxscript, onnxruntime and psutil, and none of
the optional packages. Each command here runs in a subprocess whose imports of the optional packages fail
as if they were not installed (a ``sitecustomize`` on ``PYTHONPATH``, so the benchmark's own case
processes are blocked too): an eager import of one of them anywhere on these paths fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Top-level modules of the optional packages (and of the server's, which these commands must not need).
BLOCKED = ("albumentations", "pydensecrf", "openvino", "nncf", "onnxconverter_common", "matplotlib", "cv2",
           "prometheus_client", "fastapi", "ray")

_SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class _NotInstalled:
    \"\"\"Import fails for the blocked packages and their submodules, as if they were not installed.\"\"\"

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_minimal_deps)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """``run(*args)``: ``python -m unet_deploy ARGS`` with the optional packages blocked; returns the
    completed process after asserting exit code 0."""
    site = tmp_path_factory.mktemp("blocked_site")
    (site / "sitecustomize.py").write_text(textwrap.dedent(_SITECUSTOMIZE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))

    def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "unet_deploy", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"unet-deploy {' '.join(args)}: exit {proc.returncode}\n" \
                                     f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    # The block itself works: a blocked package does not import even where it is installed.
    probe = subprocess.run([sys.executable, "-c", "import sys\nfor name in sys.argv[1:]:\n"
                            "    try:\n        __import__(name)\n    except ImportError:\n        continue\n"
                            "    sys.exit(f'{name} imported')", *BLOCKED], env=env, capture_output=True,
                           text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    return _run


@pytest.mark.slow
def test_train_export_predict_and_benchmark_without_optional_packages(run, tmp_path: Path) -> None:
    data, ckpt, out = tmp_path / "data", tmp_path / "ckpt", tmp_path / "out"
    run("synth", "--out", str(data), "-n", "6", "--width", "64", "--height", "64", "--seed", "3", cwd=tmp_path)
    images = sorted((data / "imgs").iterdir())
    assert len(images) == 6

    # default recipe: its augmentation needs albumentations, so training goes on without it (one warning)
    train = run("train", "--data", str(data), "-e", "1", "-b", "2", "-s", "0.5", "-v", "34",
                "--base-channels", "4", "--device", "cpu", "--checkpoint-dir", str(ckpt), "-q", cwd=tmp_path)
    assert "albumentations" in train.stdout + train.stderr
    best = ckpt / "best.pth"
    assert best.is_file() and (ckpt / "last.pth").is_file()

    out.mkdir()
    run("predict", "-m", str(best), "--device", "cpu", "-q", "-i", str(images[0]),
        "-o", str(out / "torch_mask.png"), cwd=tmp_path)
    assert (out / "torch_mask.png").is_file()

    exported = tmp_path / "exported"
    run("export", "-m", str(best), "--format", "onnx", "--quick-verify", "-o", str(exported), "--name", "model",
        cwd=tmp_path)
    onnx_file = exported / "model.onnx"
    assert onnx_file.is_file()
    run("predict", "-m", str(onnx_file), "--backend", "ort", "--device", "cpu", "-q", "-i", str(images[0]),
        "-o", str(out / "ort_mask.png"), cwd=tmp_path)
    assert (out / "ort_mask.png").is_file()

    report = tmp_path / "bench.json"
    run("benchmark", "--quick", "--backends", "torch", "ort", "--scales", "0.5", "--runs", "1", "--warmup", "0",
        "--device", "cpu", "--threads", "1", "--json", str(report), "-q", cwd=tmp_path)
    assert report.is_file() and '"cases"' in report.read_text()
