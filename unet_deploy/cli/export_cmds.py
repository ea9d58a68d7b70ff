"""``unet-deploy export`` and ``unet-deploy verify``: TorchScript / ONNX files that provably match eager."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from ..errors import UserError
from ..names import DEFAULT_CHECKPOINT, EXPORT_SUFFIXES, is_export_file
from ._app import app

#: --format word -> (the suffix it writes, the backend that runs it)
FORMATS = {"onnx": (EXPORT_SUFFIXES["ort"], "ort"), "torchscript": (EXPORT_SUFFIXES["torchscript"], "torchscript")}
MAX_DIR_IMAGES = 4


def _console() -> Any:
    """stdout console; wide enough for the parity table when output is not a terminal (logs, CI)."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150, highlight=False)


def _formats(fmt: str) -> list[str]:
    fmt = fmt.strip().lower()
    if fmt == "all":
        return list(FORMATS)
    if fmt in ("ts", "jit"):
        fmt = "torchscript"
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown format; use onnx, torchscript or all")
    return [fmt]


def _check_opset(opset: int) -> None:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= newest:
        raise UserError(f"--opset {opset}: use an ONNX opset from 17 to {newest} (default 18, the one "
                        "torch's exporter targets)")


def _checkpoint_path(model: Path | None) -> Path:
    if model is None:
        if not DEFAULT_CHECKPOINT.exists():
            raise UserError(f"{DEFAULT_CHECKPOINT}: no checkpoint here; train one with `unet-deploy train` "
                            "or pass -m MODEL.pth (this project's checkpoint or Pytorch-UNet's)")
        return DEFAULT_CHECKPOINT
    if is_export_file(model):
        raise UserError(f"-m {model}: export starts from a .pth checkpoint, not an exported model; "
                        f"check an existing export with `unet-deploy verify {model} -m MODEL.pth`")
    return model


def _images(items: list[Path] | None) -> list[Path]:
    """Files as given; folders contribute their first MAX_DIR_IMAGES images (sorted by name)."""
    from ..data import list_images

    out: list[Path] = []
    for item in items or []:
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise UserError(f"--images {item}: no images in this folder (.jpg, .png, .gif, ...)")
            out += found[:MAX_DIR_IMAGES]
        elif item.exists():
            out.append(item)
        else:
            raise UserError(f"--images {item}: no such file or folder")
    return out


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from ..fileio import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@app.command()
def export(
    model: Path | None = typer.Option(None, "--model", "-m",
                                      help="Checkpoint to export: this project's .pth or a Pytorch-UNet "
                                           "MODEL.pth [default: checkpoints/best.pth, the best of the last "
                                           "`unet-deploy train`]."),
    fmt: str = typer.Option("all", "--format", "-f", help="onnx, torchscript or all."),
    output: Path = typer.Option(Path("exported"), "--output", "-o", help="Folder to write the files into."),
    name: str | None = typer.Option(None, "--name",
                                    help="File name without suffix [default: the checkpoint's stem, e.g. "
                                         "exported/best.onnx and exported/best.ts]."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset (17 or newer)."),
    no_verify: bool = typer.Option(False, "--no-verify",
                                   help="Skip the parity check (not recommended): files are moved into "
                                        "place unchecked."),
    images: list[Path] | None = typer.Option(None, "--images",
                                             help="Real images (files, or folders: their first "
                                                  f"{MAX_DIR_IMAGES}) added to the parity inputs; "
                                                  "repeat the flag for several."),
    quick_verify: bool = typer.Option(False, "--quick-verify",
                                      help="Check parity at 239x160 instead of Carvana's 959x640 "
                                           "(faster on CPU; still odd sizes and batch 2)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the parity reports as JSON."),
    int8: bool = typer.Option(False, "--int8",
                              help="Also write NAME.int8.onnx: static int8 (QDQ) quantisation of the ONNX "
                                   "export, calibrated on --calibration images."),
    calibration: Path | None = typer.Option(None, "--calibration",
                                            help="Folder of training images for int8 calibration, "
                                                 "preprocessed as predict does [default: data/imgs]."),
    calibration_count: int = typer.Option(16, "--calibration-count",
                                          help="Images used for calibration (the first N by name); up to "
                                               "4 of the rest check the int8 masks."),
    fp16: bool = typer.Option(False, "--fp16",
                              help="Also write NAME.fp16.onnx: half-precision weights and activations with "
                                   "float32 input/output (for ONNX Runtime on CUDA)."),
) -> None:
    """Export a checkpoint to ONNX and/or TorchScript and check each file against eager PyTorch.

    Each file is written to a temporary name, loaded back (ONNX Runtime / torch.jit.load) and compared
    with the eager model on random inputs at 959x640 (Carvana at scale 0.5), 97x61 (not divisible by 16)
    and a batch of 2, plus --images. Only a file that passes is moved to OUTPUT/NAME.onnx or
    OUTPUT/NAME.ts; one that fails is deleted, an older file under that name is left as it was, the
    parity table is printed and the exit code is 1. Pass criteria (fp32): relative logit error <= 1e-5,
    mask pixel agreement >= 99.99 %, dice between the masks >= 0.9999.

    --int8 also writes NAME.int8.onnx (per-channel int8 weights, uint8 activations, ranges calibrated on
    --calibration images) and checks it on real images only (calibrated ranges do not cover random
    noise): the held-out calibration-folder images plus --images, by mask criteria (pixel agreement >=
    99 %, dice >= 0.98). --fp16 also writes NAME.fp16.onnx (float32 input/output), checked like the
    fp32 file with fp16 thresholds.

    Example: `unet-deploy export --format onnx` (after `unet-deploy train`), or
    `unet-deploy export -m MODEL.pth --format all -o exported --images data/imgs`, or
    `unet-deploy export --format onnx --int8 --calibration data/imgs --calibration-count 16`
    """
    formats, calib_images, ckpt_path, image_paths = _checked_options(
        fmt, int8, fp16, calibration, calibration_count, opset, model, name, images)

    from ..checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    eager = ckpt.build_model("cpu")
    stem = name or ckpt_path.stem
    console = _console()
    console.print(f"exporting {ckpt_path} ({ckpt.kind}, {ckpt.config.model.architecture}) to {output}/")

    output.mkdir(parents=True, exist_ok=True)
    done = _Outcome()
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=output))
    try:
        cases = None
        if not no_verify:
            from ..parity import default_cases

            cases = default_cases(ckpt.config, image_paths, quick=quick_verify)
        for f in formats:
            _export_format(f, eager, ckpt.config, staging, output / f"{stem}{FORMATS[f][0]}", opset, cases,
                           no_verify, console, done)
        onnx_written = next((t for f, t in done.written if f == "onnx"), None)
        for kind, wanted in (("int8", int8), ("fp16", fp16)):
            if wanted:
                _export_derived(kind, onnx_written, ckpt.config, eager, staging, output / f"{stem}.{kind}.onnx",
                                calib_images, calibration_count, image_paths, cases, no_verify, quick_verify,
                                console, done)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _report(json_out, ckpt_path, done, ckpt.training, console)
    if done.failed:
        raise typer.Exit(1)


