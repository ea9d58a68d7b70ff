"""The counts in the one summary line that `unet-deploy predict` prints (shared by the torchrun and Ray tests).

Each part is optional and found on its own, so a line with both "N skipped (output exists)" and "reused M"
(a run stopped between writing a mask and its journal row) is read right.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_LINE = re.compile(r"^predicted \d+ of \d+ files.*$", re.MULTILINE)
_PARTS = {"predicted": r"^predicted (\d+) of", "total": r" of (\d+) files", "skipped": r", (\d+) skipped \(",
          "reused": r", reused (\d+) \("}


class SummaryCounts(NamedTuple):
    predicted: int
    total: int
    skipped: int
    reused: int


def summary_counts(out: str) -> SummaryCounts:
    """The counts of the one summary line in ``out`` (a part that is not printed counts 0)."""
    lines = _LINE.findall(out)
    assert len(lines) == 1, out  # printed once (by rank 0 under torchrun)
    found = {name: re.search(pattern, lines[0]) for name, pattern in _PARTS.items()}
    return SummaryCounts(**{name: int(m.group(1)) if m else 0 for name, m in found.items()})
