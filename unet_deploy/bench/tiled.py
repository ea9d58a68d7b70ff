"""``unet-deploy benchmark --tile N``: tiled against whole-image prediction, per backend, each case in a
fresh process (``python -m unet_deploy.bench.tiled SPEC.json RESULT.json``).

For the source image size W x H (1918x1280 by default) at the scale (1.0 unless ``--scales`` says
otherwise), four end-to-end cases (decode -> the stages of ``predict`` -> mask) per backend:

* ``whole-half``   -- the whole W/2 x H/2 image (959x640): the peak-memory reference;
* ``whole``        -- the whole W x H image: latency and the reference mask;
* ``tiled``        -- W x H in tiles of at most N: latency, peak memory, and the mask compared pixel by pixel
  with ``whole``'s (agreement);
* ``tiled-double`` -- 2W x 2H (3836x2560) in tiles of at most N: its peak memory against ``whole-half``'s.

The two memory-only cases run one call (no warm-up: the first call is where the runtime's arena grows);
``whole`` and ``tiled`` run ``--warmup`` untimed and ``--runs`` timed calls. Peak memory is the peak-RSS
growth over the fresh process's baseline after imports (:mod:`.memory`), as in the main table.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unet_deploy.bench.isolated import run_in_fresh_process
from unet_deploy.bench.settings import CARVANA_SIZE, SCHEMA, BenchSettings
from unet_deploy.errors import UserError
from unet_deploy.runtime.registry import REGISTRY

__all__ = ["TILED_CASES", "TiledSpec", "run_tiled_case", "run_tiled_benchmark", "tiled_summary",
           "render_tiled", "main"]

#: The cases of one backend: (label, size factor of the source image, tiled, memory only).
TILED_CASES: tuple[tuple[str, float, bool, bool], ...] = (
    ("whole-half", 0.5, False, True), ("whole", 1.0, False, False), ("tiled", 1.0, True, False),
    ("tiled-double", 2.0, True, True))
#: The project's targets (issue 15): agreement at W x H, memory of 2W x 2H tiled over W/2 x H/2 whole, and
#: the latency of tiled over whole at W x H (for --tile 1024).
TARGETS = {"agreement_min": 0.999, "memory_ratio_max": 1.3, "latency_ratio_max": 1.3}


@dataclass(frozen=True, kw_only=True)
class TiledSpec:
    """One tiled-benchmark case, run by :func:`run_tiled_case` in a fresh process."""

    variant: str
    model_path: str
    device: str
    image: str
    scale: float
    tile: int | None
    overlap: int | None
    runs: int
    warmup: int
    threads: int | None = None
    mask_out: str | None = None


def run_tiled_case(spec: TiledSpec) -> dict[str, Any]:
    """Measure one case in THIS process (fresh): load, ``warmup`` + ``runs`` end-to-end predictions, peak
    memory growth over the baseline after imports; the first mask is saved to ``spec.mask_out``."""
    import psutil

    from unet_deploy.bench.peak_memory import PeakSampler, maxrss_bytes, memory_result, reset_peak_rss
    from unet_deploy.bench.probe import latency_stats, load_variant
    from unet_deploy.bench.variants import parse_variant
    from unet_deploy.images.image_io import load_image, scaled_size
    from unet_deploy.predict import PredictOptions, predict_arrays
    from unet_deploy.runtime.tiling import Tiling, plan_tiles

    importlib.import_module(REGISTRY[spec.variant.split("-")[0]].runtime_module)  # part of the baseline
    options = PredictOptions(scale=spec.scale, tile=spec.tile, tile_overlap=spec.overlap, auto_tile=False,
                             progress=False)
    base = {"rss": psutil.Process().memory_info().rss, "maxrss": maxrss_bytes(), "exact": reset_peak_rss()}
    times: list[float] = []
    with PeakSampler(None) as sampler:
        base["device"] = 0
        backend = load_variant(spec.model_path, parse_variant(spec.variant), spec.device, spec.threads)
        for i in range(spec.warmup + spec.runs):
            t0 = time.perf_counter()
            image = load_image(spec.image, backend.config.model.n_channels)
            result = next(predict_arrays(backend, [image], options))
            elapsed = time.perf_counter() - t0
            if result.error is not None:
                raise UserError(f"tiled benchmark {spec.variant}: {result.error}")
            if i >= spec.warmup:
                times.append(elapsed)
            if i == 0 and spec.mask_out:
                np.save(spec.mask_out, result.require_mask())
            height, width = image.shape[:2]
            del image, result
    out: dict[str, Any] = {"backend": spec.variant, "image": [width, height], "scale": spec.scale,
                           "tile": spec.tile, "latency": latency_stats(times),
                           **memory_result("cpu", sampler, base)}
    out["host_peak_rss_mib"] = out["host_peak_mib"] + out["host_baseline_mib"]
    tiling = Tiling.of(spec.tile, spec.overlap)
    if tiling is not None:
        w, h = scaled_size(width, height, spec.scale)
        plan = plan_tiles(h, w, tiling.tile, tiling.overlap)
        out["plan"] = {"tiles": plan.count, "tile": list(plan.shape[::-1]), "overlap": tiling.overlap,
                       "text": plan.describe()}
    return out


def _run_isolated(spec: TiledSpec, timeout_s: float) -> dict[str, Any]:
    """:func:`run_tiled_case` in a fresh ``python -m unet_deploy.bench.tiled`` process."""
    return run_in_fresh_process("unet_deploy.bench.tiled", asdict(spec), f"tiled benchmark case {spec.variant}",
                                timeout_s, "use fewer --runs or a smaller image (--quick)")


def _images(size: tuple[int, int], seed: int, folder: Path) -> dict[float, Path]:
    """One synthetic car JPEG per size factor of :data:`TILED_CASES`."""
    from unet_deploy.bench.inputs import synthetic_image, write_jpeg

    out = {}
    for factor in sorted({f for _, f, _, _ in TILED_CASES}):
        w, h = int(size[0] * factor), int(size[1] * factor)
        out[factor] = write_jpeg(synthetic_image(w, h, seed + 3000), folder / f"car-{w}x{h}.jpg")
    return out


def _backend_cases(settings: BenchSettings, variant: str, model_path: Path, images: dict[float, Path],
                   scratch: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The four cases of one backend, then agreement and the ratios."""
    results: dict[str, Any] = {}
    for label, factor, tiled, memory_only in TILED_CASES:
        say(f"tiled: {variant} {label} ({images[factor].stem.split('-')[1]})")
        spec = TiledSpec(variant=variant, model_path=str(model_path), device=settings.device,
                         image=str(images[factor]), scale=settings.scales[0],
                         tile=settings.tile if tiled else None, overlap=settings.tile_overlap if tiled else None,
                         runs=1 if memory_only else int(settings.runs or 1),
                         warmup=0 if memory_only else int(settings.warmup or 0), threads=settings.threads,
                         mask_out=str(scratch / f"{variant}-{label}.npy"))
        results[label] = _run_isolated(spec, settings.timeout_s)
    whole, tiled_mask = (np.load(scratch / f"{variant}-{label}.npy") for label in ("whole", "tiled"))
    classes = len(np.unique(whole))
    return tiled_summary(results, float((whole == tiled_mask).mean()), float((whole > 0).mean()), classes)


