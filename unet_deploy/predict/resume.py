"""Resuming and sharing a run: the run fingerprint, outputs and journal rows an earlier run left that can
be reused, the RLE journal's plan and merge, and the agreement between torchrun processes.

With ``--rle`` each process appends its rows to a journal beside the submission (:mod:`unet_deploy.predict.shard`);
rank 0 merges them in input order at the end. ``skip_existing`` reuses masks and journal rows made with the
same :func:`run_fingerprint` (model file, scale, threshold, TTA, CRF, precision), and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unet_deploy.errors import UserError, first_line
from unet_deploy.images.image_io import load_mask, mask_to_index, open_image
from unet_deploy.images.rle import write_submission
from unet_deploy.predict.plan import check_rle_target
from unet_deploy.predict.records import Job, PredictOptions, crf_setting
from unet_deploy.predict.shard import (
    Group,
    SharedError,
    fingerprint,
    journal_dir,
    model_digest,
    new_run_id,
    read_journal,
)
from unet_deploy.predict.write import mask_fingerprint
from unet_deploy.runtime.base import Backend

__all__ = ["CRASH_ENV", "crash_hook", "journal_key", "run_fingerprint", "on_main", "image_size", "read_existing",
           "reusable", "check_same_run", "resume_plan", "merge_submission"]

#: Test hook: "RANK:K" makes rank RANK exit abruptly (as if killed) after writing K journal rows.
CRASH_ENV = "_UNET_DEPLOY_TEST_CRASH_AFTER"


class _CrashAfterRows:
    """Exits the process abruptly (exit status 3, nothing flushed) once ``rows`` journal rows are written."""

    def __init__(self, rows: int):
        self.rows = rows

    def __call__(self, written: int) -> None:
        if written >= self.rows:
            os._exit(3)


def _keep_running(written: int) -> None:
    return None


def crash_hook(rank: int) -> Callable[[int], None]:
    """What to call with the journal's row count after each row: a no-op, unless :data:`CRASH_ENV` names
    ``rank`` (read once, when the run starts)."""
    want, _, after = os.environ.get(CRASH_ENV, "").partition(":")
    return _CrashAfterRows(int(after)) if want == str(rank) else _keep_running


def journal_key(job: Job) -> str:
    return str(job.path)


def run_fingerprint(backend: Backend, options: PredictOptions) -> str:
    """What decides the masks (model file digest, scale, threshold, TTA, CRF, precision, tiles): journal rows
    and mask files made with anything else are not reused by ``skip_existing``."""
    inf = backend.config.inference
    crf, _ = crf_setting(backend, options)
    tiles = {"tile": [options.tile, options.tile_overlap]} if options.tile is not None else {}
    return fingerprint({**tiles,
        "model": model_digest(backend.path, backend.config.source), "n_classes": backend.config.model.n_classes,
        "scale": inf.scale if options.scale is None else options.scale,
        "threshold": inf.threshold if options.threshold is None else options.threshold,
        "tta": options.tta, "crf": asdict(crf) if crf is not None else None,
        "precision": backend.precision,
    })


def on_main(group: Group, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank; a UserError there is raised on every rank."""
    outcome: tuple[bool, Any] | None = None
    if group.main:
        try:
            outcome = (True, fn())
        except UserError as e:
            outcome = (False, str(e))
    ok, value = group.broadcast(outcome)
    if not ok:
        raise (UserError(value) if group.main else SharedError(value))
    return value


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as predicted (EXIF rotation applied), from the header only; None if unreadable."""
    try:
        with open_image(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - unreadable input: it is reported when predicted
        return None


def _overlay_there(job: Job) -> bool:
    """True unless the job asks for an overlay that is not on disk."""
    return job.overlay is None or job.overlay.is_file()


def read_existing(job: Job, values: Sequence[Any], fingerprint: str) -> np.ndarray | None:
    """The class mask stored in a previous run's output, if that output is complete, fits the input and
    was made by a run with the same ``fingerprint`` (model and options), and every other output the job asks
    for (its overlay) is there too: a run stopped between the two (or a full disk) predicts it again."""
    if job.output is None or not job.output.is_file() or not _overlay_there(job):
        return None
    if mask_fingerprint(job.output) != fingerprint:
        return None  # another model / options, or a file this tool did not write: predict again
    try:
        with Image.open(job.output) as img:
            img.verify()
        size = image_size(job.path)
        mask = load_mask(job.output)
        if size is None or (mask.shape[1], mask.shape[0]) != size:
            return None
        return mask_to_index(mask, values, job.output).astype(np.uint8 if len(values) <= 256 else np.int32)
    except Exception:  # noqa: BLE001 - any problem with an old output: predict again
        return None


def reusable(jobs: Sequence[Job], rows: dict[str, Any], fingerprint: str) -> list[int]:
    """Indices of jobs whose journal row fits the image and whose mask file (if any) was written by a run
    with the same ``fingerprint``."""
    done = []
    for job in jobs:
        row = rows.get(journal_key(job))
        if job.error is not None or row is None or row.id != job.id:
            continue
        if job.output is not None and mask_fingerprint(job.output) != fingerprint:
            continue  # missing, or overwritten by another model's run: predict it again to write the mask
        if not _overlay_there(job):
            continue  # its overlay was asked for and never written: predict it again
        if image_size(job.path) == (row.width, row.height):
            done.append(job.index)
    return done


def check_same_run(group: Group, jobs: Sequence[Job], fp: str, backend: Backend) -> None:
    """Under torchrun every rank must split the same list and make the same masks."""
    plan = hashlib.sha256("\n".join(f"{j.path}\0{j.output}\0{j.overlay}" for j in jobs).encode()).hexdigest()
    seen = group.gather((plan, fp))
    if any(s[0] != seen[0][0] for s in seen):
        raise SharedError("predict: the processes found different input files; give every machine the same "
                          "inputs (a shared folder) and the same command")
    if any(s[1] != seen[0][1] for s in seen):
        raise SharedError(f"-m {backend.path}: the processes loaded different model files or options; "
                          "give every machine the same model file")


def resume_plan(jobs: Sequence[Job], rle_path: Path | None, options: PredictOptions, fp: str
                ) -> tuple[str, list[int], int]:
    """(run id, indices of jobs whose journal rows are reused, journal lines not trusted); on rank 0."""
    if rle_path is None:
        return new_run_id(), [], 0
    folder = journal_dir(rle_path)
    check_rle_target(rle_path)
    if not options.skip_existing:  # a fresh run: forget an earlier run's journal
        try:
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"--rle {rle_path}: cannot remove the old journal {folder} ({first_line(e)})"
                            ) from None
        return new_run_id(), [], 0
    rows, untrusted = read_journal(folder, fp)
    return new_run_id(), reusable(jobs, rows, fp), untrusted


def merge_submission(jobs: Sequence[Job], want: list[int], rle_path: Path, fp: str, run_id: str,
                     keep_journal: bool) -> int:
    """Write the submission rows of jobs ``want`` from the journal, in input order (on rank 0); the journal
    is removed unless ``keep_journal`` (some files failed: a rerun with --resume uses it)."""
    folder = journal_dir(rle_path)
    rows, _ = read_journal(folder, fp, last=run_id)
    missing = [i for i in want if journal_key(jobs[i]) not in rows]
    if missing:
        raise UserError(f"--rle {rle_path}: {len(missing)} rows written by other processes are not in "
                        f"{folder} (first: {jobs[missing[0]].path}); put the submission on a "
                        "filesystem that every machine shares")
    try:
        n = write_submission(rle_path, [(jobs[i].id, rows[journal_key(jobs[i])].rle) for i in want])
    except (OSError, ValueError) as e:
        raise UserError(f"--rle {rle_path}: cannot write the submission ({first_line(e)})") from None
    if not keep_journal:  # all done: the journal is no longer needed
        shutil.rmtree(folder, ignore_errors=True)
    return n
