"""Run the recommended commands once before printing them: the export and predict steps of the fastest verified
variant run in a scratch folder on the benchmark's own model file, its input image and calibration images; when
they fail, the next fastest variant is tried. What ran is recorded in the report (``recommendation``)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unet_deploy.bench.inputs import synthetic_image, write_jpeg
from unet_deploy.bench.recommend import CALIBRATION_WORD, MODEL_WORD, command_line, how_to_run, ranked_variants
from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.images.image_io import list_images

__all__ = ["check_recommendation", "known_calibration", "TRIES", "STEP_TIMEOUT_S"]

#: How many of the fastest variants are tried before giving up.
TRIES = 3
#: Seconds one export or predict step may take.
STEP_TIMEOUT_S = 1800.0
_CALIBRATION_IMAGES = 4


def known_calibration(checkpoint: str | Path | None) -> Path | None:
    """The training images of ``checkpoint`` (its recorded ``--data``/``--imgs``) or ``data/imgs``, when that
    folder is here and holds images; None otherwise."""
    folders = []
    if checkpoint is not None:
        try:
            args = load_checkpoint(checkpoint).training.get("args") or {}
        except Exception:  # noqa: BLE001 - a Pytorch-UNet file or anything unreadable records no data folder
            args = {}
        if args.get("images_dir"):
            folders.append(Path(args["images_dir"]))
        if args.get("data"):
            folders.append(Path(args["data"]) / "imgs")
    folders.append(Path("data/imgs"))
    return next((f for f in folders if f.is_dir() and list_images(f)), None)


def _last_line(text: str) -> str:
    """The line that says what failed: the last one naming a failure, else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    failures = [ln for ln in lines if any(w in ln for w in ("FAILED", "failed", "error", "Error", "skipped"))]
    line = (failures or lines or ["no output"])[-1]
    return line[:240]


def _run_steps(steps: list[list[str]], cwd: Path) -> str | None:
    """Run each step (``unet-deploy ...`` as ``python -m unet_deploy ...``) in ``cwd``; the failing step's
    error line, or None when all succeeded."""
    cwd.mkdir(parents=True, exist_ok=True)
    for step in steps:
        try:
            done = subprocess.run([sys.executable, "-m", "unet_deploy", *step[1:]], cwd=cwd, capture_output=True,
                                  text=True, timeout=STEP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(step[:2])}` took over {STEP_TIMEOUT_S:.0f} s"
        if done.returncode != 0:
            return f"`{' '.join(step[:3])}` exited {done.returncode}: {_last_line(done.stdout + done.stderr)}"
    return None


def _calibration_folder(scratch: Path, size: tuple[int, int], seed: int) -> Path:
    """A few synthetic cars to calibrate int8 on when the user's training images are not here."""
    folder = scratch / "calibration"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(_CALIBRATION_IMAGES):
        write_jpeg(synthetic_image(size[0], size[1], seed + 3000 + i), folder / f"calib{i}.jpg")
    return folder


def check_recommendation(report: dict[str, Any], model_file: Path, image: Path, scratch: Path,
                         image_size: tuple[int, int], say: Callable[[str], None] = lambda _m: None
                         ) -> dict[str, Any] | None:
    """Run the commands of the fastest verified variants (at most :data:`TRIES`) until one works; the record
    of what ran (``ok``, ``backend``, ``command`` as printed, ``seconds``, ``failed`` before it)."""
    ranked = ranked_variants(report)
    if not ranked:
        return None
    user_model = (report.get("settings") or {}).get("checkpoint")
    calibration = known_calibration(user_model)
    check_calibration = calibration or _calibration_folder(scratch, image_size, int(report["settings"]["seed"]))
    failed: list[dict[str, str]] = []
    for variant in ranked[:TRIES]:
        steps = how_to_run(variant, str(Path(model_file).resolve()), str(check_calibration.resolve()),
                           str(Path(image).resolve()))
        say(f"recommendation: running {variant}'s commands once ({command_line(steps)})")
        t0 = time.perf_counter()
        error = _run_steps(steps, scratch / f"check-{variant}")
        if error is None:
            shown = how_to_run(variant, user_model or MODEL_WORD, str(calibration or CALIBRATION_WORD))
            return {"ok": True, "backend": variant, "command": command_line(shown),
                    "seconds": time.perf_counter() - t0, "failed": failed,
                    "calibration_known": calibration is not None}
        failed.append({"backend": variant, "error": error})
    return {"ok": False, "failed": failed,
            "error": "the commands of " + ", ".join(f["backend"] for f in failed) + " failed here: "
                     + failed[0]["error"]}
