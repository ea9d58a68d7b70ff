"""Options shared by several commands, declared once (the CRF flags are in :mod:`._crf`), and the one flag
vocabulary: a short flag means the same thing in every command (Pytorch-UNet's ``-e -b -l -f -s -v -c -n -t -i
-o -m`` where its scripts define them). Short flags that once meant something else in one command still work
for now: :func:`rewrite_deprecated` turns them into their long form and says so in one line."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import typer

__all__ = ["TILE", "TILE_OVERLAP", "VERBOSE", "say_threads", "DEPRECATED_SHORT", "rewrite_deprecated"]

TILE = typer.Option(None, "--tile", show_default=False,
                    help="Largest tile side in model-input pixels (after --scale): a larger image runs as the "
                         "fewest even, overlapping tiles, blended; memory grows with the tile, not the image "
                         "(--crf still runs on the whole image). Default: whole images, tiled automatically "
                         "(one notice line) when one cannot fit in memory.")
TILE_OVERLAP = typer.Option(None, "--tile-overlap", show_default=False,
                            help="Least overlap of neighbouring tiles in model-input pixels (default: an eighth "
                                 "of --tile, e.g. 80 for 640).")

VERBOSE = typer.Option(False, "--verbose", help="Also say which CPUs this process may use (affinity, cgroup "
                                                "quota) and the thread counts it chose.")


def say_threads(verbose: bool, processes: int = 1, crf_workers: int | None = None) -> None:
    """With ``--verbose``: one line on stderr with the CPUs and thread counts this run uses."""
    if verbose:
        from unet_deploy.runtime.cpu_share import thread_report

        print(thread_report(processes, crf_workers), file=sys.stderr)


#: (command, old short flag) -> the long flag it stood for. ``-b`` is ``--batch-size``, ``-n`` ``--no-save``
#: and ``-f`` ``--load`` (Pytorch-UNet's), so these meant another thing in one command.
DEPRECATED_SHORT = {("benchmark", "-b"): "--backends", ("benchmark", "-n"): "--runs", ("export", "-f"): "--format",
                    ("synth", "-n"): "--n"}


def rewrite_deprecated(args: Sequence[str]) -> list[str]:
    """``args`` with each deprecated short flag of its command replaced by the long one (one line on stderr
    per flag; ``-n5`` too); arguments after ``--`` are left as they are."""
    out = list(args)
    command = next((a for a in out if not a.startswith("-")), None)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        for (owner, short), long in DEPRECATED_SHORT.items():
            if owner == command and (arg == short or (arg.startswith(short) and not arg.startswith("--"))):
                out[i] = long if arg == short else f"{long}={arg[len(short):]}"
                print(f"note: `{command} {short}` is deprecated: use {long} ({short} is "
                      f"{_MEANING[short]} elsewhere)", file=sys.stderr)
    return out


_MEANING = {"-b": "--batch-size", "-n": "--no-save", "-f": "--load"}
