"""The export pipeline behind ``unet-deploy export`` and :func:`unet_deploy.api.export`.

checkpoint -> eager model -> each format written to a staging folder inside the output folder ->
loaded back and compared with eager (:func:`unet_deploy.export.parity.parity`) -> moved into place only when it
passes. The OpenVINO IR (``NAME.xml`` + ``NAME.bin``) is converted from the fp32 ONNX export and checked
like it (plus bf16 inference at the bf16 thresholds where the CPU has bf16). ``--int8`` / ``--fp16`` files
derive from the verified fp32 ONNX file (and ``--int8`` also from the IR, through NNCF) and are checked the
same way (int8 on real held-out calibration images). A file that fails is deleted and an older file under its
name is left as it was; the staging folder is removed whatever happens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.config import DeployConfig
from unet_deploy.errors import UserError
from unet_deploy.export import (
    DEFAULT_CALIBRATION_COUNT,
    DEFAULT_OPSET,
    calibration_batches,
    convert_onnx_fp16,
    export_onnx,
    export_torchscript,
    quantize_onnx_int8,
)
from unet_deploy.export.openvino_writer import (
    bin_path,
    convert_onnx_to_ir,
    openvino_installed,
    place_ir,
    quantize_ir_int8,
    set_ir_metadata,
)
from unet_deploy.export.parity import (
    ParityCase,
    ParityReport,
    default_cases,
    image_cases,
    parity,
    reduced_precision_cases,
)
from unet_deploy.images.image_io import list_images
from unet_deploy.names import DEFAULT_CHECKPOINT, EXPORT_DIR, MAX_DIR_IMAGES
from unet_deploy.runtime import load_backend
from unet_deploy.runtime.backend_options import OpenVinoOptions
from unet_deploy.runtime.cpu_features import bf16_kernels
from unet_deploy.runtime.openvino_backend import import_openvino, openvino_cpu_has
from unet_deploy.runtime.precision import REDUCED, VERDICTS_KEY, verdict_entry, verdict_record
from unet_deploy.runtime.registry import EXPORT_SUFFIXES, is_export_file

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "run_export", "parse_formats", "parity_images"]

#: format word -> (the suffix it writes, the backend that runs it)
FORMATS = {"onnx": (EXPORT_SUFFIXES["ort"], "ort"), "torchscript": (EXPORT_SUFFIXES["torchscript"], "torchscript"),
           "openvino": (EXPORT_SUFFIXES["openvino"], "openvino")}
_ALIASES = {"ts": "torchscript", "jit": "torchscript", "ov": "openvino", "ir": "openvino"}
Log = Callable[[Any], None]


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export and how to check it (the ``unet-deploy export`` flags)."""

    formats: Sequence[str] = tuple(FORMATS)  #: "onnx", "torchscript" and/or "openvino"
    output: Path = Path(EXPORT_DIR)
    name: str | None = None  #: file stem (default: the checkpoint's)
    opset: int = DEFAULT_OPSET
    verify: bool = True
    images: Sequence[Path] = ()  #: real images added to the parity inputs
    quick_verify: bool = False  #: 239x160 instead of 959x640 for the large parity case
    int8: bool = False
    calibration: Path | None = None  #: int8 calibration folder (default: data/imgs)
    calibration_count: int = DEFAULT_CALIBRATION_COUNT
    fp16: bool = False


@dataclass
class ExportResult:
    """What an export did: the JSON entry per file, the files written (format, path) and what failed."""

    checkpoint: Path
    training: dict[str, Any] = field(default_factory=dict)  #: the checkpoint's training record
    results: dict[str, Any] = field(default_factory=dict)
    written: list[tuple[str, Path]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "formats": self.results}


