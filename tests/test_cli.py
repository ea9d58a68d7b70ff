"""The CLI end to end in subprocesses: real files in, one-line errors out, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "unet_deploy", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_every_command() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("synth", "train", "evaluate"):
        assert cmd in proc.stdout


def test_synth_train_evaluate(tmp_path: Path) -> None:
    proc = run_cli("synth", "--out", str(tmp_path / "data"), "--n", "10", "--width", "64", "--height", "48")
    assert proc.returncode == 0, proc.stderr
    assert len(list((tmp_path / "data" / "imgs").glob("*.jpg"))) == 10
    assert len(list((tmp_path / "data" / "masks").glob("*_mask.gif"))) == 10
    proc = run_cli("train", "--data", str(tmp_path / "data"), "-e", "2", "-b", "2", "-l", "1e-3", "-s", "1",
                   "--base-channels", "4", "--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2" in proc.stdout and "img/s" in proc.stdout
    assert (tmp_path / "ck" / "best.pth").exists() and (tmp_path / "ck" / "last.pth").exists()
    proc = run_cli("evaluate", "-m", str(tmp_path / "ck" / "best.pth"), "--data", str(tmp_path / "data"),
                   "--json", str(tmp_path / "dice.json"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("dice ") and "over 10 images" in proc.stdout
    assert '"per_image"' in (tmp_path / "dice.json").read_text()


def test_synth_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ("synth", "--out", str(tmp_path), "--n", "2", "--width", "32", "--height", "32")
    assert run_cli(*args).returncode == 0
    assert_one_line_error(run_cli(*args), str(tmp_path), "--overwrite")


@pytest.mark.parametrize("args,needles", [
    (("train", "--data", "{tmp}/nothing"), ["nothing/imgs", "folder not found"]),
    (("train", "--data", "{tmp}", "-e", "0"), ["-e/--epochs 0"]),
    (("evaluate", "-m", "{tmp}/missing.pth", "--data", "{tmp}"), ["missing.pth", "not found"]),
    (("train", "--data", "{tmp}", "--device", "tpu"), ["--device tpu"]),
    (("evaluate", "-m", "{tmp}/missing.pth", "--data", "{tmp}", "--json", "/proc/no/such/dir/x.json"),
     ["--json /proc/no/such/dir", "cannot create the folder"]),
    (("evaluate", "-m", "{tmp}/missing.pth", "--data", "{tmp}", "--mask-values", "0,x"), ["--mask-values 0,x"]),
])
def test_bad_input_is_one_line(tmp_path: Path, args, needles) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "masks").mkdir()
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert_one_line_error(proc, *[n.format(tmp=tmp_path) for n in needles])


def test_train_f_with_a_conflicting_explicit_flag(tmp_path: Path) -> None:
    import torch

    from unet_deploy.model import UNet

    torch.save(UNet(3, 2, bilinear=True, base_channels=4).state_dict(), tmp_path / "MODEL.pth")
    run_cli("synth", "--out", str(tmp_path / "d"), "--n", "4", "--width", "32", "--height", "32")
    proc = run_cli("train", "--data", str(tmp_path / "d"), "-f", str(tmp_path / "MODEL.pth"), "--transposed",
                   "--checkpoint-dir", str(tmp_path / "ck"), "--device", "cpu")
    assert_one_line_error(proc, "--bilinear/--transposed False", "MODEL.pth has True")


def test_version_is_fast_and_names_the_runtimes() -> None:
    code = ("import sys\nfrom unet_deploy.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    from unet_deploy import __version__

    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[-1] == "no torch", proc.stdout + proc.stderr
    assert lines[0].startswith(f"unet-deploy {__version__} (torch ") and "onnxruntime" in lines[0]


def test_verify_finds_the_recorded_checkpoint_from_another_folder(tmp_path: Path) -> None:
    """The export records ck/best.pth relative to where it ran: verify from elsewhere uses the absolute
    path; after the project folder moved, the path relative to the export's folder; else one clear line."""
    import torch

    from unet_deploy.checkpoint import save_checkpoint
    from unet_deploy.config import DeployConfig, ModelConfig

    project = tmp_path / "project"
    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(base_channels=4))
    save_checkpoint(project / "ck" / "best.pth", cfg.model.build(), cfg)
    proc = run_cli("export", "-m", "ck/best.pth", "--format", "torchscript", "-o", "exported", "--no-verify",
                   cwd=project)
    assert proc.returncode == 0, proc.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("verify", str(project / "exported" / "best.ts"), "--quick", cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "changed since" not in proc.stdout
    moved = tmp_path / "moved"
    project.rename(moved)  # the recorded absolute path is gone; exported/../ck/best.pth still fits
    proc = run_cli("verify", str(moved / "exported" / "best.ts"), "--quick", cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (moved / "ck" / "best.pth").unlink()
    proc = run_cli("verify", str(moved / "exported" / "best.ts"), "--quick", cwd=elsewhere)
    assert_one_line_error(proc, "not found (tried ", str(project / "ck" / "best.pth"),
                          str(moved / "exported" / "ck" / "best.pth"), "pass -m CHECKPOINT.pth")
