"""The README is tested: its shell command blocks run in order, in one temporary folder, as a new user
would paste them.

- A ```bash block whose first line is ``# not run by the README test: <reason>`` is skipped (GPU, a
  second node, the full seed width); the marker is visible in the README itself.
- ``pip install …`` and ``pytest`` commands are not run (the test runs inside the installed package and
  inside pytest); a line ``pip install … && unet-deploy demo`` runs its ``unet-deploy demo`` part.
- ``UNET_DEPLOY_README_SHRINK=0`` runs every command literally. By default image sizes and counts are shrunk
  (see :data:`SHRINK`) so the whole file runs in a few minutes on 2 cores; each command has 120 s
  (``UNET_DEPLOY_README_TIMEOUT``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP_MARKER = "# not run by the README test:"
TIMEOUT_S = float(os.environ.get("UNET_DEPLOY_README_TIMEOUT", "120"))

#: (pattern, replacement) applied to each command unless UNET_DEPLOY_README_SHRINK=0: fewer and smaller
#: images (epochs stay: at 192x128 they are cheap, and int8 parity needs a model that has learned).
SHRINK: list[tuple[str, Any]] = [
    (r"(unet-deploy demo)(?!\S)(?! --quick)", r"\1 --quick"),
    (r"(--n) (\d+)", lambda m: f"{m[1]} {min(int(m[2]), 64)}"),
    (r"^(unet-deploy export (?!.*--quick-verify).*?)(\s+#.*)?$", r"\1 --quick-verify\2"),  # parity at 239x160
    (r"(--heldout) (\d+)", lambda m: f"{m[1]} {min(int(m[2]), 6)}"),
    (r"(--width) (\d+) (--height) (\d+)", r"\1 192 \3 128"),
]


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every ```bash block, in order (blocks indented in a list item too)."""
    return [(text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2)))
            for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S)]


def commands(body: str) -> list[str]:
    """The commands of one block: continuation lines joined, pip/pytest parts dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        parts = [p.strip() for p in line.split("&&")]
        kept = [p for p in parts if p and not p.startswith(("#", "pip ", "pytest", "python -m pytest"))]
        if kept:
            out.append(" && ".join(kept))
    return out


def shrink(command: str) -> str:
    for pattern, repl in SHRINK:
        command = re.sub(pattern, repl, command)
    return command


def runnable_blocks() -> list[tuple[int, list[str]]]:
    blocks = []
    for line, body in shell_blocks(README.read_text(encoding="utf-8")):
        if body.lstrip().startswith(SKIP_MARKER):
            continue
        cmds = commands(body)
        if cmds:
            blocks.append((line, cmds))
    return blocks


def test_readme_parsing_rules() -> None:
    body = "pip install torch==2.13.0 -e . && unet-deploy demo   # note\npytest\nunet-deploy a \\\n  --b 1\n"
    assert commands(body) == ["unet-deploy demo   # note", "unet-deploy a --b 1"]
    assert shrink("unet-deploy demo") == "unet-deploy demo --quick"
    assert shrink("unet-deploy synth --n 96 --heldout 16 --width 480 --height 320") == \
        "unet-deploy synth --n 64 --heldout 6 --width 192 --height 128"
    assert shrink("unet-deploy export --format all   # note") == "unet-deploy export --format all --quick-verify   # note"
    assert shrink("unet-deploy export --quick-verify") == "unet-deploy export --quick-verify"
    assert shrink("unet-deploy train -e 10 -b 4") == "unet-deploy train -e 10 -b 4"  # small images: epochs are cheap
    skipped = [b for _, b in shell_blocks(README.read_text()) if b.lstrip().startswith(SKIP_MARKER)]
    assert all(re.match(re.escape(SKIP_MARKER) + r" \S", b.lstrip()) for b in skipped)  # each says why


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_commands_run_in_order(tmp_path: Path) -> None:
    """Every command of every runnable block succeeds, in README order, from one fresh folder."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="120",
               PYTHONPATH=str(ROOT))
    literal = os.environ.get("UNET_DEPLOY_README_SHRINK", "1") == "0"
    timings = []
    for line, cmds in runnable_blocks():
        for cmd in cmds:
            run = cmd if literal else shrink(cmd)
            start = time.perf_counter()
            try:
                proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                pytest.fail(f"README.md:{line}: `{run}` took more than {TIMEOUT_S:.0f} s")
            timings.append((time.perf_counter() - start, run))
            print(f"{timings[-1][0]:6.1f} s  README.md:{line}: {run}", flush=True)
            assert proc.returncode == 0, (f"README.md:{line}: `{run}` exited {proc.returncode}\n"
                                          f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
            assert "Traceback" not in proc.stderr, f"README.md:{line}: `{run}`\n{proc.stderr[-1500:]}"
    assert timings, "no runnable block found in README.md"