def tiled_summary(cases: dict[str, Any], agreement: float, foreground: float = 0.5, classes: int = 2
                  ) -> dict[str, Any]:
    """One backend's section: its cases, mask agreement, memory and latency ratios and whether each meets
    its target. ``foreground``: the whole-image mask's share of non-background pixels; ``classes``: how
    many classes it shows (one: every pixel is the same class, so agreement says little -- a freshly
    initialised model often says "car" everywhere; benchmark a trained checkpoint with -m)."""
    memory_ratio = cases["tiled-double"]["peak_mib"] / max(cases["whole-half"]["peak_mib"], 1e-9)
    rss_ratio = cases["tiled-double"]["host_peak_rss_mib"] / max(cases["whole-half"]["host_peak_rss_mib"], 1e-9)
    latency_ratio = cases["tiled"]["latency"]["p50_ms"] / max(cases["whole"]["latency"]["p50_ms"], 1e-9)
    return {"cases": cases, "agreement": agreement, "whole_foreground": foreground,
            "agreement_informative": classes > 1, "memory_ratio": memory_ratio, "rss_ratio": rss_ratio,
            "latency_ratio": latency_ratio,
            "met": {"agreement": agreement >= TARGETS["agreement_min"],
                    "memory": memory_ratio <= TARGETS["memory_ratio_max"],
                    "latency": latency_ratio <= TARGETS["latency_ratio_max"]}}


