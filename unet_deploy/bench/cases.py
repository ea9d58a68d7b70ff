"""Every backend x scale case of a run, each in a fresh process, with parity against eager PyTorch on the same
input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_deploy.bench.artifacts import ModelFiles
from unet_deploy.bench.inputs import synthetic_image
from unet_deploy.bench.probe import CaseSpec, run_case_isolated
from unet_deploy.bench.settings import CARVANA_SIZE, BenchSettings
from unet_deploy.bench.variants import parse_variant
from unet_deploy.export.parity import ParityThresholds, compare
from unet_deploy.images.image_io import preprocess
from unet_deploy.runtime.registry import REFERENCE_BACKEND

__all__ = ["parity", "run_cases"]


def parity(reference: np.ndarray, other: np.ndarray, threshold: float = 0.5,
           precision: str = "fp32") -> dict[str, Any]:
    """How far ``other`` logits are from the eager ``reference`` on the same input, by the same measures
    and thresholds ``export`` verifies with (:func:`unet_deploy.export.parity.compare`).

    ``max_rel_err`` = max |a - b| / max |a|; ``pixel_agreement`` = share of mask pixels that agree after
    post-processing; ``passed`` = within the documented thresholds for ``precision``.
    """
    a = np.asarray(reference, dtype=np.float32)
    b = np.asarray(other, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {b.shape}")
    result = compare(torch.from_numpy(a), torch.from_numpy(b), ParityThresholds.for_precision(precision),
                     threshold)
    return {"max_abs_err": result["max_abs_err"], "max_rel_err": result["rel_err"],
            "pixel_agreement": result["pixel_agreement"], "dice": result["dice"], "passed": result["passed"]}


def _file_bytes(path: Path) -> int:
    """Size of a model file; an OpenVINO IR's .xml counts with its .bin."""
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (weights.stat().st_size if weights is not None and weights.exists() else 0)


def run_cases(settings: BenchSettings, files: ModelFiles, scratch: Path, temporary_models: Path | None,
              say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every backend x scale case in its own process, with parity against eager on the same input. Files in
    ``temporary_models`` (gone after the run) are recorded by name, others by path."""
    width, height = settings.image_size or CARVANA_SIZE
    image = synthetic_image(width, height, settings.seed)
    cases: list[dict[str, Any]] = []
    for scale in settings.scales:
        batch = preprocess(image, scale)[None]
        input_path = scratch / f"input-{scale:g}.npy"
        np.save(input_path, batch)
        h, w = batch.shape[-2:]
        logits: dict[str, Path] = {}
        order = list(settings.backends)
        if REFERENCE_BACKEND not in order:  # parity needs eager logits: one untimed eager call
            order.insert(0, "reference")
        for name in order:
            variant = parse_variant(REFERENCE_BACKEND if name == "reference" else name)
            backend = variant.file_key
            logits[name] = scratch / f"logits-{name}-{scale:g}.npy"
            reference = name == "reference"
            spec = CaseSpec(backend=variant.backend, model_path=str(files.paths[backend]), device=settings.device,
                            input=str(input_path), scale=scale, mode="model",
                            runs=0 if reference else int(settings.runs or 1),
                            warmup=1 if reference else int(settings.warmup or 0), threads=settings.threads,
                            logits_out=str(logits[name]), variant=variant.name)
            say(f"{name} scale {scale:g} ({w}x{h}): running in a fresh process")
            result = run_case_isolated(spec, settings.timeout_s)
            if name == "reference":
                continue
            ref = np.load(logits[REFERENCE_BACKEND] if REFERENCE_BACKEND in logits else logits["reference"])
            par = parity(ref, np.load(logits[name]), precision=result.get("precision", "fp32"))
            path = files.paths[backend]
            cases.append({
                **result, "scale": scale, "input": f"{w}x{h}", "input_width": int(w), "input_height": int(h),
                "parity": {**par, "reference": name == REFERENCE_BACKEND},
                "file": path.name if path.parent == temporary_models else str(path),
                "file_mb": _file_bytes(path) / 1e6, "export_s": files.export_s.get(backend),
            })
    return cases
