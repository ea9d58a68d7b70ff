"""A predict run composed from its stages: :func:`iter_predictions` (load -> batch + model ->
post-process) and :func:`predict_files` (plan -> resume -> predict this process's share -> write masks,
overlays and journal rows -> merge the submission)."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.errors import UserError, first_line
from unet_deploy.images.overlay import display_available, show_overlay
from unet_deploy.images.rle import rle_encode
from unet_deploy.predict.batch import BatchedModel
from unet_deploy.predict.load import ImageLoader, Loaded, ordered_map
from unet_deploy.predict.masks import (
    crf_results_in_order,
    logits_to_outputs,
    results_in_order,
    with_tta,
)
from unet_deploy.predict.plan import plan_run
from unet_deploy.predict.records import (
    Job,
    PredictInterrupted,
    PredictOptions,
    PredictResult,
    PredictSummary,
    crf_setting,
)
from unet_deploy.predict.resume import (
    check_same_run,
    crash_hook,
    journal_key,
    merge_submission,
    on_main,
    resume_plan,
    run_fingerprint,
)
from unet_deploy.predict.shard import Group, JournalRow, JournalWriter, journal_dir
from unet_deploy.predict.shard import split as split_jobs
from unet_deploy.predict.write import output_values, write_result
from unet_deploy.runtime.base import Backend

__all__ = ["iter_predictions", "predict_arrays", "predict_files", "predict_loaded"]


def iter_predictions(backend: Backend, jobs: Sequence[Job], options: PredictOptions | None = None,
                     fingerprint: str | None = None) -> Iterator[PredictResult]:
    """Predict every job and yield one :class:`PredictResult` per job, in job order.

    Consecutive images of the same network-input size are batched (``options.batch_size``); with
    ``options.tta`` each batch also runs mirrored; with ``options.crf`` the probabilities at the original
    size go through dense CRF in ``options.crf_workers`` processes. Bad files give results with ``error``.
    With ``options.skip_existing`` an output whose stored fingerprint equals ``fingerprint`` (default:
    :func:`run_fingerprint` of ``backend`` and ``options``) is read back instead of predicted.

    For binary models (one sigmoid or two softmax outputs) a pixel is foreground when its probability
    exceeds the threshold; with CRF the probabilities are first re-weighted so that the threshold maps to
    0.5 (:func:`unet_deploy.images.crf.threshold_prior`). Models with more classes take the argmax.
    """
    options = options or PredictOptions()
    if options.skip_existing and fingerprint is None:
        fingerprint = run_fingerprint(backend, options)
    loader = ImageLoader(backend.config.model.n_channels, output_values(backend, options), options.skip_existing,
                         fingerprint or "")
    yield from _model_and_postprocess(backend, ordered_map(loader, jobs, options.loader_threads), len(jobs),
                                      options)


def predict_arrays(backend: Backend, images: Sequence[np.ndarray], options: PredictOptions | None = None
                   ) -> Iterator[PredictResult]:
    """Predict decoded images (uint8 (H, W, C), as :func:`unet_deploy.images.image_io.load_image` returns them) through
    the same batching, model and post-processing stages as files: one :class:`PredictResult` per image,
    in order; a job's ``path`` is ``<image N>``."""
    options = options or PredictOptions()
    loaded = (Loaded(Job(i, Path(f"<image {i}>")), image=np.asarray(image)) for i, image in enumerate(images))
    yield from _model_and_postprocess(backend, loaded, len(images), options)


def predict_loaded(backend: Backend, loaded: Iterable[Loaded], n_jobs: int, options: PredictOptions
                   ) -> Iterator[PredictResult]:
    """The stages after loading, for images decoded elsewhere (e.g. read by Ray Data): batch + model (with
    flip TTA when asked) -> post-process (mask, or CRF) -> one result per item, in order. ``n_jobs``: the
    number of items (no batch is larger)."""
    yield from _model_and_postprocess(backend, loaded, n_jobs, options)


