"""`unet-deploy demo --quick`: the whole journey end to end on a fresh folder."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_deploy.rle import rle_decode

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "unet_deploy", "demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for step in range(1, 8):
        assert f"[{step}/7]" in proc.stdout
    dice = float(re.search(r"^dice ([0-9.]+) over 8 images", proc.stdout, re.M).group(1))
    assert dice >= 0.85  # held-out cars, Carvana's metric
    assert (out / "checkpoints" / "best.pth").exists()
    assert (out / "exported" / "best.onnx").exists() and (out / "exported" / "best.ts").exists()
    masks = sorted((out / "predictions").glob("*_OUT.png"))
    overlays = sorted((out / "predictions").glob("*_OVERLAY.png"))
    assert len(masks) == 8 and len(overlays) == 8
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"] and len(rows) == 9
    first = rows[1]
    mask = np.asarray(Image.open(out / "predictions" / first[0].replace(".jpg", "_OUT.png")))
    assert np.array_equal(rle_decode(first[1], mask.shape), (mask > 0).astype(np.uint8))
    assert mask.any()
    report = json.loads((out / "benchmark.json").read_text())
    assert {c["backend"] for c in report["cases"]} >= {"torch", "torchscript", "ort"}
