"""Uploads -> decoded images, the way ``predict`` reads files (EXIF rotation, every mode, the same formats:
:data:`unet_deploy.images.image_io.IMAGE_FORMATS`), in two steps so that memory is admitted before it is used:

* :func:`peek_size` reads the size of a PNG, GIF, BMP or WebP from fixed places in its first bytes (constant
  work): an oversized one is refused at once, on the event loop.
* :func:`probe_image` reads the header only: the format (anything but JPEG, PNG, GIF, TIFF, BMP and WebP is
  415, and no other decoder ever runs), the size (over ``--max-pixels``: 413; too small for the U-Net at the
  model's scale: 400). The server admits the image's pixels against its budget before decoding.
* :func:`decode_image` decodes it. Whatever a damaged file makes the decoder raise is a 400 with one line,
  never a 500 (``tests/test_serve_fuzz.py`` feeds it thousands of mutated images of every format).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from unet_deploy.errors import UserError, first_line
from unet_deploy.images.image_io import FORMAT_NAMES, MIN_SIDE, image_to_array, open_image

__all__ = ["HTTPError", "ImageHeader", "peek_size", "probe_image", "decode_image"]

#: how image files start: a file that starts like one but does not open is broken (400), not foreign (415)
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


class HTTPError(Exception):
    """A request that cannot be served: its status code and a one-line reason (the JSON ``error``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class ImageHeader:
    """What an upload's header says: its size and format."""

    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _broken(error: BaseException) -> HTTPError:
    return HTTPError(400, f"broken image: {first_line(error)[:160]}")


def _source(data: bytes | IO[bytes]) -> IO[bytes]:
    if isinstance(data, bytes):
        return io.BytesIO(data)
    data.seek(0)
    return data


def _starts_like_an_image(data: IO[bytes]) -> bool:
    data.seek(0)
    head = data.read(16)
    return head.startswith(_SIGNATURES) or head[8:12] == b"WEBP"


def peek_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the fixed-place header fields of a PNG, GIF, BMP or WebP file's first 30 bytes;
    None for anything else (JPEG and TIFF need a scan; Pillow reads those). Constant work on any input: the
    server refuses an oversized image with it on the event loop, before any thread or decoder is involved."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        width, height = struct.unpack("<HH", head[6:10])
    elif head[:2] == b"BM" and len(head) >= 26:
        if struct.unpack("<I", head[14:18])[0] == 12:  # the OS/2 core header: 16-bit sizes
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = (abs(v) for v in struct.unpack("<ii", head[18:26]))
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8X":
            width = 1 + int.from_bytes(head[24:27], "little")
            height = 1 + int.from_bytes(head[27:30], "little")
        elif chunk == b"VP8L":
            bits = int.from_bytes(head[21:25], "little")
            width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        elif chunk == b"VP8 ":
            width, height = (v & 0x3FFF for v in struct.unpack("<HH", head[26:30]))
        else:
            return None
    else:
        return None
    return int(width), int(height)


def too_large(width: int, height: int, max_pixels: int) -> HTTPError:
    return HTTPError(413, f"image too large: {width}x{height} is {width * height:,} pixels, more than "
                          f"{max_pixels:,} (--max-pixels)")


def probe_image(data: bytes | IO[bytes], max_pixels: int, scale: float) -> ImageHeader:
    """The header of an upload (nothing is decoded): 415 for a format not read here, 400 for a broken header
    or an image too small for the network at ``scale``, 413 over ``max_pixels``."""
    source = _source(data)
    try:
        with open_image(source) as img:
            header = ImageHeader(int(img.size[0]), int(img.size[1]), str(img.format))
    except UnidentifiedImageError:
        if _starts_like_an_image(source):
            raise HTTPError(400, "broken image: the file starts like an image but cannot be read") from None
        raise HTTPError(415, f"not an image this server reads: send {FORMAT_NAMES}") from None
    except Image.DecompressionBombError:
        raise HTTPError(413, f"image too large: more than {max_pixels:,} pixels (--max-pixels)") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged header raises is the upload's fault
        raise _broken(e) from None
    if header.pixels > max_pixels:
        raise too_large(header.width, header.height, max_pixels)
    small_w, small_h = int(scale * header.width), int(scale * header.height)
    if min(small_w, small_h) < MIN_SIDE:
        need = max(MIN_SIDE / scale, 1)
        raise HTTPError(400, f"image too small: {header.width}x{header.height} px is {small_w}x{small_h} at the "
                             f"model's scale {scale:g}, and the U-Net needs {MIN_SIDE} px or more per side; send "
                             f"an image at least {need:.0f} px on its shorter side")
    return header


def decode_image(data: bytes | IO[bytes], channels: int, header: ImageHeader) -> np.ndarray:
    """An upload probed by :func:`probe_image` -> uint8 (H, W, channels), as
    :func:`unet_deploy.images.image_io.load_image` reads files. Every decoder failure is a 400 with one line."""
    if not header.pixels:
        raise HTTPError(400, "broken image: it has no pixels")
    try:
        with open_image(_source(data)) as img:
            if img.size != (header.width, header.height):  # not the file that was probed
                raise HTTPError(400, "broken image: its size changed between reads")
            image = image_to_array(img, channels)
    except HTTPError:
        raise
    except (Image.DecompressionBombError, MemoryError):
        raise HTTPError(413, f"image too large to decode: {header.width}x{header.height}") from None
    except UserError as e:
        raise HTTPError(400, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a damaged file may make a decoder raise anything: the client's error
        raise _broken(e) from None
    if image.shape[:2] not in ((header.height, header.width), (header.width, header.height)):
        raise HTTPError(400, "broken image: it decoded to another size than its header says")
    return image
