"""The export pipeline behind ``unet-deploy export`` and :func:`unet_deploy.api.export`: one stage -> verify ->
place path for every format of the backend registry (:mod:`unet_deploy.runtime.registry`).

checkpoint -> eager model -> each format written by its registry writer to a staging folder inside the output
folder -> loaded back and compared with eager (:func:`unet_deploy.export.parity.parity`) -> moved into place
(with its companion files, an IR's ``.bin`` first) only when it passes. A backend with runtime precisions
(OpenVINO's bf16) is then checked at each one this CPU runs, and the verdicts are recorded in the file
(:mod:`unet_deploy.export.verdicts`): they never block it. ``--int8`` / ``--fp16`` files derive from the
verified fp32 file of every format that has a deriver for them and are checked the same way (int8 on real
held-out calibration images). A file that fails is deleted and an older file under its name is left as it
was; the staging folder is removed whatever happens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx

from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.config import DeployConfig
from unet_deploy.errors import MissingDependencyError, OptionError, ParityError, UserError
from unet_deploy.export.parity import ParityCase, ParityReport, default_cases, image_cases, parity
from unet_deploy.export.verdicts import record_runtime_verdicts
from unet_deploy.export.writers import (
    DEFAULT_CALIBRATION_COUNT,
    DEFAULT_OPSET,
    StageInputs,
    calibration_batches,
    export_onnx,
)
from unet_deploy.images.image_io import list_images
from unet_deploy.names import DEFAULT_CHECKPOINT, EXPORT_DIR, MAX_DIR_IMAGES
from unet_deploy.runtime.backend_options import options_for
from unet_deploy.runtime.loader import load_backend
from unet_deploy.runtime.registry import FORMATS, BackendSpec, format_spec, is_export_file

__all__ = ["FORMATS", "ExportOptions", "ExportResult", "run_export", "parse_formats", "parity_images"]

Log = Callable[[Any], None]


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export and how to check it (the ``unet-deploy export`` flags)."""

    formats: Sequence[str] = tuple(FORMATS)  #: format words of the registry: "onnx", "torchscript", "openvino"
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

    def raise_for_failures(self) -> None:
        """Raise :class:`~unet_deploy.errors.ParityError` naming the files that failed their check, if any."""
        if self.failed:
            raise ParityError(f"{', '.join(self.failed)}: parity check failed, not written (the parity table "
                              "says by how much); `unet-deploy verify` re-checks a file")

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "formats": self.results}


def parse_formats(fmt: str) -> list[str]:
    """Format words joined by commas (``onnx``, ``torchscript`` or ``ts``/``jit``, ``openvino`` or ``ov``/``ir``),
    or ``all`` (every format whose runtime is installed: OpenVINO is an extra) -> the format words (export writes
    them in the registry's order). An unknown word is one line suggesting the closest."""
    words = [w for w in (p.strip().lower() for p in fmt.split(",")) if w]
    if words == ["all"]:
        return [f for f, s in FORMATS.items() if s.installed()]
    if not words:
        raise OptionError(f"--format: name a format: {', '.join(FORMATS)} or all")
    return list(dict.fromkeys(str(format_spec(w).export_format) for w in words))


def parity_images(items: Sequence[Path] | None) -> list[Path]:
    """``--images``: files as given; folders contribute their first :data:`MAX_DIR_IMAGES` images."""
    out: list[Path] = []
    for item in items or []:
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise OptionError(f"--images {item}: no images in this folder (.jpg, .png, .gif, ...)")
            out += found[:MAX_DIR_IMAGES]
        elif item.exists():
            out.append(item)
        else:
            raise OptionError(f"--images {item}: no such file or folder")
    return out


