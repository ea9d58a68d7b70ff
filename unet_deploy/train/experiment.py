"""What each training-quality option buys: train one small model per variant, score it on held-out data.

Every variant trains the same architecture from the same seed for the same number of optimizer steps
(same initial weights, same batch order) and differs only in the option under test. Each trained
model is scored on a held-out set it never saw: Carvana's metric (mean per-image dice, through
:func:`unet_deploy.train.evaluate_model`, i.e. exactly what ``unet-deploy evaluate`` reports) and the
accuracy inside a thin band around the true mask edges (:func:`unet_deploy.train.losses.boundary_accuracy`),
which is where edge weighting and CRF act and where dice is least sensitive.

Variants:

* ``baseline``  -- Pytorch-UNet's recipe (no augmentation, unweighted loss, plateau schedule);
* ``augment``   -- + the ``default`` augmentation preset;
* ``edge``      -- + edge-weighted loss;
* ``cosine``    -- + warm-up and cosine LR schedule;
* ``all``       -- all three together;
* ``longer``    -- the baseline with twice the steps ("more training");
* ``finetune``  -- the baseline recipe started from a pretrained Pytorch-UNet ``MODEL.pth`` (a file
  given with ``--pretrained``, or one trained here on a separate source set and saved in
  Pytorch-UNet's bare state-dict format, so the ``-f MODEL.pth`` path is what is exercised).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unet_deploy.checkpoint import load_checkpoint
from unet_deploy.errors import UserError
from unet_deploy.fileio import atomic_path, atomic_write_text
from unet_deploy.images.augment import preset
from unet_deploy.images.dice import image_dice
from unet_deploy.images.image_io import find_pairs
from unet_deploy.images.synth import generate_dataset
from unet_deploy.runtime.loader import load_backend
from unet_deploy.train import TrainConfig, predicted_masks, train
from unet_deploy.train.losses import boundary_accuracy
from unet_deploy.train.quality import QualityOptions

__all__ = ["ExperimentConfig", "VARIANTS", "run_experiment", "markdown_table", "evaluate_boundary",
           "QUICK"]

VARIANTS: dict[str, str] = {
    "baseline": "Pytorch-UNet's recipe: no augmentation, unweighted loss, plateau LR",
    "augment": "+ --augment default",
    "edge": "+ --edge-weight (edge-weighted loss)",
    "cosine": "+ --schedule cosine with warm-up",
    "all": "augment + edge weight + cosine",
    "longer": "baseline, 2x the steps",
    "finetune": "baseline recipe from a pretrained MODEL.pth (-f)",
}


@dataclass
class ExperimentConfig:
    """One experiment; ``data``, ``heldout``, ``source`` left ``None`` are made with ``unet_deploy.images.synth``."""

    work_dir: Path = Path("experiment")
    data: Path | None = None
    heldout: Path | None = None
    source: Path | None = None
    pretrained: Path | None = None
    n_train: int = 48
    n_heldout: int = 16
    width: int = 240
    height: int = 160
    scale: float = 0.5
    base_channels: int = 16
    batch_size: int = 4
    steps: int = 240
    learning_rate: float = 1e-3
    optimizer: str = "adamw"
    seeds: list[int] = field(default_factory=lambda: [0])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    augment: str = "default"
    edge_weight: float = 5.0
    edge_width: float = 2.0
    warmup_fraction: float = 0.1
    band: int = 3
    device: str = "cpu"
    workers: int = 0
    threads: int | None = None  # torch CPU threads (None = torch's default)

    def validate(self) -> ExperimentConfig:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise UserError(f"--variants {','.join(unknown)}: unknown; choose from {','.join(VARIANTS)}")
        if not self.variants:
            raise UserError("--variants: name at least one variant")
        if self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be >= 1")
        if self.n_train < self.batch_size:
            raise UserError(f"--n-train {self.n_train}: must be at least --batch-size {self.batch_size}")
        if not self.seeds:
            raise UserError("--seeds: give at least one seed, e.g. 0,1,2")
        if self.band < 1:
            raise UserError(f"--band {self.band}: must be >= 1 pixel")
        if not 0 <= self.warmup_fraction < 1:
            raise UserError(f"--warmup-fraction {self.warmup_fraction}: must be in [0, 1)")
        preset(self.augment)
        return self


# The settings `--quick` uses: seconds on a laptop CPU, for tests and smoke runs (the numbers say little).
QUICK: dict[str, Any] = {"n_train": 8, "n_heldout": 4, "width": 64, "height": 48, "scale": 1.0,
                         "base_channels": 8, "batch_size": 2, "steps": 24, "learning_rate": 1e-2}


def _options(cfg: ExperimentConfig, variant: str) -> QualityOptions:
    aug = preset(cfg.augment) if variant in ("augment", "all") else preset("none")
    edge = cfg.edge_weight if variant in ("edge", "all") else 1.0
    cosine = variant in ("cosine", "all")
    warmup = int(cfg.warmup_fraction * cfg.steps) if cosine else 0
    return QualityOptions(aug, edge, cfg.edge_width, "cosine" if cosine else "plateau", warmup).validate()


def _generate(folder: Path, n: int, cfg: ExperimentConfig, seed: int, log: Callable[[str], None]) -> Path:
    marker = folder / "generated.json"
    settings = {"n": n, "width": cfg.width, "height": cfg.height, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return folder  # complete set from an earlier run with the same settings
    log(f"generating {n} synthetic {cfg.width}x{cfg.height} images in {folder} (seed {seed})")
    generate_dataset(folder, n=n, width=cfg.width, height=cfg.height, seed=seed, overwrite=True)
    atomic_write_text(marker, json.dumps(settings))
    return folder


def _steps_per_epoch(data: Path, batch_size: int) -> int:
    return max(len(find_pairs(data / "imgs", data / "masks")) // batch_size, 1)


def _train_one(cfg: ExperimentConfig, data: Path, out: Path, seed: int, options: QualityOptions, steps: int,
               load: Path | None, log: Callable[[str], None]) -> tuple[Path, float, float]:
    """Train; return (last checkpoint, wall seconds, training images/s)."""
    epochs = math.ceil(steps / _steps_per_epoch(data, cfg.batch_size))
    tc = TrainConfig(data=data, epochs=epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                     load=load, scale=cfg.scale, validation=0.0, base_channels=cfg.base_channels,
                     device=cfg.device, seed=seed, workers=cfg.workers, checkpoint_dir=out,
                     optimizer=cfg.optimizer, progress=False, max_steps=steps,
                     hooks=options.hooks(seed, steps))
    t0 = time.perf_counter()
    result = train(tc, log=lambda _msg: None)
    wall = time.perf_counter() - t0
    if result.interrupted:
        raise KeyboardInterrupt
    return result.last_path, wall, result.images_per_second


def evaluate_boundary(backend, pairs: Sequence, band: int, scale: float | None = None) -> float:
    """Mean over images of :func:`boundary_accuracy` at the original resolution (same pipeline as
    :func:`unet_deploy.train.evaluate_model`); images whose truth has no edge are skipped."""
    return _dice_and_boundary(backend, pairs, band, scale)[1]


def _dice_and_boundary(backend, pairs: Sequence, band: int, scale: float | None = None) -> tuple[float, float]:
    """Held-out dice (Carvana's metric) and boundary accuracy from one prediction per image."""
    dice, boundary = [], []
    for _pair, pred, truth in predicted_masks(backend, pairs, scale):
        dice.append(image_dice(pred, truth, backend.config.model.n_classes))
        acc = boundary_accuracy(pred.astype(np.int64), truth, band)
        if not math.isnan(acc):
            boundary.append(acc)
    return (float(np.mean(dice)) if dice else float("nan"),
            float(np.mean(boundary)) if boundary else float("nan"))


def _score(cfg: ExperimentConfig, ckpt: Path, heldout: Path) -> tuple[float, float]:
    backend = load_backend(ckpt, "torch", cfg.device)
    return _dice_and_boundary(backend, find_pairs(heldout / "imgs", heldout / "masks"), cfg.band)


def _export_pytorch_unet(ckpt: Path, dest: Path) -> Path:
    """Re-save a unet-deploy checkpoint as Pytorch-UNet saves MODEL.pth: a bare state dict + mask_values."""
    loaded = load_checkpoint(ckpt)
    state: dict[str, Any] = dict(loaded.state_dict)
    state["mask_values"] = list(loaded.config.inference.mask_values or [0, 1])
    with atomic_path(dest) as tmp:
        torch.save(state, tmp)
    return dest


def _summary(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every variant for every seed; return a JSON-ready dict with per-run rows and a summary."""
    cfg.validate()

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _datasets(cfg: ExperimentConfig, work: Path, tag: str, log: Callable[[str], None]) -> tuple[Path, Path]:
    """The training and held-out folders (generated when not given), checked to be distinct."""
    data = cfg.data or _generate(work / f"data-train-{cfg.n_train}-{tag}", cfg.n_train, cfg, 101, log)
    heldout = cfg.heldout or _generate(work / f"data-heldout-{cfg.n_heldout}-{tag}", cfg.n_heldout, cfg, 202,
                                       log)
    for d, flag in ((data, "--data"), (heldout, "--heldout")):
        if not (Path(d) / "imgs").is_dir():
            raise UserError(f"{d}: no imgs/ folder; pass a folder with imgs/ and masks/ as {flag}")
    if Path(data).resolve() == Path(heldout).resolve():
        raise UserError(f"--heldout {heldout}: must differ from --data (scores must come from unseen images)")
    return data, heldout


def _pretrained(cfg: ExperimentConfig, work: Path, tag: str, log: Callable[[str], None]
                ) -> tuple[Path | None, dict[str, Any] | None]:
    """The fine-tuning start point (``--pretrained``, or one trained here) and its pretraining record."""
    pretrain: dict[str, Any] | None = None
    pretrained = cfg.pretrained
    if "finetune" in cfg.variants and pretrained is None:
        source = cfg.source or _generate(work / f"data-source-{cfg.n_train}-{tag}", cfg.n_train, cfg, 303,
                                         log)
        log(f"pretraining the fine-tuning start point on {source} ({cfg.steps} steps)")
        ckpt, wall, ips = _train_one(cfg, Path(source), work / "runs" / "pretrain", cfg.seeds[0],
                                     _options(cfg, "baseline"), cfg.steps, None, log)
        pretrained = _export_pytorch_unet(ckpt, work / "runs" / "pretrain" / "MODEL.pth")
        pretrain = {"source": str(source), "steps": cfg.steps, "time_s": wall, "img_per_s": ips,
                    "model": str(pretrained)}
    elif pretrained is not None and not Path(pretrained).is_file():
        raise UserError(f"--pretrained {pretrained}: file not found; pass a Pytorch-UNet MODEL.pth or a "
                        "unet-deploy checkpoint")
    return pretrained, pretrain


def _train_variants(cfg: ExperimentConfig, work: Path, data: Path, heldout: Path, pretrained: Path | None,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Train and score every variant for every seed; one row per run."""
    runs: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        for variant in cfg.variants:
            options = _options(cfg, variant)
            steps = cfg.steps * (2 if variant == "longer" else 1)
            load = pretrained if variant == "finetune" else None
            log(f"seed {seed}: {variant} ({options.describe()}; {steps} steps)")
            ckpt, wall, ips = _train_one(cfg, Path(data), work / "runs" / f"{variant}-seed{seed}", seed,
                                         options, steps, load, log)
            dice, bacc = _score(cfg, ckpt, Path(heldout))
            row = {"variant": variant, "seed": seed, "steps": steps, "dice": dice, "boundary_acc": bacc,
                   "time_s": wall, "img_per_s": ips, "options": options.describe(), "checkpoint": str(ckpt)}
            log(f"  dice {dice:.4f}  boundary acc {bacc:.4f}  {wall:.1f} s")
            runs.append(row)
    return runs


def _summarise(cfg: ExperimentConfig, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: mean/std over seeds of dice, boundary accuracy and time, and dice against baseline."""
    summary = []
    base = [r["dice"] for r in runs if r["variant"] == "baseline"]
    base_mean = _summary(base)["mean"] if base else float("nan")
    for variant in cfg.variants:
        rows = [r for r in runs if r["variant"] == variant]
        d, b, t = (_summary([r[k] for r in rows]) for k in ("dice", "boundary_acc", "time_s"))
        summary.append({"variant": variant, "what": VARIANTS[variant], "steps": rows[0]["steps"],
                        "dice": d, "boundary_acc": b, "time_s": t, "delta_dice": d["mean"] - base_mean,
                        "seeds": len(rows)})
    return summary


def _run(cfg: ExperimentConfig, log: Callable[[str], None]) -> dict[str, Any]:
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{cfg.width}x{cfg.height}"
    data, heldout = _datasets(cfg, work, tag, log)
    pretrained, pretrain = _pretrained(cfg, work, tag, log)
    runs = _train_variants(cfg, work, data, heldout, pretrained, log)
    summary = _summarise(cfg, runs)

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    settings.update({"data": str(data), "heldout": str(heldout), "pretrained": str(pretrained) if pretrained
                     else None})
    return {"settings": settings, "runs": runs, "summary": summary, "pretrain": pretrain,
            "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(),
                            "device": cfg.device}}


def _pm(s: dict[str, float], digits: int, seeds: int) -> str:
    if math.isnan(s["mean"]):
        return "n/a"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if seeds > 1 else "")


def markdown_table(result: dict[str, Any]) -> str:
    """The summary as a markdown table (mean ± sample std over seeds when there are several)."""
    band = result["settings"]["band"]
    lines = [f"| variant | what changes | steps | held-out dice | Δ dice | boundary acc (±{band} px) | "
             "train time (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in result["summary"]:
        n = s["seeds"]
        delta = f"{s['delta_dice']:+.4f}"
        if s["variant"] == "baseline" or math.isnan(s["delta_dice"]):
            delta = "—"
        lines.append(f"| {s['variant']} | {s['what']} | {s['steps']} | {_pm(s['dice'], 4, n)} | {delta} | "
                     f"{_pm(s['boundary_acc'], 4, n)} | {_pm(s['time_s'], 1, n)} |")
    return "\n".join(lines)


def quick_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the tiny ``--quick`` sizes."""
    return replace(cfg, **QUICK)


def write_results(result: dict[str, Any], json_path: Path) -> None:
    """Write the result dict as JSON, atomically."""
    def clean(v: Any) -> Any:  # NaN is not JSON: write null
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    atomic_write_text(json_path, json.dumps(clean(result), indent=2))
