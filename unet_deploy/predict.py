"""The prediction file pipeline: inputs -> masks on disk, overlays and a Kaggle submission.

::

    expand_inputs(files | folders | globs)   ordered, de-duplicated
    plan_jobs(inputs, outputs)              <stem>_OUT.png beside the input, -o names or an -o folder
    iter_predictions(backend, jobs, opts)   load_image -> preprocess -> backend (batched, [flip TTA])
                                            -> probabilities / mask at the original size -> [dense CRF]
                                            yields one PredictResult per job, in input order
    predict_files(backend, inputs, opts)    writes masks / overlays / RLE, returns a PredictSummary

A bad input file never stops a run: its result carries a one-line ``error`` and the others go on.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import glob
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .backends import Backend
from .crf import CRFParams
from .data import (
    FINGERPRINT_KEY,
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    OVERLAY_SUFFIX,
    is_own_output,
    list_images,
    load_image,
    load_mask,
    mask_to_index,
    preprocess,
)
from .errors import UserError
from .fileio import atomic_path

if TYPE_CHECKING:
    from .shard import Group

__all__ = [
    "PredictOptions", "Job", "PredictResult", "PredictSummary", "expand_inputs", "plan_jobs",
    "iter_predictions", "predict_files", "write_mask", "write_overlay", "overlay_image",
    "default_model", "output_values", "check_rle_target", "run_fingerprint", "mask_fingerprint",
    "MASK_SUFFIX", "OVERLAY_SUFFIX", "FINGERPRINT_KEY", "PredictInterrupted",
]

_MASK_FORMATS = {".png": "PNG", ".gif": "GIF", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
_GLOB_CHARS = set("*?[")
_MIN_SIDE = 16  #: four 2x poolings need at least 16 input pixels per side
#: Overlay tint per class (class 0 = background stays untinted); a class whose pixels are close to its tint
#: on average (a green car) gets the palette colour farthest from them instead.
_PALETTE = np.array([[0, 0, 0], [0, 255, 0], [255, 0, 255], [0, 90, 255], [255, 200, 0], [0, 220, 220],
                     [255, 0, 0], [255, 128, 0], [128, 0, 255], [128, 255, 0]], dtype=np.float32)
_MIN_TINT_DISTANCE = 200.0  #: RGB distance between a class's mean colour and its tint, at least (if any can)


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
    crf_params: CRFParams = field(default_factory=CRFParams)
    crf_workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    tta: bool = False
    skip_existing: bool = False
    loader_threads: int = 2  #: threads decoding images ahead of the network
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: use 1 or more")
        if self.scale is not None and not 0 < self.scale <= 4:
            raise UserError(f"--scale {self.scale}: use a factor in (0, 4], e.g. 0.5")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise UserError(f"--mask-threshold {self.threshold}: use a probability in [0, 1]")
        if self.crf_workers < 1:
            raise UserError(f"--crf-workers {self.crf_workers}: use 1 or more")
        if self.mask_values is not None:
            flat = np.asarray(self.mask_values, dtype=object).ravel().tolist()
            if not all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in flat):
                raise UserError(f"--mask-values {_values_text(self.mask_values)}: masks are 8-bit PNGs; give "
                                "integers from 0 to 255, e.g. 0,255")


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


# --------------------------------------------------------------------------------------- inputs
def _expand(specs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """(path, None) for each input file in order; (spec, problem) where a spec yields no file."""
    items: list[tuple[Path, str | None]] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            items.append((p, None))

    for spec in specs:
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_dir():
            found = list_images(p)
            if not found:
                items.append((p, f"{p}: folder has no images ({', '.join(IMAGE_SUFFIXES)})"))
            for q in found:
                add(q)
        elif not p.exists() and _GLOB_CHARS & set(text):
            matches = sorted(glob.glob(str(p), recursive=True))
            found = [Path(m) for m in matches if not (Path(m).is_file() and is_own_output(Path(m)))]
            if not found:
                items.append((p, f"{text}: no file matches this pattern"))
            for q in found:
                add(q)
        else:
            add(p)
    return items


def expand_inputs(specs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, not recursive) and globs -> ordered, de-duplicated paths.

    Returns ``(paths, problems)``: a folder without images or a glob matching nothing is a one-line
    problem. Paths that do not exist are kept, so predicting them reports "not found" in its place.
    Folder and glob expansion leave out this tool's own outputs (``*_OUT.png``, ``*_OVERLAY.png``).
    """
    items = _expand(specs)
    return [p for p, e in items if e is None], [e for _, e in items if e is not None]


