"""End-to-end prediction, stage by stage: what each stage (decode, preprocess, model, post-process, CRF,
write) costs per image, and how close the overlapped ``predict`` pipeline gets to its slowest stage."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_deploy.bench.probe import load_variant
from unet_deploy.bench.variants import parse_variant
from unet_deploy.errors import UserError
from unet_deploy.images.crf import dense_crf
from unet_deploy.images.image_io import load_image, preprocess
from unet_deploy.images.postprocess import logits_to_mask, probabilities
from unet_deploy.predict import PredictOptions, output_values, predict_files, write_mask

__all__ = ["STAGES_SCHEMA", "PIPELINE_TARGET", "measure_stages"]

STAGES_SCHEMA = "unet-deploy.stages/1"
#: Target: the pipeline's images/s within this factor of its slowest stage's.
PIPELINE_TARGET = 1.3


def measure_stages(model_path: str | Path, variant: str, device: str, images: Sequence[str | Path],
                   out_dir: str | Path, crf: bool = False, threads: int | None = None,
                   crf_workers: int | None = None) -> dict[str, Any]:
    """Time each stage of prediction one image at a time (decode, preprocess, model, post-process, CRF,
    write), then the whole overlapped pipeline (``predict.predict_files``: decoding threads ahead of the
    network, CRF in worker processes) on the same images.

    Stage ms are medians over the images (after one untimed warm-up image). The pipeline is compared with
    its slowest stage: ``slowest_ratio`` = slowest stage's images/s / pipeline images/s (1.0 = perfect
    overlap; the target is <= :data:`PIPELINE_TARGET`).
    """
    if threads:
        torch.set_num_threads(threads)
    v = parse_variant(variant, device)
    backend = load_variant(model_path, v, device, threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    paths = [Path(p) for p in images]
    stage_ms = _stage_medians_ms(backend, paths, out_dir, crf, sync)
    options = PredictOptions(crf=crf, progress=False)
    if crf_workers:
        options = replace(options, crf_workers=crf_workers)
    t0 = time.perf_counter()
    summary = predict_files(backend, [str(p) for p in paths], options, outputs=[str(out_dir / "pipeline") + "/"])
    pipeline_s = time.perf_counter() - t0
    if summary.failed:
        raise UserError(f"stage benchmark: predict failed on {summary.failed} image(s): {summary.errors[0]}")
    slowest = max(stage_ms, key=lambda n: stage_ms[n])
    pipeline_ips = len(paths) / pipeline_s
    slowest_ips = 1000.0 / stage_ms[slowest]
    return {
        "schema": STAGES_SCHEMA, "variant": v.name, "provider": backend.provider, "device": device,
        "images": len(paths), "crf": crf, "scale": backend.config.inference.scale, "stage_ms": stage_ms,
        "sequential_ms": float(sum(stage_ms.values())), "slowest_stage": slowest,
        "slowest_stage_images_per_s": slowest_ips, "pipeline_s": pipeline_s, "pipeline_images_per_s": pipeline_ips,
        "slowest_ratio": slowest_ips / pipeline_ips, "target_ratio": PIPELINE_TARGET,
        "loader_threads": options.loader_threads, "crf_workers": options.crf_workers if crf else None,
    }


def _stage_medians_ms(backend: Any, paths: list[Path], out_dir: Path, crf: bool,
                      sync: Callable[[], None]) -> dict[str, float]:
    """Median ms per image of each stage, run one image at a time (the first image warms up, untimed)."""
    cfg = backend.config
    scale, threshold = cfg.inference.scale, cfg.inference.threshold
    values = output_values(backend, PredictOptions())
    names = ["decode", "preprocess", "model", "postprocess"] + (["crf"] if crf else []) + ["write"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, path in enumerate([paths[0], *paths]):
        t = [time.perf_counter()]
        image = load_image(path, cfg.model.n_channels)
        t.append(time.perf_counter())
        batch = preprocess(image, scale)[None]
        t.append(time.perf_counter())
        logits = backend(batch)
        sync()
        t.append(time.perf_counter())
        if crf:
            probs = probabilities(logits[0], image.shape[:2])
            t.append(time.perf_counter())
            mask = dense_crf(image, probs)
        else:
            mask = logits_to_mask(logits, image.shape[:2], threshold)[0]
        t.append(time.perf_counter())
        write_mask(out_dir / f"stage-{i}.png", mask, values)
        t.append(time.perf_counter())
        if i:
            for name, a, b in zip(names, t[:-1], t[1:], strict=True):
                times[name].append(b - a)
    return {n: float(np.median(ts)) * 1000 for n, ts in times.items()}
