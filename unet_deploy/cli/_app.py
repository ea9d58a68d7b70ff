"""The typer application object shared by the command modules."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="unet-deploy",
    help="Train, export, verify, predict with and benchmark U-Net segmentation models (Pytorch-UNet "
         "compatible). Every command has --help with examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)