def _mask_output_for(path: Path, folder: Path | None) -> Path:
    return (folder if folder is not None else path.parent) / f"{path.stem}{MASK_SUFFIX}.png"


def _overlay_for(output: Path) -> Path:
    stem = output.stem[: -len(MASK_SUFFIX)] if output.stem.endswith(MASK_SUFFIX) else output.stem
    return output.with_name(f"{stem}{OVERLAY_SUFFIX}.png")


def plan_jobs(inputs: Sequence[Path], outputs: Sequence[str | Path] | None = None, save: bool = True,
              viz: bool = False) -> list[Job]:
    """Decide every output name before anything runs.

    ``outputs``: none -> ``<stem>_OUT.png`` beside each input; one existing folder (or a name ending in
    ``/``, or one name without suffix for several inputs) -> ``FOLDER/<stem>_OUT.png``; otherwise exactly
    one name per input. An output equal to an input, or two inputs mapped to one output, is a per-file
    error (the input is never overwritten).
    """
    outputs = [str(o) for o in outputs or []]
    folder: Path | None = None
    names: list[Path | None] = [None] * len(inputs)
    if outputs:
        first = outputs[0]
        as_folder = len(outputs) == 1 and (Path(first).is_dir() or first.endswith(("/", os.sep))
                                           or (len(inputs) > 1 and not Path(first).suffix))
        if as_folder:
            folder = Path(first)
        elif len(outputs) != len(inputs):
            raise UserError(f"-o: {len(outputs)} output names for {len(inputs)} inputs; give one name per "
                            "input or one folder")
        else:
            for o in outputs:
                if Path(o).suffix.lower() not in _MASK_FORMATS:
                    raise UserError(f"-o {o}: masks are written losslessly; use a .png name (or .gif, .bmp, "
                                    ".tif) or a folder")
            names = [Path(o) for o in outputs]
    input_keys = {os.path.normcase(os.path.abspath(p)) for p in inputs}
    claimed: dict[str, Path] = {}
    jobs = []
    for i, path in enumerate(inputs):
        out = names[i] or _mask_output_for(path, folder)
        overlay = _overlay_for(out) if viz else None
        error = None
        for target in (out if save else None, overlay):
            if target is None:
                continue
            key = os.path.normcase(os.path.abspath(target))
            if key in input_keys:
                error = (f"{path}: output {target} is an input file; refusing to overwrite it "
                         "(choose another -o)")
            elif key in claimed:
                error = (f"{path}: output {target} is also the output of {claimed[key]}; use -o FOLDER per "
                         "input folder or give names")
            else:
                claimed[key] = path
        jobs.append(Job(i, path, out if save else None, overlay, error))
    return jobs


# --------------------------------------------------------------------------------------- outputs
def _values_text(values: Sequence[Any]) -> str:
    return ",".join(str(v) for v in values)


def output_values(backend: Backend, options: PredictOptions) -> list[Any]:
    """Pixel value written for each class: --mask-values, else the model's config (0/255 for binary)."""
    inf = backend.config.inference
    n_classes = backend.config.model.n_classes
    if options.mask_values is not None:
        want = max(n_classes, 2)
        if len(options.mask_values) != want:
            raise UserError(f"--mask-values {_values_text(options.mask_values)}: {backend.path} predicts "
                            f"{want} classes; give exactly {want} values, one per class (background first)")
        return list(options.mask_values)
    return inf.output_values(n_classes)


