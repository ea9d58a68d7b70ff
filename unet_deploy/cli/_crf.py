"""The dense-CRF flags, one vocabulary for ``predict`` and ``serve``: each command takes these typer options
as parameter defaults and turns them into :class:`~unet_deploy.images.crf.CRFParams` with :func:`crf_params`."""

from __future__ import annotations

import typer

from unet_deploy.images.crf import CRFParams

__all__ = ["GAUSS_SXY", "GAUSS_COMPAT", "BILAT_SXY", "BILAT_SRGB", "BILAT_COMPAT", "ITERATIONS", "CLIP",
           "crf_params"]

_DEFAULT = CRFParams()
GAUSS_SXY = typer.Option(_DEFAULT.gauss_sxy, "--crf-gauss-sxy",
                         help="CRF smoothness kernel spatial std-dev (pixels).")
GAUSS_COMPAT = typer.Option(_DEFAULT.gauss_compat, "--crf-gauss-compat", help="CRF smoothness kernel weight.")
BILAT_SXY = typer.Option(_DEFAULT.bilat_sxy, "--crf-bilat-sxy",
                         help="CRF appearance kernel spatial std-dev (pixels).")
BILAT_SRGB = typer.Option(_DEFAULT.bilat_srgb, "--crf-bilat-srgb",
                          help="CRF appearance kernel colour std-dev (0-255).")
BILAT_COMPAT = typer.Option(_DEFAULT.bilat_compat, "--crf-bilat-compat", help="CRF appearance kernel weight.")
ITERATIONS = typer.Option(_DEFAULT.iterations, "--crf-iterations", help="CRF mean-field iterations.")
CLIP = typer.Option(_DEFAULT.clip, "--crf-clip",
                    help="Probabilities are clipped to [clip, 1-clip] before the CRF.")


def crf_params(gauss_sxy: float, gauss_compat: float, bilat_sxy: float, bilat_srgb: float, bilat_compat: float,
               iterations: int, clip: float) -> CRFParams:
    """The flags' values, checked (a one-line error naming the setting)."""
    return CRFParams(gauss_sxy=gauss_sxy, gauss_compat=gauss_compat, bilat_sxy=bilat_sxy, bilat_srgb=bilat_srgb,
                     bilat_compat=bilat_compat, iterations=iterations, clip=clip)
