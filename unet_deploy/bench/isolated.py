"""Run one benchmark case in a fresh ``python -m MODULE spec.json result.json`` process: the case gets no
allocator caches, thread pools or imported libraries of the cases before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from unet_deploy.errors import UserError

__all__ = ["run_in_fresh_process"]


def run_in_fresh_process(module: str, spec: dict[str, Any], what: str, timeout_s: float,
                         hint: str) -> dict[str, Any]:
    """``module``'s result for ``spec`` (both JSON); a one-line :class:`UserError` naming ``what`` when the
    process runs over ``timeout_s`` (with ``hint``) or fails (with its last output line)."""
    with tempfile.TemporaryDirectory(prefix="unet-bench-case-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, "-m", module, str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise UserError(f"{what} ran over {timeout_s:.0f} s; {hint}") from None
        if proc.returncode != 0 or not out_path.exists():
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {proc.returncode}"
            raise UserError(f"{what} failed in its process: {last[:300]}")
        return dict(json.loads(out_path.read_text()))