@dataclass
class _Outcome:
    """What export did: the --json entry per file, the files written (format, path) and what failed."""

    results: dict[str, Any] = field(default_factory=dict)
    written: list[tuple[str, Path]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _checked_options(fmt: str, int8: bool, fp16: bool, calibration: Path | None, calibration_count: int,
                     opset: int, model: Path | None, name: str | None, images: list[Path] | None,
                     ) -> tuple[list[str], list[Path], Path, list[Path]]:
    """Check export's options before any work: (formats, calibration images, checkpoint, --images files)."""
    formats = _formats(fmt)
    if (int8 or fp16) and "onnx" not in formats:
        raise UserError(f"--{'int8' if int8 else 'fp16'} derives from the ONNX export; use --format onnx or all")
    calib_images: list[Path] = []
    if int8:
        calib_images = _calibration_images(calibration, calibration_count)
    if "onnx" in formats:
        _check_opset(opset)
    ckpt_path = _checkpoint_path(model)
    if name is not None and (not name.strip() or Path(name).name != name):
        raise UserError(f"--name {name!r}: give a plain file name without folders (use -o for the folder)")
    return formats, calib_images, ckpt_path, _images(images)


def _export_format(f: str, eager: Any, config: Any, staging: Path, target: Path, opset: int, cases: Any,
                   no_verify: bool, console: Any, done: _Outcome) -> None:
    """Write one format to the staging folder, check it (unless --no-verify) and move it into place."""
    backend = FORMATS[f][1]
    staged = staging / target.name
    seconds = _write(f, eager, config, staged, opset)
    entry: dict[str, Any] = {"path": str(target), "export_s": round(seconds, 3)}
    if cases is not None:
        report = _verify_file(staged, target, backend, eager, cases, console)
        entry["parity"] = report.to_dict()
        if not report.passed:
            done.failed.append(f)
            entry["written"] = False
            done.results[f] = entry
            console.print(f"[bold red]{f}: parity FAILED; {target} was not written"
                          f"{' (the older file there is unchanged)' if target.exists() else ''}[/]")
            return
    os.replace(staged, target)
    entry.update(written=True, bytes=target.stat().st_size)
    done.results[f] = entry
    done.written.append((f, target))
    console.print(f"wrote {target} ({_size(target)}, exported in {seconds:.1f} s"
                  f"{', parity not checked' if no_verify else ', parity ok'})")


def _export_derived(kind: str, onnx_written: Path | None, config: Any, eager: Any, staging: Path, target: Path,
                    calib_images: list[Path], count: int, image_paths: list[Path], cases: Any, no_verify: bool,
                    quick: bool, console: Any, done: _Outcome) -> None:
    """NAME.int8.onnx / NAME.fp16.onnx from the fp32 ONNX file, or a failure when that was not written."""
    if onnx_written is None:
        done.failed.append(kind)
        console.print(f"[bold red]{kind}: skipped, the fp32 ONNX export was not written[/]")
        return
    entry, ok = _derived(kind, onnx_written, config, eager, staging, target, calib_images, count, image_paths,
                         cases, no_verify, quick, console)
    done.results[f"onnx-{kind}"] = entry
    if ok:
        done.written.append(("onnx", Path(entry["path"])))
    else:
        done.failed.append(kind)


def _report(json_out: Path | None, ckpt_path: Path, done: _Outcome, training: dict[str, Any], console: Any,
            ) -> None:
    """--json, then a next-step command for each file written."""
    if json_out:
        _write_json(json_out, {"checkpoint": str(ckpt_path), "formats": done.results})
        console.print(f"wrote {json_out}")
    for f, target in done.written:
        console.print(_next_hint(FORMATS[f][1], target, training))


def _next_hint(backend: str, target: Path, training: dict[str, Any]) -> str:
    """A command that works when pasted here: predict the held-out images of the training data (or its
    images) into predictions/ (never into a data folder); `verify` when the data folder is not here."""
    import shlex

    data = Path(str((training.get("args") or {}).get("data") or "data"))
    images = next((d for d in (data / "heldout" / "imgs", data / "imgs") if d.is_dir()), None)
    if images is None:
        return f"next: unet-deploy verify {shlex.quote(str(target))}"
    return "next: unet-deploy " + shlex.join(["predict", "--backend", backend, "-m", str(target), str(images),
                                              "-o", "predictions"])


def _calibration_images(folder: Path | None, count: int) -> list[Path]:
    """All images of the calibration folder, sorted by name (the first ``count`` calibrate)."""
    from ..data import list_images

    if count < 1:
        raise UserError(f"--calibration-count {count}: use 1 or more images")
    folder = folder or Path("data/imgs")
    if not folder.is_dir():
        raise UserError(f"--calibration {folder}: no such folder; pass training images with --calibration DIR")
    found = list_images(folder)
    if not found:
        raise UserError(f"--calibration {folder}: no images in this folder (.jpg, .png, .gif, ...)")
    return found


def _derived(kind: str, source: Path, config: Any, eager: Any, staging: Path, target: Path,
             calib_images: list[Path], count: int, image_paths: list[Path], cases: Any, no_verify: bool,
             quick: bool, console: Any) -> tuple[dict[str, Any], bool]:
    """Write NAME.int8.onnx / NAME.fp16.onnx from the verified fp32 export, check it, move it into place."""
    from ..export import calibration_batches, convert_onnx_fp16, quantize_onnx_int8

    staged = staging / target.name
    t0 = time.perf_counter()
    entry: dict[str, Any] = {"path": str(target)}
    if kind == "int8":
        used, held_out = calib_images[:count], calib_images[count:count + 4]
        console.print(f"int8: calibrating on {len(used)} image(s) from {used[0].parent}")
        quantize_onnx_int8(source, config, staged, calibration_batches(used, config))
        entry["calibration_images"] = [str(p) for p in used]
        if not no_verify:
            from ..parity import image_cases

            cases = image_cases([*(held_out or used[:2]), *image_paths], config)
            if quick:
                cases = cases[:2]
    else:
        convert_onnx_fp16(source, config, staged)
    seconds = time.perf_counter() - t0
    entry["export_s"] = round(seconds, 3)
    if cases is not None and not no_verify:
        report = _verify_file(staged, target, "ort", eager, cases, console)
        entry["parity"] = report.to_dict()
        if not report.passed:
            entry["written"] = False
            console.print(f"[bold red]{kind}: parity FAILED; {target} was not written[/]")
            return entry, False
    os.replace(staged, target)
    entry.update(written=True, bytes=target.stat().st_size)
    console.print(f"wrote {target} ({_size(target)}, made in {seconds:.1f} s"
                  f"{', parity not checked' if no_verify else ', parity ok'})")
    return entry, True


def _write(fmt: str, eager: Any, config: Any, path: Path, opset: int) -> float:
    from ..export import export_onnx, export_torchscript

    t0 = time.perf_counter()
    if fmt == "onnx":
        export_onnx(eager, config, path, opset=opset)
    else:
        export_torchscript(eager, config, path)
    return time.perf_counter() - t0


def _verify_file(staged: Path, target: Path, backend: str, reference: Any, cases: Any, console: Any) -> Any:
    from ..backends import load_backend
    from ..parity import parity

    candidate = load_backend(staged, backend, device="cpu")
    report = parity(reference, candidate, cases)
    report.candidate = f"{target} ({candidate.name}, {candidate.provider})"
    console.print(report.table())
    return report


def _recorded_checkpoint(model_file: Path, source: dict[str, Any]) -> Path:
    """The checkpoint an export was made from, found from any folder: the absolute path recorded at export
    time, then the recorded path relative to the export's folder (and its parent), then to the current
    folder. A candidate whose sha256 is the recorded one wins; otherwise the first that exists."""
    from ..fileio import sha256_file

    recorded, absolute = str(source.get("path") or ""), str(source.get("abs_path") or "")
    if not recorded and not absolute:
        raise UserError(f"{model_file}: records no source checkpoint; pass -m CHECKPOINT.pth as the eager "
                        "reference")
    tried = [Path(absolute)] if absolute else []
    if recorded:
        rel = Path(recorded)
        tried += [rel] if rel.is_absolute() else [model_file.parent / rel, model_file.parent.parent / rel, rel]
    unique = list(dict.fromkeys(tried))
    found = [p for p in unique if p.is_file()]
    if not found:
        raise UserError(f"{model_file}: the checkpoint it was exported from is not found (tried "
                        f"{', '.join(str(p) for p in unique)}); pass -m CHECKPOINT.pth as the eager reference")
    want = source.get("sha256")
    return next((p for p in found if want and sha256_file(p) == want), found[0])


@app.command()
def verify(
    model_file: Path = typer.Argument(..., help="Exported model: .onnx or .ts (or another .pth)."),
    model: Path | None = typer.Option(None, "--model", "-m",
                                      help="Reference checkpoint run in eager PyTorch [default: the "
                                           "checkpoint recorded in the export: its absolute path, else its "
                                           "path relative to the export's folder or to this folder; the "
                                           "one with the recorded sha256 wins]."),
    images: list[Path] | None = typer.Option(None, "--images",
                                             help="Real images (files, or folders: their first "
                                                  f"{MAX_DIR_IMAGES}) added to the parity inputs."),
    quick: bool = typer.Option(False, "--quick", help="239x160 instead of 959x640 for the large case."),
    backend: str | None = typer.Option(None, "--backend", help="torch, torchscript or ort (default: from "
                                                               "the file's suffix)."),
    device: str = typer.Option("cpu", "--device", help="Device for both models: cpu, cuda or cuda:N."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the parity report as JSON."),
) -> None:
    """Check an existing export against eager PyTorch (same inputs and criteria as `export`).

    Exits 1 when parity fails, with the table. fp16/bf16 exports are judged by looser thresholds
    (relative error <= 1e-2, pixel agreement >= 99.9 %, dice >= 0.998).

    Example: `unet-deploy verify exported/best.onnx -m checkpoints/best.pth --images data/imgs`
    """
    from ..backends import load_backend, read_embedded_config
    from ..fileio import sha256_file
    from ..parity import default_cases, parity

    if not model_file.is_file():
        raise UserError(f"{model_file}: exported model not found; create it with `unet-deploy export`")
    console = _console()
    embedded = read_embedded_config(model_file) if is_export_file(model_file) else None
    if model is None:
        model = _recorded_checkpoint(model_file, embedded.source if embedded else {})
    image_paths = _images(images)
    reference = load_backend(model, "torch", device=device)
    if embedded and embedded.source.get("sha256") and embedded.source["sha256"] != sha256_file(model):
        console.print(f"[yellow]note: {model} has changed since {model_file} was exported from it "
                      "(different sha256); a mismatch below may just mean it was retrained[/]")
    candidate = load_backend(model_file, backend, device=device)
    report = parity(reference, candidate, default_cases(candidate.config, image_paths, quick=quick))
    report.reference, report.candidate = str(reference.describe()), str(candidate.describe())  # one-line labels
    console.print(report.table())
    console.print(report.summary())
    if json_out:
        _write_json(json_out, report.to_dict())
        console.print(f"wrote {json_out}")
    if not report.passed:
        raise typer.Exit(1)
