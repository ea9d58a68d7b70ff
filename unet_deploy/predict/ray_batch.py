"""Batch prediction on a Ray cluster: ``unet-deploy predict --ray-address auto|HOST:PORT``.

The driver plans, journals and writes the run as :func:`~unet_deploy.predict.driver.predict_files` does; the
cluster reads the files and predicts::

    plan_run(specs)                       predict's own listing: the order, output names and per-file
                                          errors of single-process predict                   (driver)
    resume_plan / read_existing           --resume: journal rows and masks an earlier run left  (driver)
    ray.data.read_binary_files(paths)     Ray Data resolves and reads the other files (read tasks take no
                                          CPU slot, so a pool of actors on every CPU cannot starve them)
      .map_batches(BatchPredictor, compute=ActorPoolStrategy(size=N))
                                          actors: decode (load_image_bytes) -> predict_loaded (batching,
                                          model, TTA, tiles, CRF) -> mask PNG, overlay PNG, RLE row
    each result row                       written atomically, journaled (fsync'd)             (driver)
    merge_submission                      the submission in input order, each row once         (driver)

A lost worker's batches are retried by Ray (Ray Data restarts its actors and re-runs lost tasks); a row that
comes twice is written once. The inputs and the model file must be at the same path on every node (a shared
filesystem); masks, overlays and the submission are written where the driver runs.

Ray is imported only by :func:`import_ray` (``pip install "unet-deploy[ray]"``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.errors import MissingDependencyError, OptionError, UserError, first_line
from unet_deploy.fileio import atomic_write_bytes
from unet_deploy.images.image_io import load_image_bytes
from unet_deploy.images.rle import rle_encode
from unet_deploy.predict.load import ImageLoader, Loaded, ordered_map
from unet_deploy.predict.plan import plan_run
from unet_deploy.predict.records import Job, PredictInterrupted, PredictOptions, PredictResult, PredictSummary
from unet_deploy.predict.resume import crash_hook, journal_key, merge_submission, read_existing, resume_plan
from unet_deploy.predict.shard import JournalRow, JournalWriter, journal_dir
from unet_deploy.predict.write import mask_bytes, mask_format, output_values, overlay_bytes
from unet_deploy.runtime.base import Backend

__all__ = ["INSTALL_HINT", "import_ray", "ModelSpec", "Placement", "placement", "BatchPredictor", "RayRun",
           "predict_on_ray"]

INSTALL_HINT = 'pip install "unet-deploy[ray]"'
#: The most blocks Ray Data splits the files into (unless the pool has more than an eighth as many actors).
MAX_BLOCKS = 2000
#: How long the actors may take to start (Ray Data waits for the whole pool before the first batch).
ACTOR_START_S = 600
#: Batches queued on one actor: one running, one waiting (so it never idles), and the rest for the others.
IN_FLIGHT = 2
#: The output columns of :class:`BatchPredictor` (one row per input file).
COLUMNS = ("path", "error", "fp", "height", "width", "rle", "mask", "overlay", "node")


def import_ray() -> Any:
    """The ``ray`` module with Ray Data loaded, or a one-line :class:`MissingDependencyError` saying how to
    install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data (pandas, pyarrow) is part of the extra
    except ImportError:
        raise MissingDependencyError(f"--ray-address needs Ray (with Ray Data): {INSTALL_HINT}") from None
    return ray


