"""The verdict of each reduced runtime precision of a verified file (OpenVINO's bf16): checked on this CPU by
that precision's thresholds, shown, and recorded in the file (:mod:`unet_deploy.runtime.precision`), so that
``predict`` runs the fastest precision verified for the model here. A reduced precision never blocks a file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from unet_deploy.export.parity import ParityCase, ParityReport, reduced_precision_cases
from unet_deploy.runtime.cpu_features import bf16_kernels
from unet_deploy.runtime.precision import VERDICTS_KEY, verdict_entry, verdict_record
from unet_deploy.runtime.registry import BackendSpec

if TYPE_CHECKING:
    from unet_deploy.export.exporter import _Job

__all__ = ["record_runtime_verdicts"]


def record_runtime_verdicts(job: _Job, spec: BackendSpec, staged: Path, target: Path, cases: list[ParityCase],
                            fp32: ParityReport, entry: dict[str, Any]) -> None:
    """Check a staged file (whose fp32 run passed) at each reduced precision of ``spec`` this CPU runs, log each
    verdict and the precision the file will run at here, and record the verdicts in the file."""
    from unet_deploy.export.exporter import verify_file  # cycle: the exporter calls this module

    verdicts = {"fp32": verdict_entry(fp32)}
    cases = reduced_precision_cases(cases, job.config, job.opts.quick_verify)
    name = spec.name
    for precision in spec.runtime_precisions:
        if not spec.has_precision(precision):
            if precision == spec.runtime_precisions[0]:
                job.log(f"{name} {precision}: not checked, this CPU has no {precision} kernels; {target.name} "
                        "runs fp32 here")
            continue
        report = verify_file(job, spec, staged, target, cases, precision=precision)
        entry[f"parity_{precision}"] = report.to_dict()
        verdicts[precision] = verdict_entry(report)
        if report.passed:
            job.log(f"{name} {precision} on this CPU ({bf16_kernels()}): parity ok; {target.name} runs {precision} "
                    "here by default (--precision fp32 forces fp32)")
        else:
            mine = "" if job.opts.images else "; --images YOUR_IMAGES checks it on your own images"
            job.log(f"[yellow]{name} {precision} on this CPU ({bf16_kernels()}): parity failed "
                    f"({report.thresholds.describe()}); {target.name} is written (fp32 passed) and runs fp32 "
                    f"here{mine}[/]")
    entry["runtime_precisions"] = verdicts
    spec.record_verdicts(staged, VERDICTS_KEY, verdict_record(verdicts))
