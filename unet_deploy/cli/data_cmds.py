"""``unet-deploy synth``: a Carvana-like data set made offline."""

from __future__ import annotations

from pathlib import Path

import typer

from ._app import app


@app.command()
def synth(
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Folder to write imgs/ and masks/ into."),
    n: int = typer.Option(16, "--n", "-n", help="Number of image/mask pairs."),
    width: int = typer.Option(1918, help="Image width (Carvana: 1918)."),
    height: int = typer.Option(1280, help="Image height (Carvana: 1280)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same files."),
    angles: int = typer.Option(16, help="Views per synthetic car (Carvana: 16, ids <car>_01..16)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files that already exist."),
) -> None:
    """Write a synthetic Carvana-like data set: OUT/imgs/<id>.jpg and OUT/masks/<id>_mask.gif.

    Example: `unet-deploy synth --out data --n 64 --width 480 --height 320`
    """
    from ..synth import generate_dataset

    ids = generate_dataset(out, n=n, width=width, height=height, seed=seed, angles=angles, overwrite=overwrite)
    typer.echo(f"wrote {len(ids)} images to {out}/imgs and masks to {out}/masks ({width}x{height}, seed {seed})")
    typer.echo(f"next: unet-deploy train --data {out} -e 5 --base-channels 16")
