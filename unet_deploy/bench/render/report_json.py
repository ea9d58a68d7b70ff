"""The benchmark report as a JSON file (``--json``; ``--from-json`` and ``--merge`` read it back)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unet_deploy.fileio import atomic_write_text

__all__ = ["write_json"]


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(report, indent=2, sort_keys=False) + "\n")
    return Path(path)
