"""Dice of the int8 models (ONNX Runtime QDQ, and OpenVINO NNCF when the openvino extra is installed)
against fp32 on a held-out synthetic set (benchmarks/RESULTS.md).

Trains a small U-Net on synthetic Carvana-style cars (``unet_deploy.images.synth``), exports fp32 ONNX, quantises it
to static int8 (QDQ) calibrated on the TRAINING images (preprocessed as predict does), then scores eager
torch, ONNX fp32 and ONNX int8 on HELD-OUT images with the Carvana metric (``train.evaluate_model``: mean
per-image dice at the original resolution) and compares the int8 masks with the fp32 masks pixel by pixel.
With openvino and nncf installed, the same fp32 ONNX file is converted to an OpenVINO IR and quantised by NNCF
on the same calibration images, and scored the same way. Writes one JSON (schema ``unet-deploy.int8-eval/1``)
that ``unet-deploy benchmark --merge`` renders into RESULTS.md.

    python benchmarks/int8_eval.py --out /tmp/int8-eval --json benchmarks/int8-eval.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = "unet-deploy.int8-eval/1"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (data, checkpoints, exports)")
    ap.add_argument("--json", type=Path, required=True, help="result JSON")
    ap.add_argument("--train-images", type=int, default=24)
    ap.add_argument("--heldout-images", type=int, default=12)
    ap.add_argument("--width", type=int, default=480)
    ap.add_argument("--height", type=int, default=320)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--calibration-count", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--angles", type=int, default=2,
                    help="views per synthetic car: 2 gives 12 different cars in 24 training images (Carvana's "
                         "16 would give 1.5 cars, which a model memorises rather than learns)")
    args = ap.parse_args(argv)

    import torch

    from unet_deploy.checkpoint import load_checkpoint
    from unet_deploy.export import calibration_batches, export_onnx, quantize_onnx_int8
    from unet_deploy.export.parity import ParityThresholds
    from unet_deploy.fileio import atomic_write_text
    from unet_deploy.images.image_io import find_pairs
    from unet_deploy.images.synth import generate_dataset
    from unet_deploy.runtime import load_backend
    from unet_deploy.train import TrainConfig, evaluate_model, train

    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    out = args.out
    generate_dataset(out / "train", n=args.train_images, width=args.width, height=args.height, seed=0,
                     angles=args.angles)
    generate_dataset(out / "heldout", n=args.heldout_images, width=args.width, height=args.height, seed=1,
                     angles=args.angles)
    cfg = TrainConfig(data=out / "train", epochs=args.epochs, batch_size=2, learning_rate=1e-3,
                      optimizer="adamw", scale=args.scale, base_channels=args.base_channels, validation=10.0,
                      device="cpu", checkpoint_dir=out / "ckpt", progress=False, seed=0)
    t0 = time.perf_counter()
    result = train(cfg, log=lambda _m: None)
    train_s = time.perf_counter() - t0
    ckpt = load_checkpoint(result.best_path)
    model = ckpt.build_model("cpu")
    fp32_path = export_onnx(model, ckpt.config, out / "model.onnx")
    train_imgs = sorted((out / "train" / "imgs").iterdir())[: args.calibration_count]
    t0 = time.perf_counter()
    int8_path = quantize_onnx_int8(fp32_path, ckpt.config, out / "model.int8.onnx",
                                   calibration_batches(train_imgs, ckpt.config))
    quant_s = time.perf_counter() - t0
    pairs = find_pairs(out / "heldout" / "imgs", out / "heldout" / "masks")
    backends = {"eager fp32": load_backend(result.best_path, "torch", "cpu"),
                "onnx fp32": load_backend(fp32_path, "ort", "cpu", threads=args.threads),
                "onnx int8": load_backend(int8_path, "ort", "cpu", threads=args.threads)}
    openvino = _openvino_int8(fp32_path, ckpt.config, out, calibration_batches(train_imgs, ckpt.config))
    if openvino is not None:  # as predict runs it here: its non-quantised layers at bf16 where the CPU has it
        from unet_deploy.runtime.openvino_backend import openvino_cpu_has

        rest = "bf16" if openvino_cpu_has("bf16") else "fp32"
        backends["openvino int8"] = load_backend(openvino[0], "openvino", "cpu", threads=args.threads,
                                                 precision=rest, cache=False)
    dice = {name: evaluate_model(b, pairs)["dice"] for name, b in backends.items()}
    masks = _masks_vs_fp32(backends["onnx fp32"], backends["onnx int8"], pairs, ckpt.config)
    report = {
        "schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "benchmarks/int8_eval.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _machine(), "model": ckpt.config.model.architecture, "train_s": train_s, "quantise_s": quant_s,
        "train_val_dice": result.best_dice, "heldout_images": len(pairs),
        "dice": dice, "dice_change_int8_vs_fp32": dice["onnx int8"] - dice["onnx fp32"],
        "int8_vs_fp32_masks": masks,
        "thresholds": ParityThresholds.for_precision("int8").describe(),
    }
    if openvino is not None:
        report.update(openvino_quantise_s=openvino[1], openvino_int8_provider=backends["openvino int8"].provider,
                      dice_change_openvino_int8_vs_fp32=dice["openvino int8"] - dice["onnx fp32"],
                      openvino_int8_vs_fp32_masks=_masks_vs_fp32(backends["onnx fp32"], backends["openvino int8"],
                                                                 pairs, ckpt.config))
    atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


def _machine() -> dict:
    """The CPU and its int8/bf16 instruction sets: int8 kernels differ with and without VNNI."""
    import platform

    from unet_deploy.bench.machine import cpu_model

    flags: set[str] = set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = set(next(line for line in info.splitlines() if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pass
    from unet_deploy.runtime.cpu_features import cpu_summary

    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return {"cpu": cpu_model(), "platform": platform.platform(), "isa": [f for f in wanted if f in flags],
            **{k: v for k, v in cpu_summary().items() if k != "isa"}}


def _openvino_int8(fp32_onnx: Path, config, out: Path, calibration) -> tuple[Path, float] | None:
    """(NNCF int8 IR, seconds to make it) from the fp32 ONNX file, or None without openvino + nncf."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None:
        print("openvino/nncf not installed: OpenVINO int8 not evaluated (pip install 'unet-deploy[openvino]')")
        return None
    from unet_deploy.export.openvino_writer import convert_onnx_to_ir, quantize_ir_int8

    fp32_ir = convert_onnx_to_ir(fp32_onnx, config, out / "model.xml")
    t0 = time.perf_counter()
    int8_ir = quantize_ir_int8(fp32_ir, config, out / "model.int8.xml", calibration)
    return int8_ir, time.perf_counter() - t0


def _masks_vs_fp32(fp32, int8, pairs, config) -> dict:
    """int8 vs fp32 masks on the held-out images, by the export's int8 parity criteria."""
    from unet_deploy.export.parity import ParityThresholds, compare, image_cases

    thresholds = ParityThresholds.for_precision("int8")
    agreements, mask_dice, flipped, total = [], [], 0, 0
    for case in image_cases([p.image for p in pairs], config):
        r = compare(fp32(case.batch), int8(case.batch), thresholds)
        agreements.append(r["pixel_agreement"])
        mask_dice.append(r["dice"])
        flipped += r["flipped_pixels"]
        total += int(np.prod(case.batch.shape[-2:]))
    return {"min_pixel_agreement": min(agreements), "mean_pixel_agreement": float(np.mean(agreements)),
            "min_mask_dice": min(mask_dice), "flipped_pixels": flipped, "pixels": total}


if __name__ == "__main__":
    sys.exit(main())