def _model_and_postprocess(backend: Backend, loaded: Iterable[Loaded], n_jobs: int, options: PredictOptions
                           ) -> Iterator[PredictResult]:
    """batch + model (with flip TTA when asked) -> post-process (mask, or CRF) -> results in job order."""
    backend = with_tta(backend, options)
    inference = backend.config.inference
    scale = inference.scale if options.scale is None else options.scale
    threshold = inference.threshold if options.threshold is None else options.threshold
    inferred = BatchedModel(backend, options, scale, n_jobs).run(loaded)
    crf, _ = crf_setting(backend, options)
    outputs = logits_to_outputs(inferred, threshold, crf is not None)
    keep_image = crf is not None or options.viz or options.show
    if crf is not None:
        yield from crf_results_in_order(outputs, crf, options.crf_workers, keep_image)
    else:
        yield from results_in_order(outputs, keep_image)


class _PlainBar:
    """What predict needs of a rich progress bar when none is shown (rich is not even imported)."""

    class console:  # noqa: N801 - mirrors ``Progress.console``
        @staticmethod
        def print(text: str, **_: Any) -> None:
            print(text, file=sys.stderr, flush=True)

    def __enter__(self) -> _PlainBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *_: Any, **__: Any) -> Any:
        return 0

    def advance(self, *_: Any) -> None:
        return None


class _Share:
    """This process's share of a :func:`predict_files` run: predicts its jobs, writes their masks, overlays
    and journal rows, and counts what happened (``local``; ``ok`` = indices done or skipped, ``wrote`` =
    indices predicted). Failures go to ``summary.errors`` and to ``on_error`` (default: stderr)."""

    def __init__(self, backend: Backend, options: PredictOptions, fp: str, values: list[Any],
                 writer: JournalWriter | None, group: Group, summary: PredictSummary,
                 on_error: Callable[[str], None] | None):
        self.backend, self.options, self.fp, self.values = backend, options, fp, values
        self.writer, self.group, self.summary, self.on_error = writer, group, summary, on_error
        self.local = PredictSummary()
        self.ok: list[int] = []  # job indices done or skipped
        self.wrote: list[int] = []  # job indices predicted
        self.after_journal_row = crash_hook(group.rank)  # the test hook, read once
        self.show = options.show and display_available()
        self.bar: Any = None

    def run(self, mine: Sequence[Job]) -> None:
        """Ctrl-C raises KeyboardInterrupt with ``done`` = files finished."""
        show_bar = self.options.progress and self.group.main and len(mine) > 1 and sys.stderr.isatty()
        if show_bar:
            from unet_deploy.progress import file_progress  # rich: only imported when a bar is shown
        with file_progress(True) if show_bar else _PlainBar() as bar:
            self.bar = bar
            world = self.group.world
            task = bar.add_task("predict" if world == 1 else f"predict (rank 0 of {world})", total=len(mine))
            try:
                for res in iter_predictions(self.backend, mine, self.options, fingerprint=self.fp):
                    bar.advance(task)
                    self._finish(res)
            except KeyboardInterrupt as e:
                e.done = len(self.ok)  # type: ignore[attr-defined]
                raise

    def _report(self, line: str) -> None:
        self.summary.errors.append(line)
        self.local.failed += 1
        if self.on_error is not None:
            self.on_error(line)
        else:
            self.bar.console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)

    def _finish(self, res: PredictResult) -> None:
        if res.error is not None:
            self._report(res.error)
            return
        if not res.skipped and not self._write(res):
            return
        if self.writer is not None and not self._journal(res, self.writer):
            return
        self.ok.append(res.job.index)
        if res.skipped:
            self.local.skipped += 1
        else:
            self.local.predicted += 1
            self.wrote.append(res.job.index)

    def _write(self, res: PredictResult) -> bool:
        try:
            write_result(res, self.values, self.fp, self.summary.written)
        except OSError as e:
            self._report(f"{res.job.path}: cannot write output ({first_line(e)})")
            return False
        if self.show and res.image is not None:
            show_overlay(res.job.path.name, res.image, res.require_mask())
        return True

    def _journal(self, res: PredictResult, writer: JournalWriter) -> bool:
        job, mask = res.job, res.require_mask()
        height, width = mask.shape[:2]
        try:
            writer.append(JournalRow(journal_key(job), job.id, height, width, rle_encode(mask)))
        except OSError as e:
            self._report(f"{job.path}: cannot write to the journal {writer.path} ({first_line(e)})")
            return False
        self.after_journal_row(writer.rows)
        return True


