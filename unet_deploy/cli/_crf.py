"""The dense-CRF flags, one vocabulary for ``predict`` and ``serve``: each command takes these typer options
as parameter defaults and turns them into :class:`~unet_deploy.images.crf.CRFParams` with :func:`crf_params`.

Left out, every flag takes the model's value (chosen by ``train --crf auto``), else Pytorch-UNet's default;
any flag given starts from the defaults (the model's choice is then not used)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import typer

from unet_deploy.images.crf import REFERENCE_SIDE, CRFParams

__all__ = ["GAUSS_SXY", "GAUSS_COMPAT", "BILAT_SXY", "BILAT_SRGB", "BILAT_COMPAT", "ITERATIONS", "CLIP",
           "crf_params"]

_DEFAULT = CRFParams()
_AT = f"px at a {REFERENCE_SIDE:g} px shorter side, scaled to each image's size"


def _opt(flag: str, default: float, text: str) -> Any:
    return typer.Option(None, flag, show_default=False,
                        help=f"{text} [default: the model's (train --crf auto), else {default:g}]")


GAUSS_SXY = _opt("--crf-gauss-sxy", _DEFAULT.gauss_sxy, f"CRF smoothness kernel spatial std-dev ({_AT}).")
GAUSS_COMPAT = _opt("--crf-gauss-compat", _DEFAULT.gauss_compat, "CRF smoothness kernel weight.")
BILAT_SXY = _opt("--crf-bilat-sxy", _DEFAULT.bilat_sxy, f"CRF appearance kernel spatial std-dev ({_AT}).")
BILAT_SRGB = _opt("--crf-bilat-srgb", _DEFAULT.bilat_srgb, "CRF appearance kernel colour std-dev (0-255).")
BILAT_COMPAT = _opt("--crf-bilat-compat", _DEFAULT.bilat_compat, "CRF appearance kernel weight.")
ITERATIONS = _opt("--crf-iterations", _DEFAULT.iterations, "CRF mean-field iterations.")
CLIP = _opt("--crf-clip", _DEFAULT.clip, "Probabilities are clipped to [clip, 1-clip] before the CRF.")


def crf_params(gauss_sxy: float | None, gauss_compat: float | None, bilat_sxy: float | None,
               bilat_srgb: float | None, bilat_compat: float | None, iterations: int | None, clip: float | None
               ) -> CRFParams | None:
    """The flags' values, checked (a one-line error naming the setting); None when no flag was given (the
    model's parameters, else the defaults, apply)."""
    given = {"gauss_sxy": gauss_sxy, "gauss_compat": gauss_compat, "bilat_sxy": bilat_sxy,
             "bilat_srgb": bilat_srgb, "bilat_compat": bilat_compat, "iterations": iterations, "clip": clip}
    chosen: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    return replace(_DEFAULT, **chosen) if chosen else None
