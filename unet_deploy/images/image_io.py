"""Images and masks: the one ``load_image`` and one ``preprocess`` that training, evaluation, prediction,
parity checks and benchmarks all use, plus Carvana-style image/mask pairing.

Preprocessing is Pytorch-UNet's: resize by ``scale`` with BICUBIC (masks NEAREST), divide by 255, no
mean/std normalisation, HWC -> CHW. So its checkpoints predict here exactly as they do there.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unet_deploy.errors import InputError, OptionError
from unet_deploy.fileio import require_file

__all__ = [
    "IMAGE_SUFFIXES",
    "IMAGE_FORMATS",
    "FORMAT_NAMES",
    "open_image",
    "MAX_PIXELS",
    "header_size",
    "load_image",
    "load_image_bytes",
    "load_mask",
    "scaled_size",
    "preprocess",
    "resize_image",
    "to_input",
    "preprocess_mask",
    "mask_to_index",
    "Pair",
    "find_pairs",
    "discover_mask_values",
    "list_images",
    "is_own_output",
    "MASK_SUFFIX",
    "OVERLAY_SUFFIX",
    "FINGERPRINT_KEY",
    "check_min_size",
    "MIN_SIDE",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".tif", ".tiff", ".bmp", ".webp")
#: The only formats read (Pillow's names), whatever a file is called: Pillow opens many more, some through
#: external programs (EPS runs Ghostscript) or little-used decoders. ``predict``, ``train`` and ``serve`` alike.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP")
FORMAT_NAMES = "JPEG, PNG, GIF, TIFF, BMP or WebP"
#: Decompression-bomb limit: 16x a Carvana image (1918x1280); larger files are refused, not decoded.
MAX_PIXELS = 16 * 1918 * 1280
MASK_SUFFIX = "_OUT"  #: Pytorch-UNet's output name: <stem>_OUT.png
OVERLAY_SUFFIX = "_OVERLAY"  #: predict --viz: <stem>_OVERLAY.png
EXIF_ORIENTATION = 0x0112
FINGERPRINT_KEY = "unet_deploy"  #: PNG text chunk holding the fingerprint of the run that wrote a mask


def open_image(source: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (reads the header only): any other format raises
    ``UnidentifiedImageError`` before a decoder of it runs."""
    return Image.open(source, formats=IMAGE_FORMATS)


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header, read by the plugins of :data:`IMAGE_FORMATS` without
    Pillow's decompression-bomb check (nothing is decoded), or None when no plugin reads it."""
    Image.init()
    with open(path, "rb") as f:
        prefix = f.read(16)
        for fmt in IMAGE_FORMATS:
            factory, accept = Image.OPEN.get(fmt, (None, None))
            if factory is None or (accept is not None and not accept(prefix)):
                continue
            f.seek(0)
            try:
                return tuple(factory(f, str(path)).size)  # type: ignore[return-value]
            except Exception:  # noqa: BLE001, S112 - not this format: try the next
                continue
    return None


def _too_large(path: str | Path, size: tuple[int, int] | None) -> str:
    """The one-line refusal of an image beyond :data:`MAX_PIXELS`: its size, the limit and the fix."""
    limit = f"the limit is {MAX_PIXELS} px ({MAX_PIXELS / 1e6:.1f} Mpx, 16x a 1918x1280 Carvana image)"
    if size is None:
        return f"{path}: image too large (over the decompression-bomb limit; {limit}); downscale it first"
    w, h = size
    return (f"{path}: image too large ({w}x{h} px = {w * h / 1e6:.1f} Mpx; {limit}); downscale it first, e.g. "
            f"to {max(1, int(w * (MAX_PIXELS / (w * h)) ** 0.5))} px wide")


