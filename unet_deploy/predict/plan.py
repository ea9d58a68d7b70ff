"""Planning a run before anything is predicted: which files, where each output goes, which model.

Also checks that a submission can be written (:func:`check_rle_target`), so a run never fails at its end.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from unet_deploy.errors import UserError
from unet_deploy.images.image_io import IMAGE_SUFFIXES, MASK_SUFFIX, OVERLAY_SUFFIX, is_own_output, list_images
from unet_deploy.images.postprocess import MASK_FORMATS
from unet_deploy.names import DEFAULT_CHECKPOINT, DEMO_DIR, EXPORT_DIR
from unet_deploy.predict.records import Job
from unet_deploy.runtime.registry import FORMATS, backend_for_path
from unet_deploy.runtime.registry import spec as backend_spec

__all__ = ["expand_specs", "expand_inputs", "plan_jobs", "plan_run", "check_rle_target", "default_model",
           "newest_verified_export", "DEMO_DIR"]

GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------------------- inputs
class _OrderedInputs:
    """Input paths in the order first seen (one entry per file), with a problem for specs that found none."""

    def __init__(self) -> None:
        self.items: list[tuple[Path, str | None]] = []
        self.seen: set[str] = set()

    def add(self, path: Path) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in self.seen:
            self.seen.add(key)
            self.items.append((path, None))

    def add_spec(self, spec: str | Path) -> None:
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_dir():
            found = list_images(p)
            if not found:
                self.items.append((p, f"{p}: folder has no images ({', '.join(IMAGE_SUFFIXES)})"))
        elif not p.exists() and GLOB_CHARS & set(text):
            matches = sorted(glob.glob(str(p), recursive=True))
            found = [Path(m) for m in matches if not (Path(m).is_file() and is_own_output(Path(m)))]
            if not found:
                self.items.append((p, f"{text}: no file matches this pattern"))
        else:
            found = [p]
        for q in found:
            self.add(q)


def expand_specs(specs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """(path, None) for each input file in order; (spec, problem) where a spec yields no file."""
    inputs = _OrderedInputs()
    for spec in specs:
        inputs.add_spec(spec)
    return inputs.items


def expand_inputs(specs: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, not recursive) and globs -> ordered, de-duplicated paths.

    Returns ``(paths, problems)``: a folder without images or a glob matching nothing is a one-line
    problem. Paths that do not exist are kept, so predicting them reports "not found" in its place.
    Folder and glob expansion leave out this tool's own outputs (``*_OUT.png``, ``*_OVERLAY.png``).
    """
    items = expand_specs(specs)
    return [p for p, e in items if e is None], [e for _, e in items if e is not None]


# --------------------------------------------------------------------------------------- output names
def _mask_output_for(path: Path, folder: Path | None) -> Path:
    return (folder if folder is not None else path.parent) / f"{path.stem}{MASK_SUFFIX}.png"


def _overlay_for(output: Path) -> Path:
    stem = output.stem[: -len(MASK_SUFFIX)] if output.stem.endswith(MASK_SUFFIX) else output.stem
    return output.with_name(f"{stem}{OVERLAY_SUFFIX}.png")


def _output_names(inputs: Sequence[Path], outputs: list[str]) -> tuple[Path | None, list[Path | None]]:
    """(folder for every mask, or None; one name per input, or Nones) from the ``-o`` values."""
    if not outputs:
        return None, [None] * len(inputs)
    first = outputs[0]
    as_folder = len(outputs) == 1 and (Path(first).is_dir() or first.endswith(("/", os.sep))
                                       or (len(inputs) > 1 and not Path(first).suffix))
    if as_folder:
        return Path(first), [None] * len(inputs)
    if len(outputs) != len(inputs):
        raise UserError(f"-o: {len(outputs)} output names for {len(inputs)} inputs; give one name per "
                        "input or one folder")
    for o in outputs:
        if Path(o).suffix.lower() not in MASK_FORMATS:
            raise UserError(f"-o {o}: masks are written losslessly; use a .png name (or .gif, .bmp, "
                            ".tif) or a folder")
    return None, [Path(o) for o in outputs]


