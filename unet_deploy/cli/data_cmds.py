"""``unet-deploy synth``: a Carvana-like data set made offline."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from unet_deploy.cli._app import app

HELDOUT_SEED_OFFSET = 1000  #: held-out cars come from seed + this: other cars than the training ones
#: The README's training recipe (its "journey" block), which synth's `next:` line suggests.
RECIPE = ("-e", "10", "-b", "4", "--base-channels", "16", "--bilinear", "--crf", "auto")


@app.command()
def synth(
    out: Path = typer.Option(Path("data"), "--out", "-o", help="Folder to write imgs/ and masks/ into."),
    n: int = typer.Option(16, "--n", help="Number of image/mask pairs."),
    width: int = typer.Option(1918, help="Image width (Carvana: 1918)."),
    height: int = typer.Option(1280, help="Image height (Carvana: 1280)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same files."),
    angles: int = typer.Option(16, help="Views per synthetic car (Carvana: 16, ids <car>_01..16)."),
    heldout: int = typer.Option(0, "--heldout", min=0,
                                help="Also write this many pairs of other cars to OUT/heldout/ "
                                     "(for `evaluate`; never trained on: `train --data OUT` reads OUT/imgs only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files that already exist."),
) -> None:
    """Write a synthetic Carvana-like data set: OUT/imgs/<id>.jpg and OUT/masks/<id>_mask.gif
    (and OUT/heldout/imgs, OUT/heldout/masks with --heldout N).

    Example: `unet-deploy synth --out data --n 64 --heldout 16 --width 480 --height 320`
    """
    from unet_deploy.images.synth import generate_dataset

    ids = generate_dataset(out, n=n, width=width, height=height, seed=seed, angles=angles, overwrite=overwrite)
    typer.echo(f"wrote {len(ids)} images to {out}/imgs and masks to {out}/masks ({width}x{height}, seed {seed})")
    if heldout:
        held = out / "heldout"
        generate_dataset(held, n=heldout, width=width, height=height, seed=seed + HELDOUT_SEED_OFFSET,
                         angles=angles, overwrite=overwrite)
        typer.echo(f"wrote {heldout} held-out images of other cars to {held}/imgs and {held}/masks")
    typer.echo("next: unet-deploy " + shlex.join(["train", "--data", str(out), *RECIPE]))
