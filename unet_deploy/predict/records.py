"""What a predict run is given and gives back: options, jobs, per-file results and the run's summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.images.crf import CRFParams, model_crf
from unet_deploy.names import check_scale
from unet_deploy.runtime.cpu_share import usable_cpus
from unet_deploy.runtime.tiling import check_tiling

__all__ = ["crf_setting", "PredictOptions", "Job", "PredictResult", "PredictSummary", "PredictInterrupted",
           "values_text"]


def values_text(values: Sequence[Any]) -> str:
    """``0,255``: mask values as they are given on the command line."""
    return ",".join(str(v) for v in values)


@dataclass
class PredictOptions:
    """Everything that changes what predict computes or writes; ``None`` = the model's embedded config."""

    scale: float | None = None
    threshold: float | None = None
    mask_values: list[Any] | None = None
    batch_size: int = 1
    save: bool = True  #: write mask files (``--no-save`` turns it off)
    viz: bool = False  #: write an overlay image beside each mask
    show: bool = False  #: also show each overlay on screen (only where a display exists)
    rle: Path | None = None  #: Kaggle submission file to write
    crf: bool = False
    #: explicit CRF settings; None: the model's (``train --crf auto``), else the defaults (:func:`model_crf`)
    crf_params: CRFParams | None = None
    crf_workers: int = field(default_factory=usable_cpus)
    tta: bool = False
    skip_existing: bool = False
    loader_threads: int = 2  #: threads decoding images ahead of the network
    progress: bool = True
    #: ``--tile``: largest tile side in model-input pixels (after ``scale``); larger images run as blended
    #: overlapping tiles (:mod:`unet_deploy.runtime.tiling`). None: whole images.
    tile: int | None = None
    tile_overlap: int | None = None  #: ``--tile-overlap`` in model-input pixels (default: an eighth of the tile)
    #: tile an image automatically (one notice line) when the whole of it cannot fit in memory
    auto_tile: bool = True

    def __post_init__(self) -> None:
        check_tiling(self.tile, self.tile_overlap)
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: use 1 or more")
        if self.scale is not None:
            check_scale(self.scale, "--scale")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UserError(f"--mask-threshold {self.threshold}: use a probability in [0, 1]")
        if self.crf_workers < 1:
            raise UserError(f"--crf-workers {self.crf_workers}: use 1 or more")
        if self.mask_values is not None:
            flat = np.asarray(self.mask_values, dtype=object).ravel().tolist()
            if not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in flat):
                raise UserError(f"--mask-values {values_text(self.mask_values)}: masks are 8-bit PNGs; give "
                                "integers from 0 to 255, e.g. 0,255")


def crf_setting(backend: Any, options: PredictOptions) -> tuple[CRFParams | None, str | None]:
    """The CRF a run applies (None: none) and a line to say about it (None: nothing): off unless
    ``options.crf``; then ``options.crf_params``, else the model's choice (off when it did not help on
    validation), else the defaults (:func:`unet_deploy.images.crf.model_crf`)."""
    if not options.crf:
        return None, None
    return model_crf(backend.config.inference.crf, options.crf_params)


@dataclass(frozen=True)
class Job:
    """One input file and where its outputs go (``output``/``overlay`` None = not written)."""

    index: int
    path: Path
    output: Path | None = None
    overlay: Path | None = None
    error: str | None = None  #: known before predicting (no such file, name clash, ...)

    @property
    def id(self) -> str:
        """The name used in submissions: the input's file name (Kaggle: ``<id>.jpg``)."""
        return self.path.name


@dataclass
class PredictResult:
    """One job's outcome: ``mask`` = class indices at the input's size, or ``error`` says why not."""

    job: Job
    mask: np.ndarray | None = None
    error: str | None = None
    skipped: bool = False  #: ``skip_existing`` found a valid output (``mask`` read back from it)
    image: np.ndarray | None = field(default=None, repr=False)  #: the decoded image (for overlays)

    @property
    def id(self) -> str:
        return self.job.id

    def require_mask(self) -> np.ndarray:
        """The mask of a successful result (a failed one has none)."""
        if self.mask is None:
            raise ValueError(f"{self.job.path}: no mask ({self.error or 'not predicted'})")
        return self.mask

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PredictSummary:
    total: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)  #: this process's masks and overlays, as written
    masks: list[Path] = field(default_factory=list)  #: the masks written by this run (every process), in order
    overlays: list[Path] = field(default_factory=list)  #: the overlays written by this run, in order
    rle: Path | None = None
    rle_rows: int = 0
    seconds: float = 0.0
    reused: int = 0  #: submission rows taken from an interrupted run's journal (``skip_existing``)
    untrusted: int = 0  #: journal lines not used: torn by a crash, or made with another model/options
    processes: int = 1  #: ranks that predicted (torchrun)
    journal: Path | None = None  #: the journal kept for a re-run with ``skip_existing`` (some files failed)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def line(self) -> str:
        parts = [f"predicted {self.predicted} of {self.total} files"]
        if self.skipped:
            parts.append(f"{self.skipped} skipped (output exists)")
        if self.reused:
            parts.append(f"reused {self.reused} (journal rows of an earlier run)")
        if self.failed:
            parts.append(f"{self.failed} failed")
        text = ", ".join(parts) + f" in {self.seconds:.1f} s"
        if self.predicted:
            text += f" ({self.seconds / self.predicted * 1000:.0f} ms per image)"
        if self.processes > 1:
            text += f" on {self.processes} processes"
        if self.rle:
            text += f"; {self.rle_rows} rows in {self.rle}"
        if self.untrusted:
            text += f"; {self.untrusted} journal lines not trusted (torn, or another model/options)"
        if self.journal:
            text += f"; rows kept in {self.journal}: add --skip-existing to predict only the failed files"
        return text


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`predict_files`: ``done`` of ``total`` files were finished (their masks, and with
    ``--rle`` their journal rows, are complete and kept)."""

    def __init__(self, done: int, total: int):
        super().__init__(f"interrupted: {done} of {total} files done")
        self.done, self.total = done, total
