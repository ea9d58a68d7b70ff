"""``unet-deploy export`` and ``unet-deploy verify``: TorchScript / ONNX / OpenVINO files that provably match
eager."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from unet_deploy.cli._app import app
from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_write_text, sha256_file
from unet_deploy.names import MAX_DIR_IMAGES
from unet_deploy.runtime.registry import backend_for_path, is_export_file

if TYPE_CHECKING:  # the export pipeline imports torch, rich's console is slow to load: only when run
    from rich.console import Console

    from unet_deploy.export.exporter import ExportResult

def _console() -> Console:
    """stdout console; wide enough for the parity table when output is not a terminal (logs, CI)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 150, highlight=False)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@app.command()
def export(
    model: Path | None = typer.Option(None, "--model", "-m",
                                      help="Checkpoint to export: this project's .pth or a Pytorch-UNet "
                                           "MODEL.pth [default: checkpoints/best.pth, the best of the last "
                                           "`unet-deploy train`]."),
    fmt: str = typer.Option("all", "--format",
                            help="onnx, torchscript, openvino (IR: NAME.xml + NAME.bin), several joined by commas, "
                                 "or all (openvino when installed: pip install \"unet-deploy[openvino]\")."),
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
                              help="Also write NAME.int8.onnx (static int8 QDQ quantisation of the ONNX export) "
                                   "and, with the openvino format, NAME.int8.xml (NNCF post-training "
                                   "quantisation of the IR), calibrated on --calibration images."),
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
    """Export a checkpoint to ONNX, TorchScript and/or OpenVINO IR and check each file against eager PyTorch.

    Each file is written to a temporary name, loaded back (ONNX Runtime / torch.jit.load / OpenVINO) and
    compared with the eager model on random inputs at 959x640 (Carvana at scale 0.5), 97x61 (not divisible by
    16) and a batch of 2, plus --images. Only a file that passes is moved to OUTPUT/NAME.onnx, OUTPUT/NAME.ts
    or
    OUTPUT/NAME.xml (+ NAME.bin, placed first); one that fails is deleted, an older file under that name is left
    as it was, the parity table is printed and the exit code is 1. Pass criteria (fp32): relative logit error <=
    1e-5, mask pixel agreement >= 99.99 %, dice between the masks >= 0.9999.

    --int8 also writes NAME.int8.onnx (per-channel int8 weights, uint8 activations, ranges calibrated on
    --calibration images) and checks it on real images only (calibrated ranges do not cover random
    noise): the held-out calibration-folder images plus --images (int8: relative error <= 0.6, pixel
    agreement >= 99 %, dice >= 0.98); with --format openvino it also writes NAME.int8.xml, checked the same
    way. --fp16 also writes NAME.fp16.onnx (float32 input/output), checked with the fp16 thresholds.

    The OpenVINO IR is converted from the ONNX export and written once its fp32 check passes. Then it is
    checked at each reduced precision this CPU runs (bf16 with AVX512_BF16 or AMX): the verdict is shown and
    recorded in the IR, and `predict` runs the fastest verified precision here (--precision fp32 forces
    fp32). A reduced precision never blocks a file. Reduced precisions are judged on photos (--images, else a
    synthetic car) by their masks and on every input by their logits (bf16: relative error <= 0.3, pixel
    agreement >= 99.5 %, dice >= 0.99).

    Example: `unet-deploy export --format onnx` (after `unet-deploy train`), or
    `unet-deploy export -m MODEL.pth --format all -o exported --images data/imgs`, or
    `unet-deploy export --format onnx --int8 --calibration data/imgs --calibration-count 16`, or
    `unet-deploy export --format openvino --int8`
    """
    from unet_deploy.api import export as export_checkpoint

    console = _console()
    done = export_checkpoint(model, fmt, output=output, name=name, opset=opset, verify=not no_verify,
                             images=images or (), quick_verify=quick_verify, int8=int8, calibration=calibration,
                             calibration_count=calibration_count, fp16=fp16, log=console.print)
    _report(json_out, done, console)
    if not done.passed:
        raise typer.Exit(1)


def _report(json_out: Path | None, done: ExportResult, console: Console) -> None:
    """--json, then a next-step command for each file written."""
    if json_out:
        _write_json(json_out, done.to_dict())
        console.print(f"wrote {json_out}")
    for _fmt, target in done.written:
        console.print(_next_hint(backend_for_path(target), target, done.training))


