"""Training augmentation for image + mask pairs, built on albumentations.

One :class:`AugmentConfig` describes every knob; :data:`PRESETS` names a few sensible settings
(``none`` = Pytorch-UNet's behaviour, no augmentation). :func:`build_transform` turns a config into
the ``transform(image_uint8_hwc, mask_index_hw) -> (image, mask)`` hook that
:class:`unet_deploy.train.SegmentationDataset` applies after resizing.

Geometry (flip, scale, shift, rotation) is applied to the image and the mask in one affine warp:
bilinear for the image, nearest for the mask (so class indices never blend), and the area that comes
in from outside the picture is black in the image and class 0 (background) in the mask. The output
size always equals the input size, so batches still stack.

Randomness is the transform's own (albumentations ``Compose(seed=...)``), not the global RNGs: the same
seed gives the same augmented pairs. Each process that uses the transform -- the main process, every
DataLoader worker, every torchrun rank -- draws from its own stream seeded from
``(seed, rank, worker id)``, so workers do not repeat each other's augmentations and a run is
reproducible for a given seed, process count and worker count.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

from unet_deploy.errors import UserError

__all__ = ["AugmentConfig", "PRESETS", "preset", "build_transform", "AugmentTransform", "augmentation_missing"]


def augmentation_missing() -> str | None:
    """``None`` when albumentations and OpenCV import, else the missing package's name.

    Both stay optional at runtime: only augmentation and edge-weighted loss need them.
    """
    for module, package in (("albumentations", "albumentations"), ("cv2", "opencv-python (cv2)")):
        try:
            __import__(module)
        except ImportError:
            return package
    return None


@dataclass(frozen=True)
class AugmentConfig:
    """What to randomise; every probability / amount 0 switches that part off.

    * ``hflip``/``vflip``: probability of a left-right / up-down flip (cars are never upside down,
      so ``vflip`` is 0 in every preset).
    * ``scale``: zoom by a factor in ``[1 - scale, 1 + scale]`` (zooming out pads with background,
      zooming in crops).
    * ``shift``: translate by up to this fraction of the width / height.
    * ``rotate``: rotate by up to this many degrees either way.
    * ``geometric_p``: probability that the scale/shift/rotate warp is applied to a sample.
    * ``brightness``, ``contrast``, ``saturation``: jitter factors in ``[1 - x, 1 + x]``;
      ``hue``: hue shift in ``[-hue, hue]`` (fraction of the colour circle, at most 0.5).
    * ``color_p``: probability that the colour jitter is applied to a sample.
    """

    hflip: float = 0.0
    vflip: float = 0.0
    scale: float = 0.0
    shift: float = 0.0
    rotate: float = 0.0
    geometric_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    color_p: float = 0.0

    def validate(self) -> AugmentConfig:
        """Raise :class:`UserError` naming the flag when a value is out of range; return self."""
        for name in ("hflip", "vflip", "geometric_p", "color_p"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} {v}: a probability must be in [0, 1]")
        for name, hi in (("scale", 0.9), ("shift", 0.5), ("brightness", 1.0), ("contrast", 1.0),
                         ("saturation", 1.0), ("hue", 0.5)):
            v = getattr(self, name)
            if not 0.0 <= v <= hi:
                flag = f"aug-{name}" if name in ("scale", "shift") else name
                raise UserError(f"--{flag} {v}: must be in [0, {hi}]")
        if not 0.0 <= self.rotate <= 180.0:
            raise UserError(f"--rotate {self.rotate}: degrees must be in [0, 180]")
        return self

    @property
    def geometric(self) -> bool:
        """True when the transform can move pixels (flips or the affine warp)."""
        warp = self.geometric_p > 0 and (self.scale > 0 or self.shift > 0 or self.rotate > 0)
        return self.hflip > 0 or self.vflip > 0 or warp

    @property
    def photometric(self) -> bool:
        """True when the transform can change colours."""
        jitter = self.brightness > 0 or self.contrast > 0 or self.saturation > 0 or self.hue > 0
        return self.color_p > 0 and jitter

    @property
    def active(self) -> bool:
        """True when the transform changes anything at all."""
        return self.geometric or self.photometric

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


PRESETS: dict[str, AugmentConfig] = {
    # Pytorch-UNet trained without augmentation; this keeps its behaviour.
    "none": AugmentConfig(),
    # Mirror images plus small, always-plausible changes of framing and exposure.
    "light": AugmentConfig(hflip=0.5, scale=0.1, shift=0.05, rotate=5.0, geometric_p=0.5,
                           brightness=0.1, contrast=0.1, saturation=0.1, hue=0.0, color_p=0.5),
    # The recommended setting when training data is scarce.
    "default": AugmentConfig(hflip=0.5, scale=0.2, shift=0.1, rotate=10.0, geometric_p=0.7,
                             brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, color_p=0.8),
    # Larger changes for very small data sets.
    "strong": AugmentConfig(hflip=0.5, scale=0.3, shift=0.15, rotate=20.0, geometric_p=0.9,
                            brightness=0.3, contrast=0.3, saturation=0.3, hue=0.06, color_p=0.9),
}


def preset(name: str, **overrides: float | None) -> AugmentConfig:
    """The named preset with any non-``None`` overrides applied (e.g. ``preset("none", hflip=0.5)``)."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise UserError(f"--augment {name}: unknown preset; use one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(AugmentConfig)}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ValueError(f"unknown augmentation setting(s) {unknown}")
    cfg = replace(PRESETS[key], **{k: float(v) for k, v in overrides.items() if v is not None})
    # An explicit warp / jitter amount on top of a preset without one should take effect.
    if cfg.geometric_p == 0 and (cfg.scale > 0 or cfg.shift > 0 or cfg.rotate > 0) and \
            overrides.get("geometric_p") is None:
        cfg = replace(cfg, geometric_p=0.7)
    jitter = cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0 or cfg.hue > 0
    if cfg.color_p == 0 and jitter and overrides.get("color_p") is None:
        cfg = replace(cfg, color_p=0.8)
    return cfg.validate()


