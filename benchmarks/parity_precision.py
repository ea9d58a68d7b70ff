"""How far reduced precisions move a U-Net's logits and masks: the measurements behind the bf16 / fp16 / int8
parity thresholds in ``unet_deploy/parity.py``.

For each model -- untrained Pytorch-UNet checkpoints (bare state dicts, both variants, several seeds) and
models trained here on synthetic cars (the seed width, base 16, and the demo's bilinear base 16) -- every
reduced-precision path that runs on this CPU is compared with eager fp32 on the export's parity inputs
(random images at 959x640, an odd size, a batch of 2, a synthetic car at 959x640), two more synthetic cars
and real images preprocessed as ``predict`` does (1918x1280 synthetic cars at scale 0.5). One row per
(model, path, input): relative logit error (max |a - b| / max |a|), pixel agreement, flipped pixels and mask
dice. The summary gives, per precision, the distribution the constants are set from. Writes one JSON
(schema ``unet-deploy.parity-precision/1``):

    python benchmarks/parity_precision.py --out /tmp/pp --json benchmarks/parity-precision.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "unet-deploy.parity-precision/1"


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (data, checkpoints, exports)")
    ap.add_argument("--json", type=Path, required=True, help="result JSON")
    ap.add_argument("--seeds", type=int, default=2, help="untrained Pytorch-UNet checkpoints per variant")
    ap.add_argument("--seed-epochs", type=int, default=3, help="epochs of the trained seed-width model")
    ap.add_argument("--small-epochs", type=int, default=8, help="epochs of the trained base-16 model")
    ap.add_argument("--images", type=int, default=2, help="real 1918x1280 images per model (at scale 0.5)")
    ap.add_argument("--demo-model", type=int, default=1, help="1: also the model `unet-deploy demo` trains")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="openvino-bf16,torch-bf16,ort-fp16,ort-int8,openvino-int8,openvino-int8-bf16",
                    help="reduced-precision paths to measure (int8 paths on trained models only)")
    return ap.parse_args(argv)


def _untrained(out: Path, bilinear: bool, seed: int) -> Path:
    """A Pytorch-UNet checkpoint as its train.py saves one: a bare state dict (plus mask_values)."""
    import torch

    from unet_deploy.model import UNet

    torch.manual_seed(seed)
    model = UNet(3, 2, bilinear=bilinear)
    path = out / f"MODEL_{'bilinear' if bilinear else 'transposed'}_seed{seed}.pth"
    state = dict(model.state_dict())
    state["mask_values"] = [0, 1]
    torch.save(state, path)
    return path


def _trained(out: Path, base: int, epochs: int, threads: int) -> Path:
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.train import TrainConfig, train

    data = out / "train"
    if not (data / "imgs").is_dir():
        generate_dataset(data, n=24, width=480, height=320, seed=0, angles=2)
    cfg = TrainConfig(data=data, epochs=epochs, batch_size=2, learning_rate=1e-3, optimizer="adamw", scale=0.5,
                      base_channels=base, validation=10.0, device="cpu", checkpoint_dir=out / f"ckpt-w{base}",
                      progress=False, seed=0)
    t0 = time.perf_counter()
    result = train(cfg, log=lambda _m: None)
    print(f"trained base {base}: {epochs} epochs, val dice {result.best_dice:.4f}, {time.perf_counter() - t0:.0f} s",
          flush=True)
    return Path(result.best_path)


def _demo_model(out: Path) -> Path:
    """The model `unet-deploy demo` trains (its commands: base 16, bilinear, 72 cars at 192x128, scale 1)."""
    import subprocess

    data, ckpt = out / "demo-data", out / "ckpt-demo"
    steps = [["synth", "--out", str(data), "--n", "72", "--width", "192", "--height", "128", "--seed", "0",
              "--overwrite"],
             ["train", "--data", str(data), "-e", "12", "-b", "4", "-s", "1.0", "-v", "10", "--base-channels", "16",
              "--bilinear", "--checkpoint-dir", str(ckpt), "-q"]]
    for step in steps:
        subprocess.run([sys.executable, "-m", "unet_deploy", *step], check=True, capture_output=True)
    return ckpt / "best.pth"


def _cases(config: Any, images: list[Path]) -> list[Any]:
    """The export's default cases, the synthetic car reduced precisions add and two more at 959x640, and the
    real images."""
    from unet_deploy.export.parity import CARVANA_HALF, car_case, default_cases, image_cases

    cars = [car_case(config, CARVANA_HALF, "car-0.5" + (f" seed {seed}" if seed else ""), seed) for seed in (0, 1, 2)]
    return default_cases(config) + cars + image_cases(images, config, scale=0.5)


def _candidates(ckpt_path: Path, work: Path, paths: list[str], trained: bool, calib: list[Path],
                threads: int) -> dict[str, Any]:
    """name -> (precision, loaded backend) for every path that runs here."""
    from unet_deploy.checkpoint import load_checkpoint
    from unet_deploy.export import calibration_batches, convert_onnx_fp16, export_onnx, quantize_onnx_int8
    from unet_deploy.export.openvino_writer import convert_onnx_to_ir, quantize_ir_int8
    from unet_deploy.runtime import cpu_supports_bf16, load_backend
    from unet_deploy.runtime.openvino_backend import openvino_cpu_has

    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.config
    onnx_path = export_onnx(ckpt.build_model("cpu"), cfg, work / "model.onnx")
    out: dict[str, Any] = {}
    if "openvino-bf16" in paths and openvino_cpu_has("bf16"):
        ir = convert_onnx_to_ir(onnx_path, cfg, work / "model.xml")
        out["openvino-bf16"] = ("bf16", load_backend(ir, "openvino", "cpu", precision="bf16", cache=False,
                                                     threads=threads))
    if "torch-bf16" in paths and cpu_supports_bf16():
        out["torch-bf16"] = ("bf16", load_backend(ckpt_path, "torch", "cpu", precision="bf16"))
    if "ort-fp16" in paths:
        out["ort-fp16"] = ("fp16", load_backend(convert_onnx_fp16(onnx_path, cfg, work / "model.fp16.onnx"), "ort",
                                                "cpu", threads=threads))
    if not trained:
        return out
    if "ort-int8" in paths:
        int8 = quantize_onnx_int8(onnx_path, cfg, work / "model.int8.onnx", calibration_batches(calib, cfg))
        out["ort-int8"] = ("int8", load_backend(int8, "ort", "cpu", threads=threads))
    if {"openvino-int8", "openvino-int8-bf16"} & set(paths):
        ir = convert_onnx_to_ir(onnx_path, cfg, work / "model.xml")
        int8_ir = quantize_ir_int8(ir, cfg, work / "model.int8.xml", calibration_batches(calib, cfg))
        if "openvino-int8" in paths:
            out["openvino-int8"] = ("int8", load_backend(int8_ir, "openvino", "cpu", precision="fp32", cache=False,
                                                         threads=threads))
        if "openvino-int8-bf16" in paths and openvino_cpu_has("bf16"):
            out["openvino-int8-bf16"] = ("int8", load_backend(int8_ir, "openvino", "cpu", precision="bf16",
                                                              cache=False, threads=threads))
    return out


def _measure(name: str, kind: str, ckpt_path: Path, work: Path, args: argparse.Namespace, images: list[Path],
             calib: list[Path]) -> list[dict[str, Any]]:
    """Every candidate of one model against eager fp32, case by case."""
    import torch

    from unet_deploy.export.parity import ParityThresholds, compare
    from unet_deploy.runtime import load_backend

    work.mkdir(parents=True, exist_ok=True)
    eager = load_backend(ckpt_path, "torch", "cpu")
    cands = _candidates(ckpt_path, work, args.paths.split(","), kind == "trained", calib, args.threads)
    rows = []
    for case in _cases(eager.config, images):
        ref = torch.as_tensor(eager.run(case.batch))
        for path, (precision, backend) in cands.items():
            t0 = time.perf_counter()
            out = torch.as_tensor(backend.run(case.batch))
            seconds = time.perf_counter() - t0
            r = compare(ref, out, ParityThresholds(), eager.config.inference.threshold)
            margin = ref[:, 1] - ref[:, 0] if ref.shape[1] == 2 else ref[:, 0]
            rows.append({"model": name, "kind": kind, "architecture": eager.config.model.architecture,
                         "path": path, "precision": precision, "case": case.name,
                         "input": "image" if case.real else "random", "shape": list(case.shape),
                         "seconds": round(seconds, 3), "max_abs_logit": float(ref.abs().max()),
                         "near_ties": float((margin.abs() < 0.05 * ref.abs().max()).float().mean()),
                         **{k: r[k] for k in ("rel_err", "pixel_agreement", "flipped_pixels", "dice")}})
            print(f"{name:34s} {path:19s} {case.name:22s} rel {r['rel_err']:.4f} agree "
                  f"{r['pixel_agreement']:.4%} dice {r['dice']:.5f} ({seconds:.1f} s)", flush=True)
    return rows


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"n": int(a.size), "min": float(a.min()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per precision, and per precision x input kind x model kind: distributions of the measures."""
    out: dict[str, Any] = {}
    keys = sorted({(r["precision"], r["input"], r["kind"]) for r in rows})
    for precision in sorted({r["precision"] for r in rows}):
        group = [r for r in rows if r["precision"] == precision]
        entry: dict[str, Any] = {"rel_err": _stats([r["rel_err"] for r in group]),
                                 "pixel_agreement": _stats([r["pixel_agreement"] for r in group]),
                                 "dice": _stats([r["dice"] for r in group]), "by": {}}
        for p, inp, kind in keys:
            if p != precision:
                continue
            sub = [r for r in group if r["input"] == inp and r["kind"] == kind]
            entry["by"][f"{inp}/{kind}"] = {"rel_err": _stats([r["rel_err"] for r in sub]),
                                            "pixel_agreement": _stats([r["pixel_agreement"] for r in sub]),
                                            "dice": _stats([r["dice"] for r in sub])}
        out[precision] = entry
    return out