def _mask_image(mask: np.ndarray, values: Sequence[Any]) -> Image.Image:
    from .postprocess import colorize

    pixels = colorize(mask, list(values))
    if pixels.ndim == 3:
        return Image.fromarray(pixels, mode="RGB")
    if pixels.dtype == np.uint8:
        return Image.fromarray(pixels, mode="L")
    return Image.fromarray(pixels.astype(np.int32), mode="I")


def write_mask(path: str | Path, mask: np.ndarray, values: Sequence[Any], fingerprint: str | None = None
               ) -> Path:
    """Write class indices ``mask`` (H, W) as an image of the class ``values``, atomically.

    ``fingerprint`` (PNG only): the run's :func:`run_fingerprint`, stored as the ``unet_deploy`` text
    chunk so that a resumed run reuses the file only when the same model and options made it.
    """
    path = Path(path)
    fmt = _MASK_FORMATS.get(path.suffix.lower(), "PNG")
    img = _mask_image(mask, values)
    extra: dict[str, Any] = {}
    if fingerprint is not None and fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text(FINGERPRINT_KEY, fingerprint)
        extra["pnginfo"] = info
    with atomic_path(path) as tmp:
        img.save(tmp, format=fmt, **extra)
    return path


def mask_fingerprint(path: str | Path) -> str | None:
    """The run fingerprint stored in a mask PNG by :func:`write_mask`; None when there is none."""
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", None) or {}
            value = text.get(FINGERPRINT_KEY)
    except Exception:  # noqa: BLE001 - unreadable or not a PNG: no fingerprint
        return None
    return value if isinstance(value, str) else None