def _open(path: str | Path, what: str, data: bytes | None = None) -> Image.Image:
    """Open ``path`` (or ``data``, its bytes read elsewhere, e.g. by Ray Data) and load its pixels; every
    problem is an :class:`InputError` that names ``path``."""
    if data is None:
        path = require_file(path, what, "check the path", "re-export or remove it")
    elif not data:
        raise InputError(f"{path}: empty {what} file (0 bytes); re-export or remove it")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(path if data is None else io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (not {FORMAT_NAMES}); convert it to JPEG or "
                        "PNG") from None
    except Image.DecompressionBombError:
        raise InputError(_too_large(path, header_size(path) if data is None else None)) from None
    except OSError as e:
        raise InputError(f"{path}: cannot open {what} ({e})") from None
    try:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise InputError(_too_large(path, (w, h)))
        if w < 1 or h < 1:
            raise InputError(f"{path}: image has no pixels ({w}x{h})")
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{path}: broken or truncated {what} ({e}); re-download or remove it") from None
    except BaseException:
        img.close()
        raise
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey images (I;16, I, F) to 8-bit L, scaling the full range."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return img.convert("L")
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode == "F" and peak <= 1.0:
        top = 1.0  # float images in [0, 1]
    else:
        top = 255.0 if peak <= 255 else 65535.0
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, (1 << 16) // max(arr.shape[1] if arr.ndim > 1 else 1, 1))
    for r0 in range(0, arr.shape[0], rows):  # float64 a block at a time: a large image needs no 8-byte copy
        block = arr[r0:r0 + rows].astype(np.float64)
        out[r0:r0 + rows] = np.clip(block / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white (a studio background) rather than whatever colour hides under
        # alpha = 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


def load_image(path: str | Path, channels: int = 3) -> np.ndarray:
    """Read any image file as uint8: (H, W, 3) for ``channels=3``, (H, W, 1) for ``channels=1``.

    EXIF orientation is applied; every mode (L, LA, P, RGBA, CMYK, I;16, ...) is accepted. Bad files raise
    :class:`UserError` naming the file.
    """
    with _open(path, "image") as img:  # closes the file: multi-frame formats (GIF, TIFF) keep it open
        return image_to_array(img, channels)


def load_image_bytes(data: bytes, path: str | Path, channels: int = 3) -> np.ndarray:
    """:func:`load_image` of a file's bytes (``data``, read by someone else): the same array, and the same
    errors naming ``path``."""
    with _open(path, "image", data) as img:
        return image_to_array(img, channels)


def image_to_array(img: Image.Image, channels: int = 3) -> np.ndarray:
    """An opened image as :func:`load_image` returns it: EXIF orientation applied, any mode converted to
    uint8 (H, W, 3) for ``channels=3`` or (H, W, 1) for ``channels=1``."""
    try:  # without a rotation to apply, exif_transpose would only copy the image
        upright = ImageOps.exif_transpose(img) if img.getexif().get(EXIF_ORIENTATION, 1) != 1 else img
    except Exception:  # a broken EXIF block must not make a good image unusable  # noqa: BLE001
        upright = img
    rgb = _to_rgb(upright)
    if channels == 3:
        return np.asarray(rgb, dtype=np.uint8)
    if channels == 1:
        return np.asarray(rgb.convert("L"), dtype=np.uint8)[:, :, None]
    raise InputError(f"models with {channels} input channels are not supported (use 1 or 3)")


def load_mask(path: str | Path) -> np.ndarray:
    """Read a mask file as its raw values: palette indices for GIF/P masks (Carvana: 0/1), grey levels
    for L masks, (H, W, 3) colours for RGB masks."""
    with _open(path, "mask") as img:
        if img.mode in ("1", "L", "P", "I", "I;16"):
            arr = np.array(img)
        elif img.mode in ("LA", "PA"):
            arr = np.array(img)[..., 0]
        else:
            arr = np.asarray(img.convert("RGB"))
            if (arr == arr[..., :1]).all():
                arr = arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Pytorch-UNet's size rule: ``int(scale * w), int(scale * h)`` (959x640 for Carvana at 0.5)."""
    new_w, new_h = int(scale * width), int(scale * height)
    if new_w < 1 or new_h < 1:
        raise OptionError(f"--scale {scale} makes a {width}x{height} image empty; use a larger --scale")
    return new_w, new_h


#: Four 2x poolings need at least 16 input pixels per side.
MIN_SIDE = 16


def check_min_size(image: str | Path, scale: float, min_side: int = MIN_SIDE) -> None:
    """One-line error when ``image`` at ``scale`` is too small for the network (read from the header)."""
    with open_image(image) as img:
        w, h = img.size
    new_w, new_h = scaled_size(w, h, scale)
    if min(new_w, new_h) < min_side:
        raise InputError(f"{image}: {w}x{h} px at --scale {scale} is {new_w}x{new_h}, too small for the U-Net "
                        f"(needs {min_side} px or more per side); use a larger --scale")


def resize_image(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, C) image resized by ``scale`` with BICUBIC (Pytorch-UNet's rule)."""
    if image.ndim == 2:
        image = image[:, :, None]
    h, w = image.shape[:2]
    new_w, new_h = scaled_size(w, h, scale)
    if (new_w, new_h) == (w, h):
        return image
    pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    out = np.asarray(pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
    return out[:, :, None] if out.ndim == 2 else out


def to_input(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (C, H, W) in [0, 1] (divide by 255, no mean/std)."""
    if image.ndim == 2:
        image = image[:, :, None]
    chw = np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)
    chw *= np.float32(1.0 / 255.0)
    return chw


def preprocess(image: np.ndarray, scale: float) -> np.ndarray:
    """uint8 (H, W, C) image -> float32 (C, h, w) network input in [0, 1], resized by ``scale``."""
    return to_input(resize_image(image, scale))


def preprocess_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """Raw mask values resized by ``scale`` with NEAREST (values are never blended)."""
    h, w = mask.shape[:2]
    new_w, new_h = scaled_size(w, h, scale)
    if (new_w, new_h) == (w, h):
        return mask
    return np.asarray(Image.fromarray(mask).resize((new_w, new_h), resample=Image.Resampling.NEAREST))


def mask_to_index(mask: np.ndarray, mask_values: Sequence, source: str | Path = "mask") -> np.ndarray:
    """Map raw mask values to class indices 0..K-1 (int64); unknown values raise :class:`UserError`."""
    out = np.zeros(mask.shape[:2], dtype=np.int64)
    matched = np.zeros(mask.shape[:2], dtype=bool)
    for i, v in enumerate(mask_values):
        if mask.ndim == 3:
            hit = (mask == np.asarray(v, dtype=mask.dtype)).all(-1)
        else:
            hit = mask == v
        out[hit] = i
        matched |= hit
    if not matched.all():
        bad = mask[~matched]
        example = bad[0].tolist() if bad.ndim > 1 else bad.flat[0].item()
        raise InputError(f"{source}: mask has value {example} outside the expected mask values "
                        f"{list(mask_values)}; fix the mask or retrain with masks of the same values")
    return out


def is_own_output(path: Path) -> bool:
    """True for files ``predict`` writes: ``*_OUT``/``*_OVERLAY`` names, or a PNG stamped with a run
    fingerprint (a mask saved under any name). They are never read back as images to train on or predict."""
    if path.stem.endswith((MASK_SUFFIX, OVERLAY_SUFFIX)):
        return True
    if path.suffix.lower() != ".png":
        return False
    try:
        with open_image(path) as img:  # reads the chunks before the pixel data only
            return FINGERPRINT_KEY in img.info
    except (OSError, ValueError, UnidentifiedImageError):
        return False  # a broken file is reported where it is loaded


def list_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` (not recursive), sorted, without hidden files and this tool's outputs."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(".") and not is_own_output(p))


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    mask: Path


def _mask_id(mask: Path, suffix: str) -> str:
    stem = mask.stem
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def find_pairs(images_dir: str | Path, masks_dir: str | Path, mask_suffix: str = "_mask",
               check_sizes: bool = True) -> list[Pair]:
    """Pair ``<id>.<ext>`` images with ``<id><mask_suffix>.<ext>`` masks (or same-stem masks).

    Raises :class:`UserError` naming the first image without a mask, mask without an image, or pair
    whose sizes differ (read from file headers only, so this is fast).
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what, flag in ((images_dir, "images", "--data (DIR/imgs)"), (masks_dir, "masks", "--data (DIR/masks)")):
        if not d.is_dir():
            raise InputError(f"{d}: {what} folder not found; pass {flag} or create it with "
                            "`unet-deploy synth --out DIR`")
    images = list_images(images_dir)
    masks = list_images(masks_dir)
    if not images:
        raise InputError(f"{images_dir}: no images found ({', '.join(IMAGE_SUFFIXES)}); "
                        "add images or point --data elsewhere")
    by_id: dict[str, Path] = {}
    for m in masks:
        key = _mask_id(m, mask_suffix)
        if key in by_id:
            raise InputError(f"{m}: a second mask for image id '{key}' (also {by_id[key].name}); keep one")
        by_id[key] = m
    pairs = []
    for img in images:
        mask = by_id.pop(img.stem, None)
        if mask is None:
            raise InputError(f"{img}: no mask found (expected {masks_dir}/{img.stem}{mask_suffix}.gif or "
                            f"{img.stem}.png); add it or remove the image")
        pairs.append(Pair(img.stem, img, mask))
    if by_id:
        orphan = sorted(by_id.values())[0]
        raise InputError(f"{orphan}: mask without an image (expected {images_dir}/"
                        f"{_mask_id(orphan, mask_suffix)}.jpg); add the image or remove the mask")
    if check_sizes:
        for p in pairs:
            with open_image(p.image) as a, open_image(p.mask) as b:
                size_a = ImageOps.exif_transpose(a).size if a.getexif().get(EXIF_ORIENTATION, 1) != 1 else a.size
                if size_a != b.size:
                    raise InputError(f"{p.mask}: mask is {b.size[0]}x{b.size[1]} but image {p.image.name} is "
                                    f"{size_a[0]}x{size_a[1]}; masks must match their images")
    return pairs


def discover_mask_values(masks: Sequence[Path]) -> list:
    """Sorted distinct values over all masks (e.g. [0, 1] for Carvana GIFs, [0, 255] for PNGs)."""
    values: set = set()
    for m in masks:
        arr = load_mask(m)
        if arr.ndim == 3:
            values.update(tuple(v) for v in np.unique(arr.reshape(-1, arr.shape[-1]), axis=0).tolist())
        else:
            values.update(np.unique(arr).tolist())
    ordered = sorted(values)
    return [list(v) if isinstance(v, tuple) else v for v in ordered]
