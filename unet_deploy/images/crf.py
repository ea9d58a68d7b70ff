"""Dense-CRF post-processing of predicted class probabilities (optional ``--crf`` step).

The fully connected CRF (Kraehenbuehl & Koltun) sharpens mask borders along colour edges of the
input image and removes small isolated blobs.  It runs on the CPU and costs seconds per full-size
Carvana image, so :func:`crf_map` spreads images over worker processes.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import multiprocessing
import os
import sys
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.images.postprocess import probabilities
from unet_deploy.signals import exit_with_parent, ignore_stop_signals

__all__ = ["CRFParams", "CRFParamsError", "require_crf", "dense_crf", "crf_pool", "crf_map", "threshold_prior",
           "crf_probabilities", "crf_image"]

_INSTALL_HINT = "--crf needs pydensecrf: pip install pydensecrf2 (needs g++ and Python headers to build)"


class CRFParamsError(UserError, ValueError):
    """An invalid CRF setting; a ``UserError`` for the CLI and a ``ValueError`` for library callers."""


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings; the defaults are Pytorch-UNet's original Carvana values."""

    gauss_sxy: float = 20.0  #: spatial std-dev (pixels) of the smoothness kernel
    gauss_compat: float = 3.0  #: weight of the smoothness kernel
    bilat_sxy: float = 30.0  #: spatial std-dev (pixels) of the appearance kernel
    bilat_srgb: float = 20.0  #: colour std-dev (0-255 units) of the appearance kernel
    bilat_compat: float = 10.0  #: weight of the appearance kernel
    iterations: int = 5  #: mean-field inference steps
    clip: float = 1e-5  #: probabilities are clipped to [clip, 1 - clip] before taking logs

    def __post_init__(self) -> None:
        for name in ("gauss_sxy", "bilat_sxy", "bilat_srgb"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise CRFParamsError(f"CRF {name} must be a positive number, got {value!r}")
        for name in ("gauss_compat", "bilat_compat"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise CRFParamsError(f"CRF {name} must be a number >= 0, got {value!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) \
                or self.iterations < 1:
            raise CRFParamsError(f"CRF iterations must be an integer >= 1, got {self.iterations!r}")
        if not _finite(self.clip) or not 0 < self.clip < 0.5:
            raise CRFParamsError(f"CRF clip must be in (0, 0.5), got {self.clip!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


def require_crf() -> Any:
    """Import and return ``pydensecrf.densecrf``, or raise a one-line ``UserError`` with the install hint."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as e:
        raise UserError(f"{_INSTALL_HINT} (import failed: {e})") from None
    return dcrf


def _as_class_probs(probs: np.ndarray) -> np.ndarray:
    """Return float32 (C, H, W) probabilities; (H, W) and (1, H, W) are a foreground probability."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    if probs.ndim != 3 or probs.shape[0] < 1 or probs.shape[1] < 1 or probs.shape[2] < 1:
        raise ValueError(f"CRF probabilities must be (C, H, W) or (H, W), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"CRF probabilities must be floating point, got dtype {probs.dtype}")
    probs = probs.astype(np.float32, copy=False)
    if not np.isfinite(probs).all():
        raise ValueError("CRF probabilities contain NaN or infinity")
    if probs.shape[0] == 1:
        fg = probs[0]
        probs = np.stack([1.0 - fg, fg])
    return probs


def threshold_prior(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Re-weight binary probabilities so that a foreground probability of ``threshold`` becomes 0.5.

    The CRF labels each pixel with its most likely class, which for two classes is the threshold 0.5.
    ``p' = p(1 - t) / (p(1 - t) + (1 - p) t)`` moves the decision point to ``t``: ``p > t`` exactly when
    ``p' > 0.5``, so ``--mask-threshold`` means the same with and without the CRF (t = 0.5 changes
    nothing). ``probs``: (2, H, W) ``[1 - p, p]`` or a foreground probability (H, W) / (1, H, W);
    returns float32 (2, H, W).
    """
    probs = _as_class_probs(probs)
    if probs.shape[0] != 2:
        raise ValueError(f"a threshold applies to two classes, got {probs.shape[0]}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    if threshold == 0.5:
        return probs
    t = min(max(float(threshold), 1e-7), 1 - 1e-7)  # keeps the denominator above zero
    p = np.clip(probs[1].astype(np.float64), 0.0, 1.0)
    fg = p * (1 - t) / (p * (1 - t) + (1 - p) * t)
    return np.stack([1 - fg, fg]).astype(np.float32)


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams | None = None) -> np.ndarray:
    """Refine per-pixel class probabilities with a fully connected CRF.

    ``image``: uint8 (H, W, 3) RGB (a (H, W) grey image is also accepted).  ``probs``: (C, H, W)
    class probabilities summing to 1 over C, or a foreground probability (H, W) / (1, H, W) that is
    treated as the two classes ``[1 - p, p]``.  Returns the (H, W) mask of class indices (uint8 for
    up to 256 classes).
    """
    params = params or CRFParams()
    dcrf = require_crf()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"CRF image must be uint8 (0-255), got dtype {image.dtype}")
    probs = _as_class_probs(probs)
    n_classes, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"CRF image is {image.shape[0]}x{image.shape[1]} (HxW) but probabilities "
                         f"are {h}x{w}; resize one to match")

    probs = np.clip(probs, params.clip, 1.0 - params.clip)
    probs /= probs.sum(axis=0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(probs).reshape(n_classes, -1), dtype=np.float32)

    d = dcrf.DenseCRF2D(w, h, n_classes)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    d.addPairwiseBilateral(sxy=params.bilat_sxy, srgb=params.bilat_srgb,
                           rgbim=np.require(image, requirements=["C", "W"]), compat=params.bilat_compat)
    q = np.asarray(d.inference(int(params.iterations)))
    dtype = np.uint8 if n_classes <= 256 else np.int32
    return q.argmax(axis=0).reshape(h, w).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# Parallel map

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _init_worker() -> None:
    """Keep each worker process to one thread: the parallelism comes from the processes. Ctrl-C (and a
    SIGTERM sent to the whole process group) is the parent's to handle: it shuts the pool down; a worker whose
    parent was killed outright ends by itself."""
    ignore_stop_signals()
    exit_with_parent()
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    torch = sys.modules.get("torch")  # only if something already imported it; never import it here
    if torch is not None:
        torch.set_num_threads(1)


def crf_pool(workers: int) -> cf.ProcessPoolExecutor:
    """``workers`` spawned CRF processes (one thread each; Ctrl-C is the parent's to handle). "spawn": the
    parent may hold CUDA or many threads, which fork would copy in a broken state."""
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                  initializer=_init_worker)


def _crf_task(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    return dense_crf(image, probs, params)


def crf_map(items: Iterable[tuple[np.ndarray, np.ndarray]], params: CRFParams | None = None,
            workers: int = 1, max_in_flight: int | None = None) -> Generator[np.ndarray, None, None]:
    """Yield ``dense_crf(image, probs, params)`` for each ``(image, probs)`` pair, in input order.

    ``workers <= 1`` runs in this process.  Otherwise a pool of ``workers`` spawned processes does
    the work; at most ``max_in_flight`` (default ``2 * workers``) items are submitted but not yet
    yielded, so a long input stream never piles up in memory.  An error in any item is raised
    here, and closing the generator early cancels the pending work.
    """
    params = params or CRFParams()
    require_crf()  # fail fast in the parent with the install hint, not inside a worker
    if workers <= 1:
        for image, probs in items:
            yield dense_crf(image, probs, params)
        return
    limit = max(1, max_in_flight if max_in_flight is not None else 2 * workers)
    pool = crf_pool(workers)
    pending: collections.deque[cf.Future[np.ndarray]] = collections.deque()
    try:
        for image, probs in items:
            pending.append(pool.submit(_crf_task, image, probs, params))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except cf.process.BrokenProcessPool:
        raise UserError(f"a CRF worker process died (out of memory?); try fewer CRF workers than {workers} "
                        "or 1 to run in-process") from None
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def crf_probabilities(logits: Any, size: tuple[int, int], threshold: float) -> np.ndarray:
    """A batch-of-one's logits -> the class probabilities at ``size`` that dense CRF refines (binary models:
    re-weighted so that ``threshold`` maps to 0.5)."""
    probs = probabilities(logits[0], size)
    return threshold_prior(probs, threshold) if probs.shape[0] == 2 else probs


def crf_image(image: np.ndarray) -> np.ndarray:
    """A decoded image (H, W, 1|3) as dense CRF takes it: RGB, or (H, W) grey."""
    return image if image.shape[2] == 3 else image[..., 0]