def _next_hint(backend: str, target: Path, training: dict[str, Any]) -> str:
    """A command that works when pasted here: predict the held-out images of the training data (or its
    images) into predictions/ (never into a data folder); `verify` when the data folder is not here."""
    data = Path(str((training.get("args") or {}).get("data") or "data"))
    images = next((d for d in (data / "heldout" / "imgs", data / "imgs") if d.is_dir()), None)
    if images is None:
        return f"next: unet-deploy verify {shlex.quote(str(target))}"
    return "next: unet-deploy " + shlex.join(["predict", "--backend", backend, "-m", str(target), str(images),
                                              "-o", "predictions"])


def _recorded_checkpoint(model_file: Path, source: dict[str, Any]) -> Path:
    """The checkpoint an export was made from, found from any folder: the absolute path recorded at export
    time, then the recorded path relative to the export's folder (and its parent), then to the current
    folder. A candidate whose sha256 is the recorded one wins; otherwise the first that exists."""
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
    model_file: Path = typer.Argument(..., help="Exported model: .onnx, .ts or .xml (or another .pth)."),
    model: Path | None = typer.Option(None, "--model", "-m",
                                      help="Reference checkpoint run in eager PyTorch [default: the "
                                           "checkpoint recorded in the export: its absolute path, else its "
                                           "path relative to the export's folder or to this folder; the "
                                           "one with the recorded sha256 wins]."),
    images: list[Path] | None = typer.Option(None, "--images",
                                             help="Real images (files, or folders: their first "
                                                  f"{MAX_DIR_IMAGES}) added to the parity inputs."),
    quick: bool = typer.Option(False, "--quick", help="239x160 instead of 959x640 for the large case."),
    backend: str | None = typer.Option(None, "--backend", help="torch, torchscript, ort or openvino (default: "
                                                               "from the file's suffix; openvino also runs .onnx)."),
    device: str = typer.Option("cpu", "--device", help="Device for both models: cpu, cuda or cuda:N (OpenVINO: "
                                                       "cpu, or GPU/NPU/AUTO for the candidate)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the parity report as JSON."),
    precision: str | None = typer.Option(None, "--precision", show_default=False,
                                         help="--backend openvino: auto (default: what predict runs here), fp32, "
                                              "bf16 or fp16; a .pth candidate: fp32, bf16 or fp16 (GPU)."),
) -> None:
    """Check an existing export against eager PyTorch (same inputs and criteria as `export`).

    Exits 1 when parity fails, with the table. Reduced precisions are judged by their own thresholds, on
    car photos by their masks and on random inputs by their logits only (bf16: relative error <= 0.3,
    pixel agreement >= 99.5 %, dice >= 0.99; fp16: relative error <= 0.1, pixel agreement >= 99.9 %,
    dice >= 0.998; int8: relative error <= 0.6, pixel agreement >= 99 %, dice >= 0.98, car photos only). An
    OpenVINO model runs at the precision `predict` would use here (--precision to choose).

    Example: `unet-deploy verify exported/best.onnx -m checkpoints/best.pth --images data/imgs`
    """
    from unet_deploy.export.exporter import parity_images
    from unet_deploy.export.parity import default_cases, parity, reduced_precision_cases
    from unet_deploy.runtime.loader import load_backend, read_embedded_config

    if not model_file.is_file():
        raise UserError(f"{model_file}: exported model not found; create it with `unet-deploy export`")
    console = _console()
    embedded = read_embedded_config(model_file) if is_export_file(model_file) else None
    if model is None:
        model = _recorded_checkpoint(model_file, embedded.source if embedded else {})
    image_paths = parity_images(images)
    reference = load_backend(model, "torch", device=device)
    if embedded and embedded.source.get("sha256") and embedded.source["sha256"] != sha256_file(model):
        console.print(f"[yellow]note: {model} has changed since {model_file} was exported from it "
                      "(different sha256); a mismatch below may just mean it was retrained[/]")
    candidate = load_backend(model_file, backend, device=device, precision=precision)
    cases = default_cases(candidate.config, image_paths, quick=quick)
    if candidate.precision != "fp32":
        cases = reduced_precision_cases(cases, candidate.config, quick)
    report = parity(reference, candidate, cases)
    report.reference, report.candidate = str(reference.describe()), str(candidate.describe())  # one-line labels
    console.print(report.table())
    console.print(report.summary())
    if json_out:
        _write_json(json_out, report.to_dict())
        console.print(f"wrote {json_out}")
    if not report.passed:
        raise typer.Exit(1)
