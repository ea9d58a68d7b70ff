"""One whole benchmark run (:func:`run_benchmark`): the model files, every backend x scale case in a fresh
process, then (optionally) the roofline and the stage timing, as one JSON-ready report."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from unet_deploy.bench.analysis import before_after, speedups, targets
from unet_deploy.bench.artifacts import ModelFiles, cache_key, prepare_models, work_folder
from unet_deploy.bench.cases import run_cases
from unet_deploy.bench.inputs import synthetic_image, write_jpeg
from unet_deploy.bench.machine import load_average_1m, machine_facts, reliability, unsteady
from unet_deploy.bench.roofline import measure_peaks, roofline_report
from unet_deploy.bench.settings import CARVANA_SIZE, SCHEMA, BenchSettings, reproduce_command, resolve_settings
from unet_deploy.bench.stages import measure_stages
from unet_deploy.bench.variants import parse_variant
from unet_deploy.errors import first_line
from unet_deploy.runtime.cpu_share import cpu_sample, free_cpus_since, usable_cpus

__all__ = ["run_benchmark", "run_roofline", "run_stages"]


def run_benchmark(settings: BenchSettings, cache_dir: str | Path | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every backend x scale case (each in a fresh process) and return the JSON-ready report."""
    settings = resolve_settings(settings)
    say = log or (lambda _msg: None)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start, cpu_start = load_average_1m(), cpu_sample()
    key = f"{'ckpt' if settings.checkpoint else 'fresh'}-{cache_key(settings)}"
    with work_folder(cache_dir, key) as (model_dir, scratch):
        files = prepare_models(settings, model_dir, say)
        cases = run_cases(settings, files, scratch, None if cache_dir else model_dir, say)
        roof = None  # the probe runs before the in-process stage timing: no threads of that around
        if settings.roofline:
            roof = run_roofline(settings, cases, files, say)
        stages = run_stages(settings, cases, files, scratch, say) if settings.stages else None
        checked = _check_recommendation(settings, cases, files, scratch, say)
    free = free_cpus_since(cpu_start, window_s=0.0)
    s = settings
    report: dict[str, Any] = {
        "schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "settings": {
            "checkpoint": str(s.checkpoint) if s.checkpoint else None, "quick": s.quick,
            "backends": list(s.backends), "scales": list(s.scales), "device": s.device, "runs": s.runs,
            "warmup": s.warmup, "threads": s.threads, "base_channels": s.base_channels if not s.checkpoint else None,
            "bilinear": s.bilinear if not s.checkpoint else None, "seed": s.seed,
            "image_size": list(s.image_size or CARVANA_SIZE),
        },
        "model": {"architecture": files.architecture, "source": files.source},
        "machine": machine_facts(s.device),
        "cases": cases,
    }
    report["load_avg"] = {"start": load_start, "end": report["machine"].get("load_avg_1m")}
    report["cpu_free"] = {"usable": usable_cpus(), "free": None if free is None else round(free, 2)}
    for case in cases:
        case["unsteady"] = unsteady(case)
    report["reliability"] = reliability(report)
    if roof is not None:
        report["roofline"] = roof  # before the targets: they quote its ceilings
    report["speedups"] = speedups(report)
    report["targets"] = targets(report)
    report["before_after"] = before_after(report)
    if stages is not None:
        report["stages"] = stages
    if checked is not None:
        report["recommendation"] = checked
    report["command"] = reproduce_command(settings)
    return report


def _check_recommendation(settings: BenchSettings, cases: list[dict[str, Any]], files: ModelFiles, scratch: Path,
                          say: Callable[[str], None]) -> dict[str, Any] | None:
    """Run the recommended commands once (``settings.check_recommendation``), on the benchmark's model and a
    JPEG of its input image."""
    if not settings.check_recommendation:
        return None
    from unet_deploy.bench.recommend_check import check_recommendation

    width, height = settings.image_size or CARVANA_SIZE
    (scratch / "recommend").mkdir(parents=True, exist_ok=True)
    image = write_jpeg(synthetic_image(width, height, settings.seed), scratch / "recommend" / "car.jpg")
    partial = {"settings": {"checkpoint": str(settings.checkpoint) if settings.checkpoint else None,
                            "quick": settings.quick, "scales": list(settings.scales), "seed": settings.seed},
               "cases": cases}
    return check_recommendation(partial, files.paths["torch"], image, scratch / "recommend", (width, height), say)


def run_roofline(settings: BenchSettings, cases: list[dict[str, Any]], files: ModelFiles,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """The roofline section: work per image, achieved G(FL)OP/s and (CPU) this machine's peaks per precision:
    theoretical (per-cycle table x timed clock x cores) and the best rate of any installed runtime on one layer."""
    peaks = None
    if settings.device == "cpu":
        say("roofline: timing the clock and one compute-bound layer on every installed runtime and precision")
        try:
            peaks = measure_peaks(settings.threads)
        except Exception as e:  # noqa: BLE001 - keep the timings already measured; report without peaks
            say(f"roofline: the peak probe failed ({first_line(e)[:200]}); reporting GFLOP/s without floors")
    return roofline_report({"cases": cases}, files.model_config, peaks)


def run_stages(settings: BenchSettings, cases: list[dict[str, Any]], files: ModelFiles, scratch: Path,
               say: Callable[[str], None]) -> dict[str, Any]:
    """Stage timing with the fastest variant whose parity passed at the model's (first) scale."""
    scale = settings.scales[0]
    ok = [c for c in cases if c["scale"] == scale and c["parity"].get("passed", True)]
    best = min(ok, key=lambda c: c["latency"]["p50_ms"]) if ok else None
    variant = best["backend"] if best else settings.backends[0]
    width, height = settings.image_size or CARVANA_SIZE
    images = [write_jpeg(synthetic_image(width, height, settings.seed + 2000 + i), scratch / f"car{i:03d}.jpg")
              for i in range(settings.stages)]
    say(f"stages: {variant} on {len(images)} {width}x{height} JPEGs{' with CRF' if settings.stages_crf else ''}")
    return measure_stages(files.paths[parse_variant(variant).file_key], variant, settings.device, images,
                          scratch / "stages", crf=settings.stages_crf, threads=settings.threads)