def _clash(path: Path, targets: Sequence[Path | None], input_keys: set[str], claimed: dict[str, Path]
           ) -> str | None:
    """Why ``path``'s outputs cannot be written (an input, or another input's output), else None; claims them."""
    error = None
    for target in targets:
        if target is None:
            continue
        key = os.path.normcase(os.path.abspath(target))
        if key in input_keys:
            error = (f"{path}: output {target} is an input file; refusing to overwrite it "
                     "(choose another -o)")
        elif key in claimed:
            error = (f"{path}: output {target} is also the output of {claimed[key]}; use -o FOLDER per "
                     "input folder or give names")
        else:
            claimed[key] = path
    return error


def plan_jobs(inputs: Sequence[Path], outputs: Sequence[str | Path] | None = None, save: bool = True,
              viz: bool = False) -> list[Job]:
    """Decide every output name before anything runs.

    ``outputs``: none -> ``<stem>_OUT.png`` beside each input; one existing folder (or a name ending in
    ``/``, or one name without suffix for several inputs) -> ``FOLDER/<stem>_OUT.png``; otherwise exactly
    one name per input. An output equal to an input, or two inputs mapped to one output, is a per-file
    error (the input is never overwritten).
    """
    folder, names = _output_names(inputs, [str(o) for o in outputs or []])
    input_keys = {os.path.normcase(os.path.abspath(p)) for p in inputs}
    claimed: dict[str, Path] = {}
    jobs = []
    for i, path in enumerate(inputs):
        out = names[i] or _mask_output_for(path, folder)
        overlay = _overlay_for(out) if viz else None
        error = _clash(path, (out if save else None, overlay), input_keys, claimed)
        jobs.append(Job(i, path, out if save else None, overlay, error))
    return jobs


def plan_run(specs: Sequence[str | Path], outputs: Sequence[str | Path] | None, save: bool, viz: bool
             ) -> list[Job]:
    """One job per input file of ``specs``; a spec that matched nothing is a job with its ``error``, in its
    place (so it keeps its place in the run and in the error report)."""
    items = expand_specs(specs)
    planned = iter(plan_jobs([p for p, e in items if e is None], outputs, save=save, viz=viz))
    return [replace(next(planned), index=i) if e is None else Job(i, p, error=e)
            for i, (p, e) in enumerate(items)]


# --------------------------------------------------------------------------------------- submission
def check_rle_target(path: str | Path) -> None:
    """Raise a one-line UserError unless a submission can be written at ``path`` (checked before a run)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--rle {path}: is a folder; give a file name, e.g. {path / 'submission.csv'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing folders are created: the first existing one must take them
    if not parent.is_dir():
        raise UserError(f"--rle {path}: {parent} is not a folder; give a submission path in a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--rle {path}: cannot write in {parent} (permission denied); choose a writable "
                        "folder")


# --------------------------------------------------------------------------------------- models
def _newest(folder: Path, suffix: str) -> Path | None:
    found = sorted(folder.glob(f"*{suffix}"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def _verified(path: Path) -> bool:
    """Whether an export's parity was checked when it was written (export places a file only when it passes;
    ``--no-verify`` records ``source.verified: false``). A file whose config cannot be read is not trusted."""
    from unet_deploy.runtime.loader import read_embedded_config

    try:
        config = read_embedded_config(path)
    except UserError:
        return False
    return config is not None and config.source.get("verified", True) is not False


def newest_verified_export(folder: Path, not_before: float = 0.0) -> Path | None:
    """The export to run from ``folder``: of the fp32 exports (not ``*.int8.*`` / ``*.fp16.*``) whose runtime is
    installed, whose parity was verified and that are not older than ``not_before`` (the checkpoint's mtime:
    older ones may be of another model), the newest one's stem; of that stem's files (one export run), the
    first in the registry's order of formats (ONNX, TorchScript, OpenVINO)."""
    if not folder.is_dir():
        return None
    files = sorted((p for s in FORMATS.values() if s.installed() for p in folder.glob(f"*{s.export_suffix}")
                    if not p.stem.endswith((".int8", ".fp16")) and p.stat().st_mtime >= not_before),
                   key=lambda p: -p.stat().st_mtime)
    newest = next((p for p in files if _verified(p)), None)
    if newest is None:
        return None
    rank = {s.export_suffix: s.export_rank for s in FORMATS.values()}
    same_run = sorted((p for p in files if p.stem == newest.stem), key=lambda p: rank[p.suffix])
    return next(p for p in same_run if p == newest or _verified(p))