def _tints(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Tint per class: its palette colour, or the palette colour farthest from the class's mean colour
    when that one is closer than ``_MIN_TINT_DISTANCE`` (a red car under a red tint)."""
    n = int(mask.max(initial=0)) + 1
    tints = _PALETTE[np.arange(n) % len(_PALETTE)]  # a copy, one row per class present
    for c in range(1, n):
        under = rgb[mask == c]
        if not len(under):
            continue
        mean = under.reshape(-1, 3).mean(axis=0)
        distance = np.linalg.norm(_PALETTE[1:] - mean, axis=1)
        if np.linalg.norm(tints[c] - mean) < _MIN_TINT_DISTANCE:
            tints[c] = _PALETTE[1 + int(distance.argmax())]
    return tints


def _edges(mask: np.ndarray) -> np.ndarray:
    """True where a pixel's class differs from one of its 4 neighbours (both sides of every boundary)."""
    edge = np.zeros(mask.shape, dtype=bool)
    vertical = mask[1:] != mask[:-1]
    horizontal = mask[:, 1:] != mask[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    return edge


def overlay_image(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image (H, W, 1|3) with each foreground class tinted and outlined; uint8 (H, W, 3).

    Readable on any colour: the tint contrasts with the mean colour under each class (:func:`_tints`), and
    every boundary is drawn as a white line on the foreground side beside a black line on the background
    side.
    """
    rgb = image if image.ndim == 3 and image.shape[2] == 3 else np.repeat(image.reshape(*mask.shape, 1), 3, 2)
    out = rgb.astype(np.float32)
    classes = np.clip(mask.astype(np.int64), 0, None)
    fg = classes > 0
    colours = _tints(out, classes)[classes]
    out = np.where(fg[..., None], (1 - alpha) * out + alpha * colours, out)
    edge = _edges(classes)
    out[edge & fg] = 255.0
    out[edge & ~fg] = 0.0
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_overlay(path: str | Path, image: np.ndarray, mask: np.ndarray) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(overlay_image(image, mask), mode="RGB").save(tmp, format="PNG")
    return path


def display_available() -> bool:
    """True where a window can be opened (never on a headless Linux box)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _show(title: str, image: np.ndarray, mask: np.ndarray) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].set_title(f"{title}: input")
    axes[0].imshow(image.squeeze())
    axes[1].set_title("overlay")
    axes[1].imshow(overlay_image(image, mask))
    for ax in axes:
        ax.axis("off")
    plt.show()
    plt.close(fig)


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) as predicted (EXIF rotation applied), from the header only; None if unreadable."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
            return w, h
    except Exception:  # noqa: BLE001 - unreadable input: it is reported when predicted
        return None


def _read_existing(job: Job, values: Sequence[Any], fingerprint: str) -> np.ndarray | None:
    """The class mask stored in a previous run's output, if that output is complete, fits the input and
    was made by a run with the same ``fingerprint`` (model and options)."""
    if job.output is None or not job.output.is_file():
        return None
    if mask_fingerprint(job.output) != fingerprint:
        return None  # another model / options, or a file this tool did not write: predict again
    try:
        with Image.open(job.output) as img:
            img.verify()
        size = _image_size(job.path)
        mask = load_mask(job.output)
        if size is None or (mask.shape[1], mask.shape[0]) != size:
            return None
        return mask_to_index(mask, values, job.output).astype(np.uint8 if len(values) <= 256 else np.int32)
    except Exception:  # noqa: BLE001 - any problem with an old output: predict again
        return None


# --------------------------------------------------------------------------------------- pipeline
@dataclass
class _Loaded:
    job: Job
    image: np.ndarray | None = None
    error: str | None = None
    skipped_mask: np.ndarray | None = None


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``map(fn, items)`` on ``threads`` threads, in order, with a bounded read-ahead."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="unet-load") as pool:
        pending: collections.deque[cf.Future[Any]] = collections.deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


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
    0.5 (:func:`unet_deploy.crf.threshold_prior`). Models with more classes take the argmax.
    """
    options = options or PredictOptions()
    if options.skip_existing and fingerprint is None:
        fingerprint = run_fingerprint(backend, options)
    if options.tta:
        from .tta import flip_tta

        backend = flip_tta(backend)
    cfg = backend.config
    scale = cfg.inference.scale if options.scale is None else options.scale
    threshold = cfg.inference.threshold if options.threshold is None else options.threshold
    channels = cfg.model.n_channels
    values = output_values(backend, options)
    keep_image = options.crf or options.viz or options.show

    def load(job: Job) -> _Loaded:
        if job.error:
            return _Loaded(job, error=job.error)
        if options.skip_existing:
            existing = _read_existing(job, values, fingerprint or "")
            if existing is not None:
                return _Loaded(job, skipped_mask=existing)
        try:
            return _Loaded(job, image=load_image(job.path, channels))
        except UserError as e:
            return _Loaded(job, error=str(e))
        except (OSError, ValueError, MemoryError) as e:
            return _Loaded(job, error=f"{job.path}: cannot read image ({_one_line(e)})")

    def infer(loaded: Iterable[_Loaded]) -> Iterator[tuple[_Loaded, Any, str | None]]:
        """Yield (loaded, mask or probabilities, error) in order; batches same-size inputs."""
        from .crf import threshold_prior
        from .postprocess import logits_to_mask, probabilities
        from .resources import check_predict_memory, raise_if_out_of_memory

        batch: list[tuple[_Loaded, np.ndarray]] = []

        def flush() -> Iterator[tuple[_Loaded, Any, str | None]]:
            if not batch:
                return
            items = list(batch)
            batch.clear()
            try:
                logits = backend.native(np.stack([x for _, x in items]))  # numpy from ORT: no torch
            except Exception as e:  # noqa: BLE001 - out of memory (issue 12): one line for the run, not per file
                raise_if_out_of_memory(e, f"running the model on {len(items)} image(s) of "
                                          f"{items[0][1].shape[2]}x{items[0][1].shape[1]} px")
                if not isinstance(e, (RuntimeError, MemoryError, ValueError)):
                    raise
                msg = _one_line(e)[:200]
                for item, _ in items:
                    yield item, None, (f"{item.job.path}: inference failed ({msg}); try a smaller "
                                       "--batch-size or --scale")
                return
            for i, (item, _) in enumerate(items):
                size = item.image.shape[:2]
                if options.crf:
                    probs = probabilities(logits[i], size)
                    yield item, threshold_prior(probs, threshold) if probs.shape[0] == 2 else probs, None
                else:
                    yield item, logits_to_mask(logits[i:i + 1], size, threshold)[0], None

        checked: set[tuple[int, ...]] = set()
        for item in loaded:
            if item.error is not None or item.skipped_mask is not None:
                yield from flush()
                yield item, None, item.error
                continue
            if item.image.shape not in checked:  # issue 12: refuse what cannot fit, before the model runs
                checked.add(item.image.shape)
                check_predict_memory(backend, item.image.shape[1], item.image.shape[0], scale,
                                     min(options.batch_size, len(jobs)), options.tta, str(item.job.path))
            try:
                x = preprocess(item.image, scale)
            except UserError as e:
                yield from flush()
                yield item, None, str(e)
                continue
            if min(x.shape[1:]) < _MIN_SIDE:
                yield from flush()
                yield item, None, (f"{item.job.path}: too small for the U-Net at scale {scale} "
                                   f"({x.shape[2]}x{x.shape[1]} px after scaling, needs {_MIN_SIDE} or more "
                                   "per side); use a larger --scale")
                continue
            if batch and (batch[0][1].shape != x.shape or len(batch) >= options.batch_size):
                yield from flush()
            batch.append((item, x))
        yield from flush()

    def result(item: _Loaded, mask: np.ndarray | None, error: str | None) -> PredictResult:
        if item.skipped_mask is not None:
            return PredictResult(item.job, item.skipped_mask, skipped=True)
        image = item.image if keep_image and error is None else None
        return PredictResult(item.job, mask, error, image=image)

    stream = infer(_ordered_map(load, jobs, options.loader_threads))
    if not options.crf:
        for item, mask, error in stream:
            yield result(item, mask, error)
        return

    from .crf import crf_map

    # Dense CRF in worker processes: crf_map keeps order, so its n-th mask belongs to the n-th item that
    # went in; items without probabilities wait in ``pending`` and come out at their place.
    pending: collections.deque[tuple[_Loaded, str | None]] = collections.deque()

    def feed() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for item, probs, error in stream:
            pending.append((item, error))
            if probs is not None:
                yield (item.image if item.image.shape[2] == 3 else item.image[..., 0]), probs

    masks = crf_map(feed(), options.crf_params, workers=options.crf_workers)
    try:
        while True:
            try:
                mask = next(masks)
            except StopIteration:
                break
            while pending and (pending[0][1] is not None or pending[0][0].skipped_mask is not None):
                item, error = pending.popleft()
                yield result(item, None, error)
            item, _ = pending.popleft()
            yield result(item, mask, None)
        while pending:
            item, error = pending.popleft()
            yield result(item, None, error)
    finally:
        masks.close()


#: Test hook: "RANK:K" makes rank RANK exit abruptly (as if killed) after writing K journal rows.
CRASH_ENV = "_UNET_DEPLOY_TEST_CRASH_AFTER"


def _journal_key(job: Job) -> str:
    return str(job.path)


def run_fingerprint(backend: Backend, options: PredictOptions) -> str:
    """What decides the masks (model file digest, scale, threshold, TTA, CRF, precision): journal rows and
    mask files made with anything else are not reused by ``skip_existing``."""
    from dataclasses import asdict

    from .shard import fingerprint, model_digest

    inf = backend.config.inference
    return fingerprint({
        "model": model_digest(backend.path, backend.config.source), "n_classes": backend.config.model.n_classes,
        "scale": inf.scale if options.scale is None else options.scale,
        "threshold": inf.threshold if options.threshold is None else options.threshold,
        "tta": options.tta, "crf": asdict(options.crf_params) if options.crf else None,
        "precision": backend.precision,
    })


def _on_main(group: Group, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and hand its result to every rank; a UserError there is raised on every rank."""
    from .shard import SharedError

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


def check_rle_target(path: str | Path) -> None:
    """Raise a one-line UserError unless a submission can be written at ``path`` (checked before a run)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--rle {path}: is a folder; give a file name, e.g. {path / 'submission.csv'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing folders are created: the first existing one must take them
    if not parent.is_dir():
        raise UserError(f"--rle {path}: {parent} is not a folder; give a submission path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--rle {path}: cannot write in {parent} (permission denied); choose a writable "
                        "folder")


def _reusable(jobs: Sequence[Job], rows: dict[str, Any], fingerprint: str) -> list[int]:
    """Indices of jobs whose journal row fits the image and whose mask file (if any) was written by a run
    with the same ``fingerprint``."""
    done = []
    for job in jobs:
        row = rows.get(_journal_key(job))
        if job.error is not None or row is None or row.id != job.id:
            continue
        if job.output is not None and mask_fingerprint(job.output) != fingerprint:
            continue  # missing, or overwritten by another model's run: predict it again to write the mask
        if _image_size(job.path) == (row.width, row.height):
            done.append(job.index)
    return done


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

    def add_task(self, *_: Any, **__: Any) -> int:
        return 0

    def advance(self, *_: Any) -> None:
        return None


def _predict_share(backend: Backend, mine: Sequence[Job], options: PredictOptions, fp: str, values: list[Any],
                   writer: Any, group: Group, summary: PredictSummary, on_error: Callable[[str], None] | None
                   ) -> tuple[PredictSummary, list[int], list[int]]:
    """Predict this process's jobs: write masks/overlays and journal rows; returns (counts, indices done
    or skipped, indices predicted). Ctrl-C raises KeyboardInterrupt with ``done`` = files finished."""
    from .rle import rle_encode
    from .shard import JournalRow

    local, ok, wrote = PredictSummary(), [], []
    crash_rank, _, crash_after = os.environ.get(CRASH_ENV, "").partition(":")
    show_bar = options.progress and group.main and len(mine) > 1 and sys.stderr.isatty()
    if show_bar:
        from .progress import file_progress
    with file_progress(True) if show_bar else _PlainBar() as bar:
        def report(line: str) -> None:
            summary.errors.append(line)
            local.failed += 1
            if on_error is not None:
                on_error(line)
            else:
                bar.console.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)

        task = bar.add_task("predict" if group.world == 1 else f"predict (rank 0 of {group.world})",
                            total=len(mine))
        show = options.show and display_available()
        try:
            for res in iter_predictions(backend, mine, options, fingerprint=fp):
                bar.advance(task)
                job = res.job
                if res.error is not None:
                    report(res.error)
                    continue
                if not res.skipped:
                    try:
                        if job.output is not None:
                            summary.written.append(write_mask(job.output, res.mask, values, fp))
                        if job.overlay is not None and res.image is not None:
                            summary.written.append(write_overlay(job.overlay, res.image, res.mask))
                    except OSError as e:
                        report(f"{job.path}: cannot write output ({_one_line(e)})")
                        continue
                    if show and res.image is not None:
                        _show(job.path.name, res.image, res.mask)
                if writer is not None:
                    try:
                        writer.append(JournalRow(_journal_key(job), job.id, *res.mask.shape[:2],
                                                 rle_encode(res.mask)))
                    except OSError as e:
                        report(f"{job.path}: cannot write to the journal {writer.path} ({_one_line(e)})")
                        continue
                    if crash_rank == str(group.rank) and writer.rows >= int(crash_after):
                        os._exit(3)
                ok.append(job.index)
                if res.skipped:
                    local.skipped += 1
                else:
                    local.predicted += 1
                    wrote.append(job.index)
        except KeyboardInterrupt as e:
            e.done = len(ok)  # type: ignore[attr-defined]
            raise
    return local, ok, wrote


def _check_same_run(group: Group, jobs: Sequence[Job], fp: str, backend: Backend) -> None:
    """Under torchrun every rank must split the same list and make the same masks."""
    import hashlib

    from .shard import SharedError

    plan = hashlib.sha256("\n".join(f"{j.path}\0{j.output}\0{j.overlay}" for j in jobs).encode()).hexdigest()
    seen = group.gather((plan, fp))
    if any(s[0] != seen[0][0] for s in seen):
        raise SharedError("predict: the processes found different input files; give every machine the same "
                          "inputs (a shared folder) and the same command")
    if any(s[1] != seen[0][1] for s in seen):
        raise SharedError(f"-m {backend.path}: the processes loaded different model files or options; "
                          "give every machine the same model file")


def _resume_plan(jobs: Sequence[Job], rle_path: Path | None, options: PredictOptions, fp: str
                 ) -> tuple[str, list[int], int]:
    """(run id, indices of jobs whose journal rows are reused, journal lines not trusted); on rank 0."""
    import shutil

    from .shard import journal_dir, new_run_id, read_journal

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
            raise UserError(f"--rle {rle_path}: cannot remove the old journal {folder} ({_one_line(e)})"
                            ) from None
        return new_run_id(), [], 0
    rows, untrusted = read_journal(folder, fp)
    return new_run_id(), _reusable(jobs, rows, fp), untrusted


def _merge_submission(jobs: Sequence[Job], want: list[int], rle_path: Path, fp: str, run_id: str,
                      keep_journal: bool) -> int:
    """Write the submission rows of jobs ``want`` from the journal, in input order (on rank 0); the journal
    is removed unless ``keep_journal`` (some files failed: a rerun with --resume uses it)."""
    import shutil

    from .rle import write_submission
    from .shard import journal_dir, read_journal

    folder = journal_dir(rle_path)
    rows, _ = read_journal(folder, fp, last=run_id)
    missing = [i for i in want if _journal_key(jobs[i]) not in rows]
    if missing:
        raise UserError(f"--rle {rle_path}: {len(missing)} rows written by other processes are not in "
                        f"{folder} (first: {jobs[missing[0]].path}); put the submission on a "
                        "filesystem that every machine shares")
    try:
        n = write_submission(rle_path, [(jobs[i].id, rows[_journal_key(jobs[i])].rle) for i in want])
    except (OSError, ValueError) as e:
        raise UserError(f"--rle {rle_path}: cannot write the submission ({_one_line(e)})") from None
    if not keep_journal:  # all done: the journal is no longer needed
        shutil.rmtree(folder, ignore_errors=True)
    return n


def predict_files(backend: Backend, inputs: Sequence[str | Path], options: PredictOptions | None = None,
                  outputs: Sequence[str | Path] | None = None,
                  on_error: Callable[[str], None] | None = None, group: Group | None = None) -> PredictSummary:
    """Predict files/folders/globs and write masks, overlays and the RLE submission as ``options`` say.

    Each failing file is reported once through ``on_error`` (default: one line on stderr) and counted;
    the others still run. ``summary.exit_code`` is 1 when any file failed.

    ``group`` (:func:`unet_deploy.shard.process_group` under torchrun): each rank predicts every
    ``world``-th input that is not done yet, journals its submission rows, and rank 0 merges them into
    ``options.rle`` in input order; the returned counts are the totals of all ranks on every rank.
    With ``options.rle`` the rows go to a journal beside the file first (:mod:`unet_deploy.shard`); with
    ``options.skip_existing`` the rows an interrupted run journaled are reused instead of predicted.
    """
    from .shard import Group, JournalWriter, journal_dir
    from .shard import split as split_jobs

    options = options or PredictOptions()
    group = group if group is not None else Group()
    start = time.perf_counter()
    items = _expand(inputs)
    planned = iter(plan_jobs([p for p, e in items if e is None], outputs, save=options.save, viz=options.viz))
    # inputs that matched nothing keep their place in the run (and in the error report)
    jobs = [replace(next(planned), index=i) if e is None else Job(i, p, error=e)
            for i, (p, e) in enumerate(items)]
    values = output_values(backend, options)
    summary = PredictSummary(total=len(jobs), processes=group.world)
    rle_path = Path(options.rle) if options.rle is not None else None
    folder = journal_dir(rle_path) if rle_path is not None else None
    fp = run_fingerprint(backend, options)
    if group.world > 1:
        _check_same_run(group, jobs, fp, backend)
    run_id, reused, summary.untrusted = _on_main(group, lambda: _resume_plan(jobs, rle_path, options, fp))
    summary.reused = len(reused)
    done = set(reused)
    todo = [j for j in jobs if j.index not in done]
    mine = [todo[i] for i in split_jobs(len(todo), group.rank, group.world)]

    writer = None
    if folder is not None:
        try:
            writer = JournalWriter(folder / f"{run_id}.rank{group.rank}-of-{group.world}.jsonl", fp)
        except OSError as e:
            raise UserError(f"--rle {rle_path}: cannot write the journal in {folder} ({_one_line(e)})") from None
    try:
        local, ok, wrote = _predict_share(backend, mine, options, fp, values, writer, group, summary, on_error)
    except KeyboardInterrupt as e:
        raise PredictInterrupted(getattr(e, "done", 0) + len(done), len(jobs)) from None
    finally:
        if writer is not None:
            writer.close()

    counts = group.gather((local.predicted, local.skipped, local.failed, ok, wrote))
    summary.predicted = sum(c[0] for c in counts)
    summary.skipped = sum(c[1] for c in counts)
    summary.failed = sum(c[2] for c in counts)
    predicted = sorted(i for c in counts for i in c[4])
    summary.masks = [jobs[i].output for i in predicted if jobs[i].output is not None]
    summary.overlays = [jobs[i].overlay for i in predicted if jobs[i].overlay is not None]

    if rle_path is not None:
        want = sorted(done.union(*(c[3] for c in counts)))
        summary.rle_rows = _on_main(group, lambda: _merge_submission(jobs, want, rle_path, fp, run_id,
                                                                     keep_journal=bool(summary.failed)))
        summary.rle = rle_path
        if summary.failed:
            summary.journal = folder
    summary.seconds = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------------------- models
DEMO_DIR = "demo"  #: where `unet-deploy demo` writes; its model is the fallback when none is here


def _newest(folder: Path, suffix: str) -> Path | None:
    found = sorted(folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def default_model(backend: str | None, root: str | Path = ".") -> Path:
    """The model used when ``-m`` is omitted: ``checkpoints/best.pth`` (torch) or the newest
    ``exported/*.onnx`` / ``*.ts``; when there is none, the same under ``demo/`` (what `unet-deploy demo`
    wrote), with a one-line notice on stderr."""
    root = Path(root)
    if backend not in (None, "torch", "ort", "torchscript"):
        raise UserError(f"--backend {backend}: unknown backend; use torch, torchscript or ort")
    if backend in (None, "torch"):
        found = [p for p in (root / "checkpoints" / "best.pth", root / DEMO_DIR / "checkpoints" / "best.pth")
                 if p.is_file()]
        wanted, how = root / "checkpoints" / "best.pth", "train one with `unet-deploy train`"
    else:
        suffix, fmt = {"ort": (".onnx", "onnx"), "torchscript": (".ts", "torchscript")}[backend]
        found = [p for p in (_newest(root / "exported", suffix), _newest(root / DEMO_DIR / "exported", suffix)) if p]
        wanted, how = root / "exported" / f"*{suffix}", f"create one with `unet-deploy export --format {fmt}`"
    if not found:
        raise UserError(f"no -m given and no {wanted} (nor the demo's under {root / DEMO_DIR}/) found; "
                        f"{how}, run `unet-deploy demo`, or pass -m MODEL")
    if DEMO_DIR in found[0].relative_to(root).parts[:1]:
        print(f"no -m given and no {wanted}: using the demo's model {found[0]}", file=sys.stderr)
    return found[0]
