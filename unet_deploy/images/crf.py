"""Dense-CRF post-processing of predicted class probabilities (optional ``--crf`` step).

The fully connected CRF (Kraehenbuehl & Koltun) sharpens mask borders along colour edges of the
input image and removes small isolated blobs.  It runs on the CPU and costs seconds per full-size
Carvana image, so :func:`crf_map` spreads images over worker processes.

**The scale rule.** The spatial std-devs (``gauss_sxy``, ``bilat_sxy``) are given in pixels of an image
whose shorter side is :data:`REFERENCE_SIDE` = 1280 px, and :func:`dense_crf` scales them to each image:
``sxy * min(H, W) / 1280``. The reference is where the defaults come from: Pytorch-UNet's values (20 and
30 px) were set for its ``predict.py``, which ran the CRF on full-size Carvana images (1918x1280). A car
fills about the same share of the frame at any size, so a kernel that reaches the same share of the car
shrinks with the image: 2 and 3 px on the demo's 192x128 cars, where 20 and 30 px cut the tyres out as
rings. The colour std-dev and the weights do not depend on the size. ``reference_side=None`` turns the
rule off (pixels of any image as given).

:class:`CRFChoice` is what ``train --crf auto`` chose on validation images and stored in the model
(``inference.crf`` of its config): the parameters, and whether they helped there. A CRF that did not help
stays off (:func:`model_crf`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import multiprocessing
import os
import sys
from collections.abc import Generator, Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.images.postprocess import probabilities
from unet_deploy.signals import exit_with_parent, ignore_stop_signals

__all__ = ["CRFParams", "CRFParamsError", "CRFChoice", "REFERENCE_SIDE", "model_crf", "require_crf", "dense_crf",
           "crf_pool", "crf_map", "threshold_prior", "crf_probabilities", "crf_image"]

#: The shorter side (px) of the images the spatial std-devs are given for: full-size Carvana, 1918x1280.
REFERENCE_SIDE = 1280.0

_INSTALL_HINT = "--crf needs pydensecrf: pip install pydensecrf2 (needs g++ and Python headers to build)"


class CRFParamsError(UserError, ValueError):
    """An invalid CRF setting; a ``UserError`` for the CLI and a ``ValueError`` for library callers."""


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF settings; the defaults are Pytorch-UNet's original Carvana values.

    ``gauss_sxy`` and ``bilat_sxy`` are pixels of an image whose shorter side is ``reference_side``;
    :meth:`at_size` (which :func:`dense_crf` applies) scales them to an image's own size (the module's
    scale rule). ``reference_side=None``: pixels of every image as given.
    """

    gauss_sxy: float = 20.0  #: spatial std-dev (pixels) of the smoothness kernel
    gauss_compat: float = 3.0  #: weight of the smoothness kernel
    bilat_sxy: float = 30.0  #: spatial std-dev (pixels) of the appearance kernel
    bilat_srgb: float = 20.0  #: colour std-dev (0-255 units) of the appearance kernel
    bilat_compat: float = 10.0  #: weight of the appearance kernel
    iterations: int = 5  #: mean-field inference steps
    clip: float = 1e-5  #: probabilities are clipped to [clip, 1 - clip] before taking logs
    reference_side: float | None = REFERENCE_SIDE  #: shorter side (px) the spatial std-devs are given for

    def __post_init__(self) -> None:
        if self.reference_side is not None and (not _finite(self.reference_side) or self.reference_side <= 0):
            raise CRFParamsError(f"CRF reference_side must be a positive number or None, got {self.reference_side!r}")
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


    def at_size(self, height: int, width: int) -> CRFParams:
        """These settings for an image of ``height`` x ``width`` px: the spatial std-devs times
        ``min(height, width) / reference_side`` (unchanged when ``reference_side`` is None)."""
        if self.reference_side is None:
            return self
        factor = min(height, width) / self.reference_side
        return replace(self, gauss_sxy=self.gauss_sxy * factor, bilat_sxy=self.bilat_sxy * factor,
                       reference_side=None)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready numbers (stored in a model's config)."""
        return {k: (None if v is None else float(v) if k != "iterations" else int(v))
                for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CRFParams:
        """Settings from :meth:`to_dict`'s output (keys a newer version added are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class CRFChoice:
    """The CRF chosen for a model on validation images, stored in its config (``inference.crf``).

    ``helps``: the chosen CRF raised mean dice there (by at least the margin of ``train --crf auto``);
    when it did not, ``predict --crf`` leaves the CRF off and says so.
    """

    params: CRFParams
    helps: bool
    dice_crf: float  #: mean dice with the CRF on the validation images
    dice_plain: float  #: mean dice without it, same images
    images: int  #: how many validation images it was chosen on

    def line(self) -> str:
        """One line: the verdict and the numbers behind it."""
        p = self.params
        verdict = "helps" if self.helps else "does not help"
        return (f"CRF {verdict} on {self.images} validation images: mean dice {self.dice_crf:.4f} with it, "
                f"{self.dice_plain:.4f} without (sxy {p.gauss_sxy:g}/{p.bilat_sxy:g} px at a "
                f"{p.reference_side or 0:g} px side, srgb {p.bilat_srgb:g}, weights {p.gauss_compat:g}/"
                f"{p.bilat_compat:g})")

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params.to_dict(), "helps": bool(self.helps), "dice_crf": float(self.dice_crf),
                "dice_plain": float(self.dice_plain), "images": int(self.images)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CRFChoice:
        return cls(CRFParams.from_dict(dict(data.get("params") or {})), bool(data.get("helps")),
                   float(data.get("dice_crf", float("nan"))), float(data.get("dice_plain", float("nan"))),
                   int(data.get("images", 0)))


def model_crf(stored: dict[str, Any] | None, given: CRFParams | None = None) -> tuple[CRFParams | None, str | None]:
    """The CRF a model runs with ``--crf``: ``(params or None when it stays off, one line to say or None)``.

    ``given`` (explicit ``--crf-*`` settings) wins. Otherwise the parameters stored by ``train --crf auto``
    (``stored``: the config's ``inference.crf``) when they helped on validation; when they did not, the CRF
    stays off, with a line saying so. A model without a stored choice runs the scaled defaults.
    """
    if given is not None:
        return given, None
    if not stored:
        return CRFParams(), None
    try:
        choice = CRFChoice.from_dict(stored)
    except (CRFParamsError, TypeError, ValueError):
        return CRFParams(), "the model's stored CRF parameters are unreadable: using the defaults"
    if not choice.helps:
        return None, (f"--crf: left off for this model: {choice.line()}; give --crf-* values to run a CRF "
                      "anyway")
    return choice.params, None


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
    treated as the two classes ``[1 - p, p]``.  ``params`` (default :class:`CRFParams`) are scaled to the
    image's size (:meth:`CRFParams.at_size`).  Returns the (H, W) mask of class indices (uint8 for up to
    256 classes).
    """
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
    params = (params or CRFParams()).at_size(h, w)

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
