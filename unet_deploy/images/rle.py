"""Kaggle run-length encoding (Carvana) and the ``img,rle_mask`` submission file.

An RLE string lists ``start length`` pairs separated by spaces.  ``start`` is 1-indexed into the
mask flattened in row-major (C) order, i.e. ``mask.flatten()``; the pixels inside runs are the car
(value 1), everything else is background.  An empty mask encodes to the empty string.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_path

__all__ = [
    "SUBMISSION_HEADER",
    "rle_encode",
    "rle_decode",
    "write_submission",
    "read_submission",
]

#: First line of a Carvana submission file.
SUBMISSION_HEADER = ("img", "rle_mask")


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (any nonzero value is foreground) as a Kaggle RLE string."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D (H, W) mask, got shape {mask.shape}")
    flat = mask.ravel() != 0
    # Pad with background at both ends so every run has a rising and a falling edge.
    padded = np.zeros(flat.size + 2, dtype=np.int8)
    padded[1:-1] = flat
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # 0-based: rising edge = start, falling = end
    if edges.size == 0:
        return ""
    edges[1::2] -= edges[0::2]  # end -> length
    edges[0::2] += 1  # 1-indexed starts
    return " ".join(edges.astype(str).tolist())


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Decode a Kaggle RLE string into a uint8 0/1 mask of ``shape`` (H, W).

    Raises ``ValueError`` when the string is not whole ``start length`` pairs of positive integers,
    when a run leaves the mask, or when runs are out of order or overlap.
    """
    if len(shape) != 2 or any(int(s) < 0 for s in shape):
        raise ValueError(f"rle_decode needs a 2-D shape (H, W), got {shape!r}")
    h, w = (int(s) for s in shape)
    size = h * w
    if not isinstance(rle, str):
        raise ValueError(f"RLE must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if not tokens:
        return np.zeros((h, w), dtype=np.uint8)
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)}); it must be 'start length' pairs")
    try:
        nums = np.array([int(t) for t in tokens], dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int(t))
        raise ValueError(f"RLE value {bad!r} is not an integer") from None
    starts, lengths = nums[0::2], nums[1::2]
    if (starts < 1).any():
        raise ValueError(f"RLE start {int(starts[starts < 1][0])} is not >= 1 (starts are 1-indexed)")
    if (lengths < 1).any():
        raise ValueError(f"RLE run length {int(lengths[lengths < 1][0])} is not >= 1")
    ends = starts - 1 + lengths  # exclusive, 0-based
    if (ends > size).any():
        i = int(np.argmax(ends > size))
        raise ValueError(f"RLE run '{starts[i]} {lengths[i]}' ends past the mask ({h}x{w} = {size} pixels)")
    overlap = starts[1:] - 1 < ends[:-1]
    if overlap.any():
        i = int(np.argmax(overlap)) + 1
        raise ValueError(f"RLE run starting at {starts[i]} is out of order or overlaps the previous run")
    # Runs are sorted and disjoint: mark +1 at each start, -1 after each end, and accumulate.
    delta = np.zeros(size + 1, dtype=np.int8)
    delta[starts - 1] += 1  # starts are distinct, and so are ends, so fancy-index updates are safe
    delta[ends] -= 1
    return np.cumsum(delta[:-1], dtype=np.int8).astype(np.uint8).reshape(h, w)


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def write_submission(path: str | os.PathLike[str], rows: Iterable[tuple[str, str]]) -> int:
    """Write ``img,rle_mask`` rows to ``path`` atomically and return the number of rows.

    ``rows`` may be a generator: nothing appears under ``path`` until it is exhausted, and if it
    raises, the temporary file is removed and an existing ``path`` stays untouched.
    """
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(SUBMISSION_HEADER) + "\n")
        for img, rle in rows:
            if not img or any(c in img for c in ",\r\n\""):
                raise ValueError(f"submission image name {img!r} is empty or contains ',', quote or newline")
            if any(c in rle for c in ",\r\n\""):
                raise ValueError(f"RLE for {img!r} contains ',', quote or newline")
            f.write(f"{img},{rle}\n")
            count += 1
    return count


def read_submission(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read a submission file back as ``(img, rle_mask)`` pairs, checking its header and rows."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: submission file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read submission file ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != SUBMISSION_HEADER:
        raise UserError(f"{path}: not a Carvana submission, first line must be 'img,rle_mask' "
                        f"(found {','.join(header) if header else 'an empty file'!r})")
    rows: list[tuple[str, str]] = []
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0]:
            raise UserError(f"{path}:{lineno}: expected 'img,rle_mask', got {','.join(row)!r}")
        rows.append((row[0], row[1]))
    return rows
