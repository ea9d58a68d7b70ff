"""The README is tested: its shell command blocks, then those of every ``docs/`` page in the order README's
topics table links them, run in order, in one temporary folder, as a new user would paste them.

- A ```bash block whose first line is ``# not run by the README test: <reason>`` is skipped (GPU, a
  second node, the full seed width); the marker is visible in the README itself.
- A ```python block runs (``python -c``, in README order with the shell commands) only when its first line
  is ``# run by the README test`` (the tritonclient example: it starts and stops its own server).
- ``pip install …`` and ``pytest`` commands are not run (the test runs inside the installed package and
  inside pytest); a line ``pip install … && unet-deploy demo`` runs its ``unet-deploy demo`` part.
- ``UNET_DEPLOY_README_SHRINK=0`` runs every command literally. By default image sizes and counts are shrunk
  (see :data:`SHRINK`) so the whole file runs in a few minutes on 2 cores; each command has 300 s
  (``UNET_DEPLOY_README_TIMEOUT``).
- By default ``unet-deploy demo`` is not run a second time: its ``demo/`` folder comes from the session's one
  literal ``unet-deploy demo`` run (:func:`conftest.demo_run`, checked in depth by ``tests/test_demo.py``),
  whose exit code and stderr are checked here like any command's.
- Commands in :data:`EXPECT` must also print what the README says they do (e.g. resume really resumes).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
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
PYTHON_MARKER = "# run by the README test"
TIMEOUT_S = float(os.environ.get("UNET_DEPLOY_README_TIMEOUT", "300"))

#: (pattern, replacement) applied to each command unless UNET_DEPLOY_README_SHRINK=0: fewer and smaller
#: images, fewer epochs where nothing needs a learned model. The journey's model (``checkpoints/``, trained
#: -e 10 as written) is the one every later section uses -- the int8 export's parity needs a model that has
#: learned -- so the Train section trains 2 epochs and resumes to 3 in its own folder (resume still proven:
#: :data:`EXPECT`) instead of retraining ``checkpoints/`` for 10 + 10 epochs.
SHRINK: list[tuple[str, Any]] = [
    (r"^(unet-deploy train --data data) -e 10 -b 8 (.*?)(\s+#.*)?$",
     r"\1 -e 2 -b 8 \2 --checkpoint-dir checkpoints-train\3"),
    (r"^unet-deploy train -f checkpoints/last\.pth -e 20(?!\S)",
     "unet-deploy train -f checkpoints-train/last.pth -e 3 --checkpoint-dir checkpoints-train"),
    (r"(--checkpoint-dir checkpoints-quality)(?!.* -e )", r"\1 -e 1"),  # the flags work in one epoch
    (r"(--n) (\d+)", lambda m: f"{m[1]} {min(int(m[2]), 64)}"),
    (r"^(unet-deploy export (?!.*--quick-verify).*?)(\s+#.*)?$", r"\1 --quick-verify\2"),  # parity at 239x160
    (r"(--heldout) (\d+)", lambda m: f"{m[1]} {min(int(m[2]), 6)}"),
    (r"(--width) (\d+) (--height) (\d+)", r"\1 192 \3 128"),
]


#: (regex matching the command as run, regexes its stdout + stderr must match): what the README says it does.
EXPECT: list[tuple[str, list[str]]] = [
    (r"^unet-deploy train -f \S+/last\.pth -e (\d+)",  # resumes at the next epoch with the stored recipe
     [r"resume: using the checkpoint's training recipe \(default\)", r"resuming from \S+last\.pth at epoch (\d+)",
      r"(?m)^epoch (\d+)/\1: "]),
    (r"^unet-deploy evaluate .*--verbose",  # docs/threads.md: the CPUs and thread counts, one line
     [r"(?m)^threads: \d+ usable CPU\(s\) \(affinity \d+ of \d+, cgroup quota .*idle OpenMP threads (sleep|spin)"]),
    (r"^OMP_WAIT_POLICY=PASSIVE unet-deploy .*--verbose", [r"idle OpenMP threads sleep \(OMP_WAIT_POLICY set\)"]),
    (r"^unet-deploy train .*--nproc 2", [r"(?m)^training .* 2 processes$"]),
]

#: The command served by the session's shared demo run (see the module docstring).
DEMO = "unet-deploy demo"


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of every ```bash block, in order (blocks indented in a list item too)."""
    return [(text[: m.start()].count("\n") + 1, textwrap.dedent(m.group(2)))
            for m in re.finditer(r"^( *)```bash\n(.*?)^\1```", text, re.M | re.S)]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, ``python -c`` command) of every ```python block that says it is run (:data:`PYTHON_MARKER`)."""
    return [(text[: m.start()].count("\n") + 1, f"python -c {shlex.quote(textwrap.dedent(m.group(2)))}")
            for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.M | re.S)
            if textwrap.dedent(m.group(2)).startswith(PYTHON_MARKER)]


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


def is_demo(command: str) -> bool:
    """The README's `unet-deploy demo` line (comment aside): served by the shared demo run."""
    return command.split("#")[0].strip() == DEMO


def _resume_epochs(command: re.Match[str], found: list[re.Match[str] | None]) -> list[str]:
    """Resume: it started after the checkpoint's epoch (not at 1) and finished the epoch ``-e`` names."""
    first, last = int(found[1][1]), int(found[2][1])  # type: ignore[index]
    return [] if 1 < first <= last == int(command[1]) else [
        f"resumed at epoch {first}, finished epoch {last} of -e {command[1]}"]


def check_expected(run: str, output: str) -> list[str]:
    """What ``run``'s :data:`EXPECT` entries want and ``output`` lacks (for resume, also :func:`_resume_epochs`)."""
    missing = []
    for pattern, wanted in EXPECT:
        if not (m := re.match(pattern, run)):
            continue
        found = [re.search(w, output) for w in wanted]
        lacking = [w for w, f in zip(wanted, found, strict=True) if f is None]
        if not lacking and pattern == EXPECT[0][0]:
            lacking = _resume_epochs(m, found)
        missing += lacking
    return missing


def pages() -> list[Path]:
    """README.md, then each ``docs/*.md`` page in the order README links them (every page must be linked)."""
    linked = re.findall(r"\]\((docs/[\w.-]+\.md)\)", README.read_text(encoding="utf-8"))
    return [README, *(ROOT / p for p in dict.fromkeys(linked))]


def runnable_blocks() -> list[tuple[str, list[str]]]:
    """("FILE:LINE", commands) of every block that runs (shell blocks, and python blocks marked to run), in
    page order: README first, then the docs pages."""
    blocks = []
    for page in pages():
        text = page.read_text(encoding="utf-8")
        found: list[tuple[int, list[str]]] = [(line, [command]) for line, command in python_blocks(text)]
        for line, body in shell_blocks(text):
            if body.lstrip().startswith(SKIP_MARKER):
                continue
            cmds = commands(body)
            if cmds:
                found.append((line, cmds))
        blocks += [(f"{page.relative_to(ROOT)}:{line}", cmds) for line, cmds in sorted(found)]
    return blocks


def test_every_docs_page_is_linked_from_the_readme_and_links_resolve() -> None:
    linked = {p.name for p in pages()[1:]}
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}
    for page in pages():
        for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: link to {target} goes nowhere"


def test_readme_parsing_rules() -> None:
    body = "pip install torch==2.13.0 -e . && unet-deploy demo   # note\npytest\nunet-deploy a \\\n  --b 1\n"
    assert commands(body) == ["unet-deploy demo   # note", "unet-deploy a --b 1"]
    assert commands("unet-deploy demo   # x") == ["unet-deploy demo   # x"] and is_demo("unet-deploy demo   # x")
    assert not is_demo("unet-deploy demo --quick")
    assert shrink("unet-deploy synth --n 96 --heldout 16 --width 480 --height 320") == \
        "unet-deploy synth --n 64 --heldout 6 --width 192 --height 128"
    assert shrink("unet-deploy export --format all   # note") == \
        "unet-deploy export --format all --quick-verify   # note"
    assert shrink("unet-deploy export --quick-verify") == "unet-deploy export --quick-verify"
    assert shrink("unet-deploy train --data data -e 10 -b 4 --bilinear") == \
        "unet-deploy train --data data -e 10 -b 4 --bilinear"  # the journey's model: later sections use it
    assert shrink("unet-deploy train --data data -e 10 -b 8 --base-channels 16   # the default recipe") == \
        "unet-deploy train --data data -e 2 -b 8 --base-channels 16 --checkpoint-dir checkpoints-train   # the " \
        "default recipe"
    assert shrink("unet-deploy train -f checkpoints/last.pth -e 20        # resume") == \
        "unet-deploy train -f checkpoints-train/last.pth -e 3 --checkpoint-dir checkpoints-train        # resume"
    assert shrink("unet-deploy train --data data --checkpoint-dir checkpoints-quality --augment strong") == \
        "unet-deploy train --data data --checkpoint-dir checkpoints-quality -e 1 --augment strong"
    # the README's own Train block, shrunk, resumes: a checked expectation exists for its second command
    (train,) = [cmds for _, cmds in runnable_blocks() if any(c.startswith("unet-deploy train -f ") for c in cmds)]
    assert [shrink(c).split("#")[0].split() for c in train][1][:3] == ["unet-deploy", "train", "-f"]
    assert any(re.match(pattern, shrink(train[1])) for pattern, _ in EXPECT)
    assert sum(is_demo(c) for _, cmds in runnable_blocks() for c in cmds) == 1
    skipped = [b for page in pages() for _, b in shell_blocks(page.read_text()) if b.lstrip().startswith(SKIP_MARKER)]
    assert all(re.match(re.escape(SKIP_MARKER) + r" \S", b.lstrip()) for b in skipped)  # each says why
    (client,) = [c for _, cmds in runnable_blocks() for c in cmds if "tritonclient" in c]  # the serve/v2 example
    assert client.startswith("python -c ") and shrink(client) == client


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_readme_commands_run_in_order(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Every command of every runnable block succeeds, in README order (then the docs pages'), from one fresh
    folder."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", COLUMNS="120",
               PYTHONPATH=str(ROOT))
    literal = os.environ.get("UNET_DEPLOY_README_SHRINK", "1") == "0"
    timings = []
    for line, cmds in runnable_blocks():
        for cmd in cmds:
            run = cmd if literal else shrink(cmd)
            start = time.perf_counter()
            if is_demo(run) and not literal:  # the session's one `unet-deploy demo`, run literally
                shared = request.getfixturevalue("demo_run")
                proc = shared["proc"]
                shutil.copytree(shared["dir"] / "demo", tmp_path / "demo", ignore=shared["ignore"])
                run += "   [shared run: conftest.demo_run]"
            else:
                try:
                    proc = subprocess.run(["bash", "-c", run], cwd=tmp_path, env=env, capture_output=True,
                                          text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{line}: `{run}` took more than {TIMEOUT_S:.0f} s")
            timings.append((time.perf_counter() - start, run))
            print(f"{timings[-1][0]:6.1f} s  {line}: {run}", flush=True)
            assert proc.returncode == 0, (f"{line}: `{run}` exited {proc.returncode}\n"
                                          f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
            assert "Traceback" not in proc.stderr, f"{line}: `{run}`\n{proc.stderr[-1500:]}"
            missing = check_expected(run, proc.stdout + proc.stderr)
            assert not missing, (f"{line}: `{run}` did not print {missing}\n"
                                 f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    assert timings, "no runnable block found in README.md"