def run_tiled_benchmark(settings: BenchSettings, cache_dir: str | Path | None = None,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every backend's tiled cases (``settings.tile`` set; settings already resolved) as a JSON-ready
    report whose ``"tiled"`` key holds the results (``"cases"`` is empty: no backend x scale table)."""
    from unet_deploy.bench.artifacts import cache_key, prepare_models, work_folder
    from unet_deploy.bench.machine import load_average_1m, machine_facts
    from unet_deploy.bench.variants import parse_variant

    say = log or (lambda _msg: None)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_start = load_average_1m()
    size = settings.image_size or CARVANA_SIZE
    key = f"{'ckpt' if settings.checkpoint else 'fresh'}-{cache_key(settings)}"
    with work_folder(cache_dir, key) as (model_dir, scratch):
        files = prepare_models(settings, model_dir, say)
        images = _images((int(size[0]), int(size[1])), settings.seed, scratch)
        backends = {v: _backend_cases(settings, v, files.paths[parse_variant(v).file_key], images, scratch, say)
                    for v in settings.backends}
    machine = machine_facts(settings.device)
    return {
        "schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "settings": {"checkpoint": str(settings.checkpoint) if settings.checkpoint else None,
                     "backends": list(settings.backends), "scale": settings.scales[0], "device": settings.device,
                     "runs": settings.runs, "warmup": settings.warmup, "threads": settings.threads,
                     "base_channels": settings.base_channels if not settings.checkpoint else None,
                     "seed": settings.seed, "image_size": [int(size[0]), int(size[1])]},
        "model": {"architecture": files.architecture, "source": files.source},
        "machine": machine, "load_avg": {"start": load_start, "end": machine.get("load_avg_1m")},
        "cases": [],
        "tiled": {"tile": settings.tile, "tile_overlap": _overlap(settings), "scale": settings.scales[0],
                  "targets": TARGETS, "backends": backends},
    }


def _overlap(settings: BenchSettings) -> int | None:
    from unet_deploy.runtime.tiling import Tiling

    tiling = Tiling.of(settings.tile, settings.tile_overlap)
    return tiling.overlap if tiling else None


def render_tiled(report: dict[str, Any]) -> list[str]:
    """The tiled section as a few lines of text (terminal and issues)."""
    section = report.get("tiled")
    if not section:
        return []
    lines = [f"tiled (--tile {section['tile']} --tile-overlap {section['tile_overlap']}, scale {section['scale']:g};"
             " peak = RSS growth over the process baseline):"]
    for name, b in section["backends"].items():
        c = b["cases"]
        size = {label: "x".join(str(v) for v in case["image"]) for label, case in c.items()}
        lines.append(
            f"  {name}: {size['tiled']} whole {c['whole']['latency']['p50_ms']:.0f} ms vs tiled "
            f"{c['tiled']['latency']['p50_ms']:.0f} ms ({b['latency_ratio']:.2f}x; {c['tiled']['plan']['text']}); "
            f"masks agree {100 * b['agreement']:.3f} %"
            + ("" if b.get("agreement_informative", True) else
               " (the whole-image mask is one class everywhere: not informative; use -m with a trained model)"))
        lines.append(
            f"  {name}: peak {size['tiled-double']} tiled {c['tiled-double']['peak_mib']:.0f} MiB vs "
            f"{size['whole-half']} whole {c['whole-half']['peak_mib']:.0f} MiB ({b['memory_ratio']:.2f}x; "
            f"absolute RSS {b['rss_ratio']:.2f}x); targets: agreement >= 99.9 % "
            f"{'met' if b['met']['agreement'] else 'NOT met'}, memory <= 1.3x "
            f"{'met' if b['met']['memory'] else 'NOT met'}, latency <= 1.3x "
            f"{'met' if b['met']['latency'] else 'NOT met'}")
    return lines


def main(argv: Sequence[str]) -> int:
    """``python -m unet_deploy.bench.tiled SPEC.json RESULT.json``: one case in this fresh process."""
    spec = TiledSpec(**json.loads(Path(argv[0]).read_text()))
    Path(argv[1]).write_text(json.dumps(run_tiled_case(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