def _check_opset(opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not 17 <= opset <= newest:
        raise OptionError(f"--opset {opset}: use an ONNX opset from 17 to {newest} (default 18, the one "
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
        raise OptionError(f"--calibration-count {count}: use 1 or more images")
    folder = folder or Path("data/imgs")
    if not folder.is_dir():
        raise OptionError(f"--calibration {folder}: no such folder; pass training images with --calibration DIR")
    found = list_images(folder)
    if not found:
        raise OptionError(f"--calibration {folder}: no images in this folder (.jpg, .png, .gif, ...)")
    return found


def _check_derived(opts: ExportOptions) -> None:
    """--int8 / --fp16 need a chosen format that derives them."""
    for precision, wanted in (("int8", opts.int8), ("fp16", opts.fp16)):
        makers = [f for f, s in FORMATS.items() if precision in s.derived_precisions]
        if wanted and not set(makers) & set(opts.formats):
            titles = " or ".join(FORMATS[f].format_title for f in makers)
            raise OptionError(f"--{precision} derives from the {titles} export; use --format "
                            f"{', '.join(makers)} or all")


def _check(opts: ExportOptions, checkpoint: Path | None) -> tuple[list[Path], Path, list[Path]]:
    """Check the options before any work: (calibration images, checkpoint, parity images)."""
    for f in opts.formats:
        chosen = format_spec(f)
        if not chosen.installed():  # one line saying how to install it, before any work
            raise MissingDependencyError(f"--format {f} needs {chosen.optional_module}: {chosen.install_hint}")
    _check_derived(opts)
    calib = _calibration_images(opts.calibration, opts.calibration_count) if opts.int8 else []
    _check_opset(opts.opset)
    ckpt_path = _checkpoint_path(checkpoint)
    name = opts.name
    if name is not None and (not name.strip() or Path(name).name != name):
        raise OptionError(f"--name {name!r}: give a plain file name without folders (use -o for the folder)")
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
    """Export ``checkpoint`` as ``opts`` says.

    Args:
        checkpoint: this project's or Pytorch-UNet's ``.pth`` (default: ``checkpoints/best.pth``).
        opts: the formats, where to write and how to check them.
        log: gets each line and parity table.

    Returns:
        What was written and what failed (:class:`ExportResult`).

    Raises:
        UserError: invalid options, before anything is written.
    """
    calib, ckpt_path, images = _check(opts, checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    eager = ckpt.build_model("cpu")
    log(f"exporting {ckpt_path} ({ckpt.kind}, {ckpt.config.model.architecture}) to {opts.output}/")
    opts.output.mkdir(parents=True, exist_ok=True)
    done = ExportResult(ckpt_path, ckpt.training)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=opts.output))
    try:
        cases = default_cases(ckpt.config, images, quick=opts.quick_verify) if opts.verify else None
        # every file placed passed parity when verifying (predict and serve prefer such exports without -m)
        config = replace(ckpt.config, source={**ckpt.config.source, "verified": opts.verify})
        job = _Job(opts, eager, config, staging, cases, log, done)
        chosen = [f for f in FORMATS if f in opts.formats]
        for f in chosen:
            _export_format(job, FORMATS[f])
        for precision, wanted in (("int8", opts.int8), ("fp16", opts.fp16)):
            for f in chosen:
                if wanted and precision in FORMATS[f].derived_precisions:
                    _export_derived(job, FORMATS[f], precision, calib, images)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def _written(done: ExportResult, fmt: str) -> Path | None:
    """The fp32 file of format ``fmt`` written by this run (derived files come later), or None."""
    return next((t for f, t in done.written if f == fmt and not _derived_name(t)), None)


def _derived_name(path: Path) -> bool:
    return any(path.name.endswith(f".{p}{path.suffix}") for p in ("int8", "fp16"))


def _size(path: Path, spec: BackendSpec) -> str:
    n = sum(p.stat().st_size for p in (path, *(path.with_suffix(c) for c in spec.companions)))
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def verify_file(job: _Job, spec: BackendSpec, staged: Path, target: Path, cases: list[ParityCase],
                precision: str | None = None) -> ParityReport:
    """Load the staged file with the registry's ``verify_options`` (at runtime ``precision`` when given) and
    compare by the thresholds of the file's precision (an int8 file: int8) or else of the runtime precision."""
    values = dict(spec.verify_options, **({"precision": precision} if precision else {}))
    candidate = load_backend(staged, spec.name, device="cpu", options=options_for(spec.name, **values))
    report = parity(job.eager, candidate, cases)
    report.candidate = f"{target} ({candidate.name}, {candidate.provider})"
    job.log(report.table())
    return report


def _place(job: _Job, spec: BackendSpec, staged: Path, target: Path, entry: dict[str, Any], seconds: float,
           verb: str) -> None:
    """Move a staged file into place: its companions first (each an atomic rename), then the file that reads
    them, so the file under the target name never names companions that are not there yet."""
    for suffix in spec.companions:
        os.replace(staged.with_suffix(suffix), target.with_suffix(suffix))
    os.replace(staged, target)
    entry.update(written=True, bytes=target.stat().st_size)
    job.log(f"wrote {target} ({_size(target, spec)}, {verb} in {seconds:.1f} s"
            f"{', parity ok' if job.opts.verify else ', parity not checked'})")


def _onnx_source(job: _Job, staged: Path) -> Callable[[], Path]:
    """This run's ONNX export, or one staged beside ``staged`` for a format converted from ONNX."""

    def source() -> Path:
        written = _written(job.done, "onnx")
        if written is not None:
            return written
        return export_onnx(job.eager, job.config, staged.with_suffix(".source.onnx"), opset=job.opts.opset)

    return source


def _passes(job: _Job, spec: BackendSpec, staged: Path, target: Path, entry: dict[str, Any]) -> bool:
    """Parity of a staged file at fp32; a file that passes is then checked at each reduced runtime precision
    of this CPU, and the verdicts recorded in it (they never block it). Failures logged."""
    assert job.cases is not None
    report = verify_file(job, spec, staged, target, job.cases)
    entry["parity"] = report.to_dict()
    fmt = spec.export_format
    if not report.passed:
        job.done.failed.append(str(fmt))
        entry["written"] = False
        job.log(f"[bold red]{fmt}: parity FAILED; {target} was not written"
                f"{' (the older file there is unchanged)' if target.exists() else ''}[/]")
    elif spec.runtime_precisions:
        record_runtime_verdicts(job, spec, staged, target, job.cases, report, entry)
    return report.passed


def _export_format(job: _Job, spec: BackendSpec) -> None:
    """Write one format to the staging folder, check it (unless not verifying) and move it into place."""
    target = job.target(spec.export_suffix)
    staged = job.staging / target.name
    t0 = time.perf_counter()
    spec.stage()(StageInputs(job.eager, job.config, staged, job.opts.opset, _onnx_source(job, staged)))
    seconds = time.perf_counter() - t0
    entry: dict[str, Any] = {"path": str(target), "export_s": round(seconds, 3)}
    job.done.results[str(spec.export_format)] = entry
    if job.cases is not None and not _passes(job, spec, staged, target, entry):
        return
    _place(job, spec, staged, target, entry, seconds, "exported")
    job.done.written.append((str(spec.export_format), target))


def _derived_cases(job: _Job, calib: list[Path], used: list[Path], images: list[Path]) -> list[ParityCase]:
    """int8's cases: real images only (calibrated ranges do not cover random noise): held-out calibration
    images, else two of those it calibrated on, plus --images."""
    held_out = calib[job.opts.calibration_count:job.opts.calibration_count + 4]
    cases = image_cases([*(held_out or used[:2]), *images], job.config)
    return cases[:2] if job.opts.quick_verify else cases


def _skip_derived(job: _Job, spec: BackendSpec, precision: str) -> None:
    fmt = spec.export_format
    job.done.failed.append(f"{fmt}-{precision}")
    job.log(f"[bold red]{precision}: skipped, the fp32 {fmt} export ({job.target(spec.export_suffix)}) did not "
            f"pass its parity check (table above); its {precision} file derives from it. `unet-deploy export "
            f"--format {fmt} --no-verify --{precision}` writes it unchecked[/]")


def _export_derived(job: _Job, spec: BackendSpec, precision: str, calib: list[Path], images: list[Path]) -> None:
    """NAME.int8.onnx / NAME.fp16.onnx / NAME.int8.xml from the verified fp32 file of ``spec``'s format,
    written by its registry deriver, checked, moved into place."""
    fmt, source = str(spec.export_format), _written(job.done, str(spec.export_format))
    if source is None:
        _skip_derived(job, spec, precision)
        return
    target = job.target(f".{precision}{spec.export_suffix}")
    staged = job.staging / target.name
    entry: dict[str, Any] = {"path": str(target)}
    job.done.results[f"{fmt}-{precision}"] = entry
    t0 = time.perf_counter()
    cases, used = job.cases, calib[:job.opts.calibration_count]
    if precision == "int8":
        job.log(f"{fmt} int8: calibrating on {len(used)} image(s) from {used[0].parent}")
        entry["calibration_images"] = [str(p) for p in used]
        cases = _derived_cases(job, calib, used, images) if job.opts.verify else None
    spec.deriver(precision)(source, job.config, staged, calibration_batches(used, job.config))
    seconds = time.perf_counter() - t0
    entry["export_s"] = round(seconds, 3)
    if cases is not None:
        report = verify_file(job, spec, staged, target, cases)
        entry["parity"] = report.to_dict()
        if not report.passed:
            entry["written"] = False
            job.done.failed.append(f"{fmt}-{precision}")
            job.log(f"[bold red]{precision}: parity FAILED; {target} was not written[/]")
            return
        if spec.runtime_precisions:  # its non-quantised layers at bf16 where that keeps the int8 criteria
            record_runtime_verdicts(job, spec, staged, target, cases, report, entry)
    _place(job, spec, staged, target, entry, seconds, "made")
    job.done.written.append((fmt, target))