def _open_journal(folder: Path | None, rle_path: Path | None, run_id: str, fp: str, group: Group
                  ) -> JournalWriter | None:
    if folder is None:
        return None
    try:
        return JournalWriter(folder / f"{run_id}.rank{group.rank}-of-{group.world}.jsonl", fp)
    except OSError as e:
        raise UserError(f"--rle {rle_path}: cannot write the journal in {folder} ({first_line(e)})") from None


def _add_totals(summary: PredictSummary, counts: list[Any], jobs: Sequence[Job]) -> None:
    """Every rank's counts and outputs, in input order, into ``summary``."""
    summary.predicted = sum(c[0] for c in counts)
    summary.skipped = sum(c[1] for c in counts)
    summary.failed = sum(c[2] for c in counts)
    predicted = sorted(i for c in counts for i in c[4])
    summary.masks = [jobs[i].output for i in predicted if jobs[i].output is not None]
    summary.overlays = [jobs[i].overlay for i in predicted if jobs[i].overlay is not None]


def predict_files(backend: Backend, inputs: Sequence[str | Path], options: PredictOptions | None = None,
                  outputs: Sequence[str | Path] | None = None,
                  on_error: Callable[[str], None] | None = None, group: Group | None = None) -> PredictSummary:
    """Predict files/folders/globs and write masks, overlays and the RLE submission as ``options`` say.

    Each failing file is reported once through ``on_error`` (default: one line on stderr) and counted;
    the others still run. ``summary.exit_code`` is 1 when any file failed.

    ``group`` (:func:`unet_deploy.predict.shard.process_group` under torchrun): each rank predicts every
    ``world``-th input that is not done yet, journals its submission rows, and rank 0 merges them into
    ``options.rle`` in input order; the returned counts are the totals of all ranks on every rank.
    With ``options.rle`` the rows go to a journal beside the file first (:mod:`unet_deploy.predict.shard`); with
    ``options.skip_existing`` the rows an interrupted run journaled are reused instead of predicted.
    """
    options = options or PredictOptions()
    group = group if group is not None else Group()
    start = time.perf_counter()
    jobs = plan_run(inputs, outputs, save=options.save, viz=options.viz)
    values = output_values(backend, options)
    summary = PredictSummary(total=len(jobs), processes=group.world)
    rle_path = Path(options.rle) if options.rle is not None else None
    folder = journal_dir(rle_path) if rle_path is not None else None
    fp = run_fingerprint(backend, options)
    if group.world > 1:
        check_same_run(group, jobs, fp, backend)
    run_id, reused, summary.untrusted = on_main(group, functools.partial(resume_plan, jobs, rle_path, options, fp))
    summary.reused = len(reused)
    done = set(reused)
    todo = [j for j in jobs if j.index not in done]
    mine = [todo[i] for i in split_jobs(len(todo), group.rank, group.world)]

    writer = _open_journal(folder, rle_path, run_id, fp, group)
    try:
        share = _Share(backend, options, fp, values, writer, group, summary, on_error)
        share.run(mine)
    except KeyboardInterrupt as e:
        raise PredictInterrupted(getattr(e, "done", 0) + len(done), len(jobs)) from None
    finally:
        if writer is not None:
            writer.close()

    counts = group.gather((share.local.predicted, share.local.skipped, share.local.failed, share.ok, share.wrote))
    _add_totals(summary, counts, jobs)
    if rle_path is not None:
        want = sorted(done.union(*(c[3] for c in counts)))
        merge = functools.partial(merge_submission, jobs, want, rle_path, fp, run_id,
                                  keep_journal=bool(summary.failed))
        summary.rle_rows = on_main(group, merge)
        summary.rle = rle_path
        if summary.failed:
            summary.journal = folder
    summary.seconds = time.perf_counter() - start
    return summary