def parse_formats(fmt: str) -> list[str]:
    """``onnx``, ``torchscript`` (or ``ts``/``jit``), ``openvino`` (or ``ov``/``ir``), several joined by
    commas, or ``all`` (every format whose runtime is installed: OpenVINO is an extra) -> the format words."""
    words = [_ALIASES.get(w, w) for w in (p.strip().lower() for p in fmt.split(",")) if w]
    if words == ["all"]:
        return [f for f in FORMATS if f != "openvino" or openvino_installed()]
    for word in words:
        if word not in FORMATS:
            raise UserError(f"--format {word}: unknown format; use onnx, torchscript, openvino or all")
    if not words:
        raise UserError("--format: name a format: onnx, torchscript, openvino or all")
    return list(dict.fromkeys(words))


def parity_images(items: Sequence[Path] | None) -> list[Path]:
    """``--images``: files as given; folders contribute their first :data:`MAX_DIR_IMAGES` images."""
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


def _check_opset(opset: int) -> None:
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


def _calibration_images(folder: Path | None, count: int) -> list[Path]:
    """All images of the calibration folder, sorted by name (the first ``count`` calibrate)."""
    if count < 1:
        raise UserError(f"--calibration-count {count}: use 1 or more images")
    folder = folder or Path("data/imgs")
    if not folder.is_dir():
        raise UserError(f"--calibration {folder}: no such folder; pass training images with --calibration DIR")
    found = list_images(folder)
    if not found:
        raise UserError(f"--calibration {folder}: no images in this folder (.jpg, .png, .gif, ...)")
    return found


def _check(opts: ExportOptions, checkpoint: Path | None) -> tuple[list[Path], Path, list[Path]]:
    """Check the options before any work: (calibration images, checkpoint, parity images)."""
    for f in opts.formats:
        if f not in FORMATS:
            raise UserError(f"--format {f}: unknown format; use onnx, torchscript, openvino or all")
    if opts.fp16 and "onnx" not in opts.formats:
        raise UserError("--fp16 derives from the ONNX export; use --format onnx or all")
    if opts.int8 and not {"onnx", "openvino"} & set(opts.formats):
        raise UserError("--int8 derives from the ONNX or OpenVINO export; use --format onnx, openvino or all")
    if "openvino" in opts.formats:
        import_openvino()  # one line saying how to install it, before any work
    calib = _calibration_images(opts.calibration, opts.calibration_count) if opts.int8 else []
    if {"onnx", "openvino"} & set(opts.formats):
        _check_opset(opts.opset)
    ckpt_path = _checkpoint_path(checkpoint)
    name = opts.name
    if name is not None and (not name.strip() or Path(name).name != name):
        raise UserError(f"--name {name!r}: give a plain file name without folders (use -o for the folder)")
    return calib, ckpt_path, parity_images(opts.images)


@dataclass
class _Job:
    """One export run's shared state: the eager reference, where files go, the cases and the outcome."""

    opts: ExportOptions
    eager: Any
    config: DeployConfig
    staging: Path
    cases: list[ParityCase] | None
    log: Log
    done: ExportResult

    def target(self, suffix: str) -> Path:
        return self.opts.output / f"{self.opts.name or self.done.checkpoint.stem}{suffix}"


def run_export(checkpoint: Path | None, opts: ExportOptions, log: Log = print) -> ExportResult:
    """Export ``checkpoint`` (default: checkpoints/best.pth) as ``opts`` says; ``log`` gets each line and
    parity table. Invalid options are a :class:`UserError` before anything is written."""
    calib, ckpt_path, images = _check(opts, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    eager = ckpt.build_model("cpu")
    log(f"exporting {ckpt_path} ({ckpt.kind}, {ckpt.config.model.architecture}) to {opts.output}/")
    opts.output.mkdir(parents=True, exist_ok=True)
    done = ExportResult(ckpt_path, ckpt.training)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=opts.output))
    try:
        cases = default_cases(ckpt.config, images, quick=opts.quick_verify) if opts.verify else None
        job = _Job(opts, eager, ckpt.config, staging, cases, log, done)
        for f in sorted(opts.formats, key=list(FORMATS).index):  # the IR is converted from the ONNX file
            _export_format(job, f)
        for kind, wanted in (("int8", opts.int8), ("fp16", opts.fp16)):
            if wanted and "onnx" in opts.formats:
                _export_derived(job, kind, _written(done, ".onnx"), calib, images)
        if opts.int8 and "openvino" in opts.formats:
            _export_derived(job, "int8", _written(done, ".xml"), calib, images, fmt="openvino")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def _written(done: ExportResult, suffix: str) -> Path | None:
    """The fp32 file of this suffix written by this run (derived files come later), or None."""
    return next((t for _f, t in done.written if t.suffix == suffix), None)


