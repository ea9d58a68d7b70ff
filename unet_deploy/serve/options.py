"""What ``unet-deploy serve`` is given: where to listen, the batching and back-pressure limits, the request
defaults (CRF, TTA) and the access token. Checked once, with one-line errors naming the flag."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unet_deploy.errors import UserError
from unet_deploy.images.crf import CRFParams

__all__ = ["ServeOptions", "TOKEN_ENV", "max_batch_for"]

#: The environment variable read for the access token when ``--token`` is not given.
TOKEN_ENV = "UNET_DEPLOY_TOKEN"
_MODEL_NAME = re.compile(r"^(?!\.+$)[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """The server's settings (the ``serve`` flags); model loading is as in ``predict``."""

    model: Path
    backend: str | None = None
    device: str = "auto"
    backend_options: dict[str, Any] = field(default_factory=dict)  #: precision, threads, ... (options_for)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  #: most requests of one input shape per model call (None: see max_batch_for)
    max_wait_ms: float = 5.0  #: how long the first request of a batch waits for others
    queue: int = 32  #: requests admitted beyond the running batch; more get 503 at once
    workers: int = 1
    token: str | None = None
    max_upload_mb: float = 20.0
    max_uploads: int = 128  #: uploads received at once; more get 503 before their body is read
    read_timeout_s: float = 15.0  #: headers, and then the body, must arrive within this (431/408 and close)
    max_pixels: int = 16_000_000  #: larger images are refused (413) from their header, before decoding
    pixel_budget: int = 40_000_000  #: decoded pixels of all images in work at once; more get 503
    timeout_s: float = 30.0  #: from a request's arrival to its answer (upload included): 504 past it
    crf: bool = False  #: the default of each request's ``crf``
    tta: bool = False  #: the default of each request's ``tta``
    allow_crf: bool = True  #: whether requests may ask for CRF (needs pydensecrf)
    crf_workers: int = 1
    #: predict's --crf-* flags, for every CRF request; None: the model's (``train --crf auto``) or the defaults
    crf_params: CRFParams | None = None
    grace_s: float = 30.0  #: SIGTERM: how long queued and running requests may take to finish
    tile: int | None = None  #: ``--tile``: larger images run as blended tiles (their own batches of max_batch)
    tile_overlap: int | None = None  #: ``--tile-overlap`` (default: an eighth of the tile)
    model_name: str = "unet"  #: the Open Inference Protocol's model name (``/v2/models/<name>``)

    def __post_init__(self) -> None:
        from unet_deploy.runtime.tiling import check_tiling

        check_tiling(self.tile, self.tile_overlap)
        checks = [("--port", self.port, 0 <= self.port <= 65535, "use 0-65535 (0: any free port)"),
                  ("--max-batch", self.max_batch, self.max_batch is None or self.max_batch >= 1, "use 1 or more"),
                  ("--max-wait-ms", self.max_wait_ms, self.max_wait_ms >= 0, "use 0 or more"),
                  ("--queue", self.queue, self.queue >= 1, "use 1 or more"),
                  ("--workers", self.workers, self.workers >= 1, "use 1 or more"),
                  ("--max-upload-mb", self.max_upload_mb, self.max_upload_mb > 0, "use a positive size"),
                  ("--max-uploads", self.max_uploads, self.max_uploads >= 1, "use 1 or more"),
                  ("--read-timeout-s", self.read_timeout_s, self.read_timeout_s > 0,
                   "use a positive number of seconds"),
                  ("--max-pixels", self.max_pixels, self.max_pixels >= 256, "use 256 or more (16x16 px)"),
                  ("--pixel-budget", self.pixel_budget, self.pixel_budget >= self.max_pixels,
                   f"use --max-pixels ({self.max_pixels}) or more: the largest image must fit"),
                  ("--timeout-s", self.timeout_s, self.timeout_s > 0, "use a positive number of seconds"),
                  ("--grace-s", self.grace_s, self.grace_s >= 0, "use 0 or more seconds"),
                  ("--crf-workers", self.crf_workers, self.crf_workers >= 1, "use 1 or more")]
        for flag, value, ok, fix in checks:
            if not ok:
                raise UserError(f"{flag} {value}: {fix}")
        if not _MODEL_NAME.match(self.model_name):
            raise UserError(f"--model-name {self.model_name!r}: use 1-64 letters, digits, '.', '_' or '-' (it is "
                            "part of the URL /v2/models/<name>)")
        if self.token is not None and not self.token.strip():
            raise UserError(f"--token: an empty token protects nothing; give a secret or unset {TOKEN_ENV}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def capacity(self) -> int:
        """Requests admitted to the model queue at once (queued, plus one running batch), once their upload is
        in; their memory is bounded by ``--pixel-budget`` (:mod:`unet_deploy.serve.limits`)."""
        return self.queue + (self.max_batch or 1)


def max_batch_for(backend_name: str, device: str) -> int:
    """The default ``--max-batch``: 4 on a GPU and for OpenVINO (which runs a batch's images on parallel
    streams); 1 for the other CPU backends, whose threads already share one image and whose batches run no
    faster per image (slower at large sizes: ``benchmarks/serve_load.py`` measures it)."""
    from unet_deploy.runtime.registry import spec

    return spec(backend_name).max_batch(device)