# ------------------------------------------------------------------------------------- actors
@dataclass(frozen=True)
class ModelSpec:
    """How each actor loads the model: predict's model flags (the file must be at ``path`` on every node)."""

    path: str
    backend: str
    precision: str | None = None
    threads: int | None = None
    channels_last: bool = False
    compile: str | None = None

    def load(self, device: str, cpus: float) -> Backend:
        """The backend for one actor on ``device`` holding ``cpus`` CPUs (its share of the node's cores)."""
        from unet_deploy.runtime.backend_options import options_for
        from unet_deploy.runtime.cpu_share import share_cores, usable_cpus
        from unet_deploy.runtime.loader import load_backend

        processes = max(1, usable_cpus() // max(1, int(cpus)))  # actors of this size that fit on the node
        threads = share_cores(self.backend, device, processes, self.threads)
        options = options_for(self.backend, precision=self.precision, threads=threads,
                              channels_last=self.channels_last, compile=self.compile)
        return load_backend(Path(self.path), self.backend, device, options)


@dataclass(frozen=True)
class Placement:
    """The actor pool: ``size`` actors of ``cpus`` CPUs and ``gpus`` GPUs each, running on ``device``."""

    size: int
    cpus: float
    gpus: float
    device: str


def placement(resources: dict[str, float], device: str, threads: int | None, concurrency: int | None) -> Placement:
    """One actor per GPU of the cluster (``device`` auto or cuda), else one per ``threads`` (default 1) CPUs;
    ``concurrency`` (``--ray-concurrency``) overrides the number of actors.

    Args:
        resources: ``ray.cluster_resources()``.
        device: ``--device``: auto, cpu, cuda or cuda:N (each GPU actor sees its one GPU as cuda:0).
        threads: ``--threads`` (CPUs per CPU actor).
        concurrency: ``--ray-concurrency``, or None.

    Returns:
        The pool's size and each actor's resources.
    """
    if concurrency is not None and concurrency < 1:
        raise OptionError(f"--ray-concurrency {concurrency}: use 1 or more (or leave it out: one actor per GPU, "
                          "else per CPU of the cluster)")
    gpus = int(resources.get("GPU", 0))
    if device != "cpu" and gpus >= 1:
        return Placement(concurrency or gpus, 1.0, 1.0, "cuda")
    if device.startswith("cuda"):
        raise OptionError(f"--device {device}: the Ray cluster has no GPUs; use --device cpu or auto")
    cpus = float(threads or 1)
    return Placement(concurrency or max(1, int(resources.get("CPU", 1) // cpus)), cpus, 0.0, "cpu")


def _decode(job: Job, data: bytes, channels: int) -> Loaded:
    """A file's bytes as :class:`~unet_deploy.predict.load.ImageLoader` loads the file (the same errors)."""
    try:
        return Loaded(job, image=load_image_bytes(data, job.path, channels))
    except UserError as e:
        return Loaded(job, error=str(e))
    except (OSError, ValueError, MemoryError) as e:
        return Loaded(job, error=f"{job.path}: cannot read image ({first_line(e)})")


class BatchPredictor:
    """A Ray Data actor: a batch of files' bytes -> one row per file (:data:`COLUMNS`): its mask and overlay
    as the PNG bytes ``predict`` writes, its RLE, or its error; ``fp`` is the run fingerprint of this actor's
    model, which the driver checks against its own."""

    def __init__(self, model: ModelSpec, options: PredictOptions, place: Placement, formats: dict[str, str]):
        from unet_deploy.predict.resume import run_fingerprint

        self.backend = model.load(place.device, place.cpus)
        self.options = options
        self.formats = formats  #: input path -> mask format, where it is not PNG
        self.values = output_values(self.backend, options)
        self.fp = run_fingerprint(self.backend, options)
        self.channels = self.backend.config.model.n_channels
        import ray

        self.node = ray.get_runtime_context().get_node_id()  #: where this actor runs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Predict one batch (the ``bytes`` and ``path`` columns of ``ray.data.read_binary_files``)."""
        from unet_deploy.predict.driver import predict_loaded

        paths = [str(Path(p)) for p in batch["path"]]
        loaded = [_decode(Job(i, Path(p)), bytes(data), self.channels)
                  for i, (p, data) in enumerate(zip(paths, batch["bytes"], strict=True))]
        rows = [self._row(res) for res in predict_loaded(self.backend, loaded, len(loaded), self.options)]
        return {c: np.array([r[c] for r in rows], dtype=np.int64 if c in ("height", "width") else object)
                for c in COLUMNS}

    def _row(self, res: PredictResult) -> dict[str, Any]:
        path = str(res.job.path)
        row: dict[str, Any] = {"path": path, "error": res.error or "", "fp": self.fp, "height": 0, "width": 0,
                               "rle": "", "mask": b"", "overlay": b"", "node": self.node}
        if res.error is not None or res.mask is None:
            return row
        mask = res.mask
        row["height"], row["width"] = mask.shape[:2]
        if self.options.rle is not None:
            row["rle"] = rle_encode(mask)
        if self.options.save:
            row["mask"] = mask_bytes(mask, self.values, self.formats.get(path, "PNG"), self.fp)
        if self.options.viz and res.image is not None:
            row["overlay"] = overlay_bytes(res.image, mask)
        return row


# ------------------------------------------------------------------------------------- driver
@dataclass
class RayRun:
    """The driver's side of a run: turns result rows into masks, overlays and journal rows as
    :func:`~unet_deploy.predict.driver.predict_files` writes them, and counts what happened."""

    jobs: Sequence[Job]
    options: PredictOptions
    fp: str
    writer: JournalWriter | None
    summary: PredictSummary
    report_line: Any  #: called with the one-line error of each failed file
    model_path: str = ""
    by_path: dict[str, Job] = field(default_factory=dict)  #: the files handed to Ray, by the path Ray returns
    ok: list[int] = field(default_factory=list)  #: job indices done (predicted, skipped or reused)
    wrote: list[int] = field(default_factory=list)  #: job indices predicted
    seen: set[int] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)  #: the nodes whose actors predicted a file

    def __post_init__(self) -> None:
        self.after_journal_row = crash_hook(0)  # the test hook of predict: the driver is rank 0

    def report(self, line: str) -> None:
        """One failed file: counted, and reported as ``predict`` reports it."""
        self.summary.errors.append(line)
        self.summary.failed += 1
        self.report_line(line)

    def finish_row(self, row: Any) -> None:
        """One row of :class:`BatchPredictor`: written and journaled (a row of a retried batch seen before
        is dropped)."""
        job = self.by_path.get(str(row["path"]))
        if job is None or job.index in self.seen:
            return
        self.seen.add(job.index)
        self.nodes.add(str(row["node"]))
        if row["fp"] != self.fp:
            raise UserError(f"-m {self.model_path}: a Ray worker loaded the model with other settings than "
                            "this machine (e.g. another precision chosen for its CPU); give --precision")
        if row["error"]:
            self.report(str(row["error"]).replace(str(row["path"]), str(job.path)))
            return
        if not self._write(job, bytes(row["mask"]), bytes(row["overlay"])):
            return
        if not self._journal(job, int(row["height"]), int(row["width"]), str(row["rle"])):
            return
        self.ok.append(job.index)
        self.wrote.append(job.index)
        self.summary.predicted += 1

    def finish_skipped(self, job: Job, mask: np.ndarray) -> None:
        """A job whose mask an earlier run wrote (``--resume``): journaled again, not predicted."""
        self.seen.add(job.index)
        if self._journal(job, mask.shape[0], mask.shape[1], rle_encode(mask) if self.writer else ""):
            self.ok.append(job.index)
            self.summary.skipped += 1

    def _write(self, job: Job, mask: bytes, overlay: bytes) -> bool:
        try:
            for target, data in ((job.output, mask), (job.overlay, overlay)):
                if target is not None and data:
                    atomic_write_bytes(target, data)
                    self.summary.written.append(target)
        except OSError as e:
            self.report(f"{job.path}: cannot write output ({first_line(e)})")
            return False
        return True

    def _journal(self, job: Job, height: int, width: int, rle: str) -> bool:
        if self.writer is None:
            return True
        try:
            self.writer.append(JournalRow(journal_key(job), job.id, height, width, rle))
        except OSError as e:
            self.report(f"{job.path}: cannot write to the journal {self.writer.path} ({first_line(e)})")
            return False
        self.after_journal_row(self.writer.rows)
        return True


def _user_error(error: BaseException) -> UserError | None:
    """The innermost :class:`UserError` in a Ray exception's causes (an actor's one-line error), if any."""
    found: UserError | None = None
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            found = current
        current = getattr(current, "cause", None) or current.__cause__
    return UserError(str(found).rsplit("UserError: ", 1)[-1], found.exit_code) if found is not None else None


@contextlib.contextmanager
def _connected(ray: Any, address: str) -> Iterator[None]:
    """Connect this process to the Ray cluster at ``address`` (unless a script already did) and Ray Data's
    output quiet: predict prints its own lines."""
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # every actor loads its model before the first batch (the work is spread over all of them, and a pool the
    # cluster cannot place is an error, not a hang); an autoscaler has this long to add nodes
    context.wait_for_min_actors_s = ACTOR_START_S
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"--ray-address {address}: cannot connect to a Ray cluster ({first_line(e)}); start one "
                        "with `ray start --head`, or give HOST:PORT of its head node") from None
    try:
        yield
    finally:
        ray.shutdown()


def _dataset(ray: Any, paths: list[str], model: ModelSpec, options: PredictOptions, place: Placement,
             formats: dict[str, str]) -> Any:
    """Ray Data reads ``paths`` (read tasks hold no CPU slot: the actors may take them all) and a pool of
    ``place.size`` :class:`BatchPredictor` actors predicts them.

    A block (the files one read task returns) goes to one actor: blocks of one batch each spread a small run
    over every actor and lose little with a lost node; a large run has at most ``MAX_BLOCKS`` (or 8 per actor).
    Read tasks hold no CPU, so their number at once is capped (one per 4 actors, at least 2): each runs in a
    worker process of its own, and an uncapped burst of them starting takes the CPUs from the actors."""
    batch = max(4, options.batch_size)
    blocks = min(math.ceil(len(paths) / batch), max(MAX_BLOCKS, 8 * place.size))
    ds = ray.data.read_binary_files(paths, include_paths=True, ignore_missing_paths=True, num_cpus=0,
                                    override_num_blocks=blocks, concurrency=max(2, place.size // 4))
    return ds.map_batches(
        BatchPredictor, batch_format="numpy", batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=place.size, max_tasks_in_flight_per_actor=IN_FLIGHT),
        num_cpus=place.cpus, num_gpus=place.gpus or None,
        fn_constructor_kwargs={"model": model, "options": options, "place": place, "formats": formats})


def _skip_existing(run: RayRun, todo: list[Job], values: list[Any]) -> list[Job]:
    """``--resume``: the jobs of ``todo`` whose mask file an earlier run wrote are finished here; the others
    are returned."""
    def existing(job: Job) -> tuple[Job, np.ndarray | None]:
        return job, read_existing(job, values, run.fp)

    rest = []
    for job, mask in ordered_map(existing, todo, run.options.loader_threads):
        if mask is None:
            rest.append(job)
        else:
            run.finish_skipped(job, mask)
    return rest


def _hand_to_ray(run: RayRun, todo: list[Job], values: list[Any], channels: int) -> list[str]:
    """The paths of ``todo`` for Ray Data (``run.by_path``); a job that is no file fails here, as in predict."""
    loader = ImageLoader(channels, values, False, run.fp)
    paths = []
    for job in todo:
        if job.error is None and job.path.is_file():
            path = str(Path(os.path.abspath(job.path)))
            run.by_path[path] = job
            paths.append(path)
        else:
            run.report(loader(job).error or f"{job.path}: not a file")
    return paths


def _never_returned(run: RayRun, values: list[Any], channels: int) -> None:
    """Files Ray Data did not return (gone since they were listed): reported as predict reports them."""
    loader = ImageLoader(channels, values, False, run.fp)
    for job in run.by_path.values():
        if job.index not in run.seen:
            run.seen.add(job.index)
            run.report(loader(job).error or f"{job.path}: Ray Data returned no result for it; run again with --resume")


def _consume(ray: Any, run: RayRun, paths: list[str], model: ModelSpec, place: Placement) -> None:
    """Run the dataset and finish each row as it comes (any order; the merge restores input order)."""
    if not paths:
        return
    formats = {p: mask_format(job.output) for p, job in run.by_path.items()
               if job.output is not None and mask_format(job.output) != "PNG"}
    options = replace(run.options, show=False, progress=False, crf_workers=max(1, int(place.cpus)))
    from unet_deploy.progress import file_progress  # rich; a bar only on a terminal

    with file_progress(run.options.progress and len(paths) > 1) as bar:
        task = bar.add_task(f"predict (Ray, {place.size} actors)", total=len(paths))
        run.report_line = _printer(bar, run.report_line)
        try:
            for row in _dataset(ray, paths, model, options, place, formats).iter_rows():
                before = len(run.seen)
                run.finish_row(row)
                bar.advance(task, len(run.seen) - before)
        except (KeyboardInterrupt, UserError):
            raise
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"--ray-address: the cluster did not start {place.size} actors of {_each(place)} in "
                            f"{ACTOR_START_S} s; give fewer with --ray-concurrency") from None
        except Exception as e:  # noqa: BLE001 - an actor's one-line error (e.g. out of memory) is the run's
            error = _user_error(e)
            if error is None:
                raise
            raise error from None


def _printer(bar: Any, report_line: Any) -> Any:
    """Print error lines above the progress bar (``predict``'s ``error: LINE``), unless a caller gave its own."""
    if report_line is not None:
        return report_line
    return lambda line: bar.console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _each(place: Placement) -> str:
    return f"{place.gpus:g} GPU" if place.gpus else f"{place.cpus:g} CPU"


def _ray_line(nodes: int, place: Placement, run: RayRun) -> str:
    """``Ray: 3 actors of 1 CPU on 2 nodes, results from 2 nodes``: the pool, and where the results came from."""
    return (f"Ray: {_plural(place.size, 'actor')} of {_each(place)} on {_plural(nodes, 'node')}, results from "
            f"{_plural(len(run.nodes), 'node')}")


def predict_on_ray(backend: Backend, model: ModelSpec, specs: Sequence[str | Path],
                   outputs: Sequence[str | Path] | None, options: PredictOptions, *, address: str, device: str,
                   concurrency: int | None = None, on_error: Any = None) -> tuple[PredictSummary, str]:
    """What :func:`~unet_deploy.predict.driver.predict_files` does, with the files read and predicted on the
    Ray cluster at ``address``.

    Args:
        backend: the model loaded on this machine (its run fingerprint and mask values decide what is reused
            and written; every actor's must be the same).
        model: how the actors load the same model.
        specs: files, folders or globs, as ``predict`` takes them.
        outputs: ``-o`` names or folder, as ``predict`` takes them.
        options: predict's options (``rle``, ``skip_existing``, ``save``, ``viz``, ...).
        address: ``auto``, ``HOST:PORT`` of the head node, or anything else ``ray.init`` takes.
        device: ``--device``: decides between GPU and CPU actors.
        concurrency: ``--ray-concurrency`` (actors), or None for one per GPU, else per CPU of the cluster.
        on_error: called with each failed file's one-line error (default: ``error: LINE`` on stderr).

    Returns:
        The summary (counts, outputs in input order, the submission's rows) and a line saying where it ran.
    """
    ray = import_ray()
    start = time.perf_counter()
    jobs = plan_run(specs, outputs, save=options.save, viz=options.viz)
    values = output_values(backend, options)
    from unet_deploy.predict.resume import run_fingerprint

    fp = run_fingerprint(backend, options)
    summary = PredictSummary(total=len(jobs))
    rle_path = Path(options.rle) if options.rle is not None else None
    run_id, reused, summary.untrusted = resume_plan(jobs, rle_path, options, fp)
    summary.reused = len(reused)
    done = set(reused)
    todo = [j for j in jobs if j.index not in done]
    writer = JournalWriter(journal_dir(rle_path) / f"{run_id}.ray.jsonl", fp) if rle_path is not None else None
    run = RayRun(jobs, options, fp, writer, summary, on_error, model_path=str(backend.path))
    channels = backend.config.model.n_channels
    try:
        with _connected(ray, address):
            place = placement(ray.cluster_resources(), device, model.threads, concurrency)
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
            if options.skip_existing:
                todo = _skip_existing(run, todo, values)
            _consume(ray, run, _hand_to_ray(run, todo, values, channels), model, place)
            _never_returned(run, values, channels)
            where = _ray_line(nodes, place, run)
    except KeyboardInterrupt:
        raise PredictInterrupted(len(run.ok) + len(done), len(jobs)) from None
    finally:
        if writer is not None:
            writer.close()
    _totals(run, rle_path, sorted(done.union(run.ok)), run_id)
    summary.seconds = time.perf_counter() - start
    return summary, where


def _totals(run: RayRun, rle_path: Path | None, want: list[int], run_id: str) -> None:
    """Outputs in input order and, with ``--rle``, the submission merged from the journal."""
    summary, jobs = run.summary, run.jobs
    wrote = sorted(run.wrote)
    summary.masks = [p for i in wrote if (p := jobs[i].output) is not None]
    summary.overlays = [p for i in wrote if (p := jobs[i].overlay) is not None]
    if rle_path is not None:
        summary.rle_rows = merge_submission(jobs, want, rle_path, run.fp, run_id, keep_journal=bool(summary.failed))
        summary.rle = rle_path
        if summary.failed:
            summary.journal = journal_dir(rle_path)