def _models(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    out = args.out
    models = [(f"pytorch-unet {'bilinear' if b else 'transposed'} seed {s}", "untrained", _untrained(out, b, s))
              for b in (True, False) for s in range(args.seeds)]
    if args.seed_epochs > 0:
        models.append(("trained seed width (64, transposed)", "trained", _trained(out, 64, args.seed_epochs,
                                                                                   args.threads)))
    if args.small_epochs > 0:
        models.append(("trained base 16 (transposed)", "trained", _trained(out, 16, args.small_epochs, args.threads)))
    if args.demo_model:
        models.append(("the demo's model (base 16, bilinear)", "trained", _demo_model(out)))
    return models


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    from unet_deploy.bench.machine import cpu_model
    from unet_deploy.fileio import atomic_write_text
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.runtime.cpu_features import cpu_summary

    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    args.out.mkdir(parents=True, exist_ok=True)
    big = args.out / "carvana-size"
    if not (big / "imgs").is_dir():
        generate_dataset(big, n=args.images, width=1918, height=1280, seed=7, angles=16)
    images = sorted((big / "imgs").iterdir())[: args.images]
    rows: list[dict[str, Any]] = []
    models = _models(args)
    calib = sorted((args.out / "train" / "imgs").iterdir())[:8] if (args.out / "train").is_dir() else []
    for i, (name, kind, ckpt) in enumerate(models):
        rows += _measure(name, kind, ckpt, args.out / f"work{i}", args, images, calib)
    report = {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
              "command": shlex.join(["python", "benchmarks/parity_precision.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"cpu": cpu_model(), **cpu_summary()}, "rows": rows, "summary": summarise(rows)}
    atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
