"""Uploads -> decoded images, the way ``predict`` reads files (EXIF rotation, every mode), with the limits a
server needs: a pixel budget checked from the header before decoding (decompression bombs), and one HTTP
status per kind of bad upload (413 too large, 415 not an image, 400 a broken image)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..data import image_to_array
from ..errors import first_line

__all__ = ["HTTPError", "decode_image"]

#: how image files start: a file that starts like one but does not open is broken (400), not foreign (415)
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


class HTTPError(Exception):
    """A request that cannot be served: its status code and a one-line reason (the JSON ``error``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def decode_image(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    """An uploaded file's bytes -> uint8 (H, W, channels), as :func:`unet_deploy.data.load_image` reads files."""
    if not data:
        raise HTTPError(400, "empty upload: send an image file (multipart field 'file' or the raw body)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
            raise HTTPError(400, "broken image: the file starts like an image but cannot be read") from None
        raise HTTPError(415, "not an image this server can read (JPEG, PNG, GIF, BMP, TIFF, WebP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPError(413, f"image too large: more than {max_pixels:,} pixels") from None
    with img:
        width, height = img.size
        if width * height > max_pixels:
            raise HTTPError(413, f"image too large: {width}x{height} is more than {max_pixels:,} pixels")
        try:
            return image_to_array(img, channels)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise HTTPError(400, f"broken image: {first_line(e)[:160]}") from None
