"""The server's decoder under damaged uploads: a seeded fuzz of thousands of mutated images of every format
it reads. Every outcome is a decoded image or a one-line 400/413/415, never another exception (a 500)."""

from __future__ import annotations

import collections
import io
import time

import numpy as np
import pytest
from serve_helpers import mutated_images, seed_images

from unet_deploy.serve.decode import HTTPError, decode_image, peek_size, probe_image

pytest.importorskip("starlette", reason="serve needs starlette (a dependency of unet-deploy)")

PER_FORMAT = 1000  #: 6 formats: 6,000 mutated images


def read_upload(data: bytes) -> np.ndarray:
    """What the server does with an upload's bytes: the header, then the pixels."""
    header = probe_image(data, max_pixels=4_000_000, scale=1.0)
    return decode_image(data, 3, header)


def test_every_seed_decodes_and_the_quick_size_is_pillows() -> None:
    from PIL import Image

    for fmt, seeds in seed_images().items():
        for data in seeds:
            image = read_upload(data)
            assert image.dtype == np.uint8 and image.shape[2] == 3 and sorted(image.shape[:2]) == [32, 48], fmt
            with Image.open(io.BytesIO(data)) as img:
                expected = img.size if fmt in ("PNG", "GIF", "BMP", "WEBP") else None  # JPEG, TIFF: Pillow's
            assert peek_size(data[:30]) == expected, fmt


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")  # Pillow on damaged TIFF tags
def test_mutated_images_of_every_format_get_one_line_4xx_never_an_exception() -> None:
    start = time.monotonic()
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for fmt, data in mutated_images(PER_FORMAT, seed=22):
        peeked = peek_size(data[:30])  # never raises, whatever the bytes
        assert peeked is None or (len(peeked) == 2 and min(peeked) >= 0), (fmt, peeked)
        try:
            image = read_upload(data)
        except HTTPError as e:
            assert e.status in (400, 413, 415), (fmt, e.status, e.message)
            assert e.message and "\n" not in e.message and len(e.message) < 300, (fmt, e.message)
            outcomes[fmt][e.status] += 1
        else:
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, fmt
            outcomes[fmt][200] += 1
    assert sum(sum(c.values()) for c in outcomes.values()) == 6 * PER_FORMAT >= 2000
    for fmt, counts in outcomes.items():  # the damage reaches the decoders: both outcomes for every format
        assert counts[200] > 0 and counts[400] > 0, (fmt, dict(counts))
    print(f"{6 * PER_FORMAT} mutated images in {time.monotonic() - start:.1f} s:",
          {fmt: dict(c) for fmt, c in outcomes.items()})
