"""``unet-deploy demo``: the whole journey on synthetic data, as the commands a user would type."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import typer

from ._app import app


def demo_steps(out: Path, quick: bool) -> list[tuple[str, list[str]]]:
    """(title, argv) for each step; the same commands the README shows."""
    size = ["--width", "192", "--height", "128"] if quick else ["--width", "480", "--height", "320"]
    n_train, epochs = ("96", "6") if quick else ("128", "8")
    data, held = out / "data", out / "heldout"
    ck, exp, pred = out / "checkpoints", out / "exported", out / "predictions"
    return [
        ("synthetic Carvana-like training data",
         ["synth", "--out", str(data), "--n", n_train, *size, "--seed", "0", "--overwrite"]),
        ("held-out data (other cars)",
         ["synth", "--out", str(held), "--n", "8", *size, "--seed", "1", "--overwrite"]),
        ("train a small U-Net (base width 16) on the CPU",
         ["train", "--data", str(data), "-e", epochs, "-b", "8", "-l", "3e-3", "--optimizer", "adamw",
          "--base-channels", "16", "--bilinear", "-s", "0.5", "-v", "10", "--checkpoint-dir", str(ck), "-q"]),
        ("held-out dice (Carvana's metric)",
         ["evaluate", "-m", str(ck / "best.pth"), "--data", str(held), "-q"]),
        ("export to ONNX and TorchScript, verifying parity against eager PyTorch",
         ["export", "-m", str(ck / "best.pth"), "--format", "all", "-o", str(exp), "--quick-verify"]),
        ("predict with ONNX Runtime + dense CRF, writing masks, overlays and a Kaggle submission",
         ["predict", str(held / "imgs"), "-m", str(exp / "best.onnx"), "-o", str(pred), "--crf", "--viz",
          "--rle", str(out / "submission.csv"), "--quiet"]),
        ("benchmark every backend (quick mode: small width and size)",
         ["benchmark", "--quick", "--json", str(out / "benchmark.json")]),
    ]


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for everything the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="Smaller data and fewer epochs (about a minute)."),
) -> None:
    """Run the whole journey on synthetic data: synth -> train -> evaluate -> export + parity ->
    predict (ONNX Runtime + CRF, RLE submission) -> benchmark. A few CPU-minutes.

    Example: `unet-deploy demo --out demo`
    """
    from . import app as cli_app

    start = time.perf_counter()
    steps = demo_steps(out, quick)
    for i, (title, argv) in enumerate(steps, 1):
        typer.secho(f"\n[{i}/{len(steps)}] {title}", bold=True)
        typer.echo("$ unet-deploy " + shlex.join(argv))
        rc = cli_app(args=argv, prog_name="unet-deploy", standalone_mode=False)
        if rc not in (None, 0):
            typer.secho(f"demo stopped: step {i} exited with code {rc}", fg="red", err=True)
            raise typer.Exit(rc)
    typer.secho(f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is in {out}/", bold=True)