def _compose(cfg: AugmentConfig, seed: int):
    import albumentations as A
    import cv2

    steps: list[Any] = []
    if cfg.hflip > 0:
        steps.append(A.HorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        steps.append(A.VerticalFlip(p=cfg.vflip))
    if cfg.geometric_p > 0 and (cfg.scale > 0 or cfg.shift > 0 or cfg.rotate > 0):
        steps.append(A.Affine(scale=(1.0 - cfg.scale, 1.0 + cfg.scale),
                              translate_percent=(-cfg.shift, cfg.shift), rotate=(-cfg.rotate, cfg.rotate),
                              interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                              border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=cfg.geometric_p))
    if cfg.photometric:
        steps.append(A.ColorJitter(brightness=(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
                                   contrast=(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
                                   saturation=(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
                                   hue=(-cfg.hue, cfg.hue), p=cfg.color_p))
    return A.Compose(steps, seed=seed)


def _stream_seed(seed: int, rank: int, worker: int) -> int:
    return int(np.random.SeedSequence([seed % (2**63), rank, worker]).generate_state(1)[0])


class AugmentTransform:
    """``(image uint8 HxWxC, mask HxW) -> (image, mask)``, same shapes and dtypes, aligned.

    Picklable (DataLoader workers may be spawned). The random stream is re-seeded the first time the
    object is called in a new process, from ``(seed, RANK, DataLoader worker id)``.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0):
        self.cfg = cfg.validate()
        self.seed = int(seed)
        self._pid: int | None = None
        self._compose: Any = None  # albumentations.Compose, built per process by _ensure_stream

    def _ensure_stream(self) -> None:
        pid = os.getpid()
        if self._pid == pid and self._compose is not None:
            return
        import torch.utils.data  # torch: not on the ONNX Runtime predict path, which imports this module

        info = torch.utils.data.get_worker_info()
        worker = info.id + 1 if info is not None else 0
        rank = int(os.environ.get("RANK", "0"))
        self._compose = _compose(self.cfg, _stream_seed(self.seed, rank, worker))
        self._pid = pid

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "seed": self.seed, "_pid": None, "_compose": None}

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._ensure_stream()
        if image.shape[:2] != mask.shape[:2]:
            raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} sizes differ")
        dtype = mask.dtype
        m = mask.astype(np.uint8) if mask.dtype != np.uint8 and int(mask.max(initial=0)) < 256 else mask
        out = self._compose(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(m))
        return np.ascontiguousarray(out["image"]), np.ascontiguousarray(out["mask"]).astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"AugmentTransform({self.cfg}, seed={self.seed})"


def build_transform(cfg: AugmentConfig | str, seed: int = 0) -> AugmentTransform | None:
    """The training ``transform`` hook for ``cfg`` (a config or a preset name); ``None`` when inactive."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    cfg.validate()
    return AugmentTransform(cfg, seed) if cfg.active else None