def _size(path: Path) -> str:
    n = path.stat().st_size + (bin_path(path).stat().st_size if path.suffix == ".xml" else 0)
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _verify_file(job: _Job, staged: Path, target: Path, backend: str, cases: list[ParityCase],
                 precision: str = "fp32") -> ParityReport:
    """Load the staged file (OpenVINO: at runtime ``precision``, without the compiled-model cache) and compare
    by the thresholds of the file's precision (an int8 IR: int8) or else of the runtime precision."""
    options = OpenVinoOptions(precision=precision, cache=False) if backend == "openvino" else None
    candidate = load_backend(staged, backend, device="cpu", options=options)
    report = parity(job.eager, candidate, cases)
    report.candidate = f"{target} ({candidate.name}, {candidate.provider})"
    job.log(report.table())
    return report


def _place(job: _Job, staged: Path, target: Path, entry: dict[str, Any], seconds: float, verb: str) -> None:
    if target.suffix == ".xml":
        place_ir(staged, target)
    else:
        os.replace(staged, target)
    entry.update(written=True, bytes=target.stat().st_size)
    job.log(f"wrote {target} ({_size(target)}, {verb} in {seconds:.1f} s"
            f"{', parity ok' if job.opts.verify else ', parity not checked'})")


def _stage(job: _Job, f: str, staged: Path) -> None:
    """Write format ``f`` to ``staged``; the IR from this run's ONNX file, else from one staged for it."""
    if f == "onnx":
        export_onnx(job.eager, job.config, staged, opset=job.opts.opset)
    elif f == "torchscript":
        export_torchscript(job.eager, job.config, staged)
    else:
        source = _written(job.done, ".onnx")
        if source is None:
            source = export_onnx(job.eager, job.config, staged.with_suffix(".source.onnx"), opset=job.opts.opset)
        convert_onnx_to_ir(source, job.config, staged)


def _passes(job: _Job, f: str, staged: Path, target: Path, entry: dict[str, Any]) -> bool:
    """Parity of a staged file at fp32; an IR that passes is then checked at each reduced runtime precision
    of this CPU, and the verdicts recorded in it (they never block it). Failures logged."""
    assert job.cases is not None
    report = _verify_file(job, staged, target, FORMATS[f][1], job.cases)
    entry["parity"] = report.to_dict()
    if not report.passed:
        job.done.failed.append(f)
        entry["written"] = False
        job.log(f"[bold red]{f}: parity FAILED; {target} was not written"
                f"{' (the older file there is unchanged)' if target.exists() else ''}[/]")
    elif f == "openvino":
        _record_runtime_verdicts(job, staged, target, job.cases, report, entry)
    return report.passed


def _record_runtime_verdicts(job: _Job, staged: Path, target: Path, cases: list[ParityCase],
                             fp32: ParityReport, entry: dict[str, Any]) -> None:
    """Check a staged IR (whose fp32 run passed) at bf16/fp16 where this CPU has them, log each verdict and
    the precision the file will run at here, and record the verdicts in the IR's metadata."""
    verdicts = {"fp32": verdict_entry(fp32)}
    cases = reduced_precision_cases(cases, job.config, job.opts.quick_verify)
    for precision in REDUCED:
        if not openvino_cpu_has(precision):
            if precision == "bf16":
                job.log(f"openvino bf16: not checked, this CPU has no bf16 kernels; {target.name} runs fp32 here")
            continue
        report = _verify_file(job, staged, target, "openvino", cases, precision=precision)
        entry[f"parity_{precision}"] = report.to_dict()
        verdicts[precision] = verdict_entry(report)
        if report.passed:
            job.log(f"openvino {precision} on this CPU ({bf16_kernels()}): parity ok; {target.name} runs {precision} "
                    "here by default (--precision fp32 forces fp32)")
        else:
            mine = "" if job.opts.images else "; --images YOUR_IMAGES checks it on your own images"
            job.log(f"[yellow]openvino {precision} on this CPU ({bf16_kernels()}): parity failed "
                    f"({report.thresholds.describe()}); {target.name} is written (fp32 passed) and runs fp32 "
                    f"here{mine}[/]")
    entry["runtime_precisions"] = verdicts
    set_ir_metadata(staged, VERDICTS_KEY, verdict_record(verdicts))