def _pick(root: Path) -> tuple[Path, str] | None:
    """The model of one folder with no backend asked for: its newest verified export unless its checkpoint is
    newer (then the checkpoint), and why."""
    ckpt = root / DEFAULT_CHECKPOINT
    since = ckpt.stat().st_mtime if ckpt.is_file() else 0.0
    export = newest_verified_export(root / EXPORT_DIR, since)
    if export is not None:
        return export, f"the newest verified export ({backend_spec(backend_for_path(export)).label})"
    if ckpt.is_file():
        return ckpt, (f"eager torch; no verified export as new as it in {root / EXPORT_DIR}/ "
                      "(`unet-deploy export --format onnx` makes a faster one)")
    return None


def default_model(backend: str | None, root: str | Path = ".", say: bool = True) -> Path:
    """The model used when ``-m`` is omitted, said in one line on stderr (``say``).

    No ``backend``: the newest verified export in ``exported/`` (ONNX first among one export's files) unless
    ``checkpoints/best.pth`` is newer, then that checkpoint; a ``backend``: ``checkpoints/best.pth`` (torch) or
    the newest ``exported/*.onnx`` / ``*.ts`` / ``*.xml``. When there is none, the same under ``demo/`` (what
    `unet-deploy demo` wrote, so its model is found from the folder the demo ran in).
    """
    root = Path(root)
    entry = backend_spec(backend) if backend is not None else None  # an unknown name: one line with the closest
    if entry is None:
        picked = _pick(root) or _pick(root / DEMO_DIR)
        wanted = f"{root / EXPORT_DIR}/ export or {root / DEFAULT_CHECKPOINT}"
        how = "train one with `unet-deploy train`"
        found = [picked[0]] if picked else []
    elif entry.export_format is None:
        found = [p for p in (root / DEFAULT_CHECKPOINT, root / DEMO_DIR / DEFAULT_CHECKPOINT) if p.is_file()]
        wanted, how = str(root / DEFAULT_CHECKPOINT), "train one with `unet-deploy train`"
        picked = (found[0], "eager torch, as --backend asks") if found else None
    else:
        suffix, fmt = entry.export_suffix, entry.export_format
        found = [p for p in (_newest(root / EXPORT_DIR, suffix), _newest(root / DEMO_DIR / EXPORT_DIR, suffix)) if p]
        wanted, how = str(root / EXPORT_DIR / f"*{suffix}"), f"create one with `unet-deploy export --format {fmt}`"
        picked = (found[0], f"the newest {fmt} export, as --backend asks") if found else None
    if not found or picked is None:
        raise UserError(f"no -m given and no {wanted} (nor the demo's under {root / DEMO_DIR}/) found; "
                        f"{how}, run `unet-deploy demo`, or pass -m MODEL")
    if say:
        demo = " (the demo's)" if DEMO_DIR in picked[0].relative_to(root).parts[:1] else ""
        print(f"no -m given: using {picked[0]}{demo}: {picked[1]}", file=sys.stderr)
    return picked[0]