def _export_format(job: _Job, f: str) -> None:
    """Write one format to the staging folder, check it (unless not verifying) and move it into place."""
    target = job.target(FORMATS[f][0])
    staged = job.staging / target.name
    t0 = time.perf_counter()
    _stage(job, f, staged)
    seconds = time.perf_counter() - t0
    entry: dict[str, Any] = {"path": str(target), "export_s": round(seconds, 3)}
    job.done.results[f] = entry
    if job.cases is not None and not _passes(job, f, staged, target, entry):
        return
    _place(job, staged, target, entry, seconds, "exported")
    job.done.written.append((f, target))


def _derive(kind: str, source: Path, config: DeployConfig, staged: Path, used: list[Path]) -> None:
    """Write the ``kind`` file derived from ``source`` (.onnx: ORT int8 QDQ or fp16; .xml: NNCF int8)."""
    if kind == "fp16":
        convert_onnx_fp16(source, config, staged)
    elif source.suffix == ".xml":
        quantize_ir_int8(source, config, staged, calibration_batches(used, config))
    else:
        quantize_onnx_int8(source, config, staged, calibration_batches(used, config))


def _export_derived(job: _Job, kind: str, source: Path | None, calib: list[Path], images: list[Path],
                    fmt: str = "onnx") -> None:
    """NAME.int8.onnx / NAME.fp16.onnx from the verified fp32 ONNX file (NAME.int8.xml from the IR, ``fmt``
    "openvino"), checked, moved into place."""
    if source is None:
        job.done.failed.append(kind)
        job.log(f"[bold red]{kind}: skipped, the fp32 {fmt} export ({job.target(FORMATS[fmt][0])}) did not pass "
                f"its parity check (table above); its {kind} file derives from it. `unet-deploy export --format "
                f"{fmt} --no-verify{' --int8' if kind == 'int8' else ' --fp16'}` writes it unchecked[/]")
        return
    target = job.target(f".{kind}{source.suffix}")
    staged = job.staging / target.name
    entry: dict[str, Any] = {"path": str(target)}
    job.done.results[f"{fmt}-{kind}"] = entry
    t0 = time.perf_counter()
    cases = job.cases
    used = calib[:job.opts.calibration_count]
    if kind == "int8":
        job.log(f"{fmt} int8: calibrating on {len(used)} image(s) from {used[0].parent}")
        entry["calibration_images"] = [str(p) for p in used]
        if job.opts.verify:  # calibrated ranges do not cover random noise: real images only
            held_out = calib[job.opts.calibration_count:job.opts.calibration_count + 4]
            cases = image_cases([*(held_out or used[:2]), *images], job.config)
            cases = cases[:2] if job.opts.quick_verify else cases
    _derive(kind, source, job.config, staged, used)
    seconds = time.perf_counter() - t0
    entry["export_s"] = round(seconds, 3)
    if cases is not None:
        report = _verify_file(job, staged, target, FORMATS[fmt][1], cases)
        entry["parity"] = report.to_dict()
        if not report.passed:
            entry["written"] = False
            job.done.failed.append(f"{fmt}-{kind}" if fmt != "onnx" else kind)
            job.log(f"[bold red]{kind}: parity FAILED; {target} was not written[/]")
            return
        if fmt == "openvino":  # its non-quantised layers at bf16 where that keeps the int8 criteria
            _record_runtime_verdicts(job, staged, target, cases, report, entry)
    _place(job, staged, target, entry, seconds, "made")
    job.done.written.append((fmt, target))
