"""What makes OpenVINO int8 fast on this CPU: this package's int8 path against the plain recipe a user would
follow, and the options tried to beat it, all timed in ONE process, interleaved round by round (so the
ratios share the machine's state), with parity against eager fp32 on real images.

The plain recipe: ``torch.onnx.export`` as is, ``nncf.quantize`` with its defaults on 4 calibration images,
compiled with OpenVINO's default hints (no precision hint: bf16 on a CPU with bf16). Each other recipe changes
one thing: this package's export (decoder rewrites), NNCF's preset, fast bias correction, the first (and last)
convolution left in float, the calibration count, the precision hint of the layers NNCF did not quantise.
Then the best recipe's throughput on a folder: one request at a time (latency hint) vs parallel streams.

    python benchmarks/openvino_int8_recipes.py --out /tmp/ovr --json benchmarks/openvino-int8-recipes.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "unet-deploy.openvino-int8-recipes/1"
#: name -> (source export, NNCF options, calibration images, precision hint or None for OpenVINO's default)
RECIPES: dict[str, tuple[str, dict[str, Any], int, str | None]] = {
    "plain recipe": ("plain", {}, 4, None),
    "ours before: all convs int8, f32 hint": ("ours", {"preset": "performance"}, 4, "f32"),
    "ours, all convs int8, bf16 hint": ("ours", {"preset": "performance"}, 4, "bf16"),
    "ours now: first conv float, bf16 hint": ("ours", {"preset": "performance", "float": "first"}, 4, "bf16"),
    "plain export, first conv float": ("plain", {"preset": "performance", "float": "first"}, 4, "bf16"),
    "ours, first conv float, mixed preset": ("ours", {"preset": "mixed", "float": "first"}, 4, "bf16"),
    "ours, first conv float, full bias correction": ("ours", {"preset": "performance", "float": "first",
                                                              "fast_bias_correction": False}, 4, "bf16"),
    "ours, first and last conv float": ("ours", {"preset": "performance", "float": "ends"}, 4, "bf16"),
    "ours, first conv float, 16 calibration images": ("ours", {"preset": "performance", "float": "first"}, 16,
                                                      "bf16"),
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("-m", "--model", type=Path, help="checkpoint (default: the seed width, transposed, seed 0)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES), help="names of RECIPES (default: all)")
    return ap.parse_args(argv)


def _model(args: argparse.Namespace) -> Path:
    import torch

    from unet_deploy.checkpoint import save_checkpoint
    from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig

    if args.model:
        return args.model
    path = args.out / "seed.pth"
    if not path.exists():
        torch.manual_seed(0)
        cfg = DeployConfig(model=ModelConfig(), inference=InferenceConfig(scale=0.5))
        save_checkpoint(path, cfg.model.build().eval(), cfg, {"note": "untrained seed width"})
    return path


def _images(out: Path, n: int, seed: int) -> list[np.ndarray]:
    from unet_deploy.bench.inputs import synthetic_image
    from unet_deploy.images.image_io import preprocess

    return [preprocess(synthetic_image(1918, 1280, seed + i), 0.5)[None] for i in range(n)]


def _sources(ckpt: Any, out: Path) -> dict[str, Path]:
    """The two fp32 ONNX files: this package's export and a plain torch.onnx.export."""
    import torch

    from unet_deploy.export import export_onnx, quiet_exporter

    model = ckpt.build_model("cpu")
    ours = export_onnx(model, ckpt.config, out / "ours.onnx")
    plain = out / "plain.onnx"
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(model, (torch.rand(2, 3, 64, 96),), str(plain), dynamo=True, dynamic_shapes=(dims,))
    return {"ours": ours, "plain": plain}


def _float_convs(model: Any, which: str) -> Any:
    """NNCF's ignored scope: the first convolution ("first") or the first and the last ("ends")."""
    import nncf

    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return nncf.IgnoredScope(names=[convs[0]] if which == "first" else [convs[0], convs[-1]])


def _quantize(source: Path, options: dict[str, Any], calib: list[np.ndarray]) -> tuple[Any, float]:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(source))
    kwargs: dict[str, Any] = {"subset_size": len(calib)}
    if options.get("preset"):
        kwargs["preset"] = {"performance": nncf.QuantizationPreset.PERFORMANCE,
                            "mixed": nncf.QuantizationPreset.MIXED}[options["preset"]]
    if "fast_bias_correction" in options:
        kwargs["fast_bias_correction"] = options["fast_bias_correction"]
    if options.get("float"):
        kwargs["ignored_scope"] = _float_convs(model, options["float"])
    t0 = time.perf_counter()
    quantized = nncf.quantize(model, nncf.Dataset(calib), **kwargs)
    return quantized, time.perf_counter() - t0


def _compile(model: Any, hint: str | None, threads: int | None, perf: str | None = None) -> Any:
    import openvino as ov

    config: dict[str, Any] = {}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    if perf:
        config["PERFORMANCE_HINT"] = perf
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, "CPU", config)


def _parity(compiled: Any, refs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    import torch

    from unet_deploy.export.parity import ParityThresholds, compare

    rows = [compare(torch.from_numpy(ref), torch.from_numpy(compiled(x)[0]), ParityThresholds.for_precision("int8"))
            for x, ref in refs]
    return {"worst_rel_err": max(r["rel_err"] for r in rows),
            "min_pixel_agreement": min(r["pixel_agreement"] for r in rows), "min_dice": min(r["dice"] for r in rows)}


def _time_rounds(compiled: dict[str, Any], x: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Every recipe once per round, in turn (after one warm-up call each)."""
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    for r in requests.values():
        r.infer({0: x})
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(rounds):
        for name, request in requests.items():
            t0 = time.perf_counter()
            request.infer({0: x})
            times[name].append(1e3 * (time.perf_counter() - t0))
    return times


def _folder_throughput(model: Any, hint: str | None, threads: int | None, batch: list[np.ndarray]) -> dict:
    """Images/s on ``batch`` one request at a time (latency hint) vs parallel streams (throughput hint)."""
    out = {}
    for perf in ("LATENCY", "THROUGHPUT"):
        compiled = _compile(model, hint, threads, perf)
        requests = [compiled.create_infer_request()
                    for _ in range(max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))))]
        for r in requests:
            r.infer({0: batch[0]})
        t0 = time.perf_counter()
        for start in range(0, len(batch), len(requests)):
            running = list(zip(requests, batch[start:start + len(requests)], strict=False))
            for r, x in running:
                r.start_async({0: x})
            for r, _x in running:
                r.wait()
        out[perf.lower()] = {"images_per_s": len(batch) / (time.perf_counter() - t0), "streams": len(requests)}
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import torch

    from unet_deploy.bench.machine import cpu_model, load_average_1m
    from unet_deploy.checkpoint import load_checkpoint
    from unet_deploy.fileio import atomic_write_text
    from unet_deploy.runtime.cpu_features import cpu_summary

    args.out.mkdir(parents=True, exist_ok=True)
    started, load_start = dt.datetime.now(dt.timezone.utc), load_average_1m()
    ckpt = load_checkpoint(_model(args))
    sources = _sources(ckpt, args.out)
    calib = _images(args.out, 16, 1000)
    tests = _images(args.out, 2, 2000)
    eager = ckpt.build_model("cpu")
    with torch.no_grad():
        refs = [(x, eager(torch.from_numpy(x)).numpy()) for x in tests]
    del eager
    compiled, rows = {}, {}
    for name in args.recipes:
        source, options, count, hint = RECIPES[name]
        model, quantise_s = _quantize(sources[source], options, calib[:count])
        compiled[name] = _compile(model, hint, args.threads)
        rows[name] = {"source": source, "nncf": options, "calibration_images": count, "hint": hint or "default",
                      "runs_at": compiled[name].get_property("INFERENCE_PRECISION_HINT").to_string(),
                      "quantise_s": quantise_s, "parity": _parity(compiled[name], refs)}
        print(f"{name}: quantised in {quantise_s:.0f} s, parity {rows[name]['parity']}", flush=True)
    times = _time_rounds(compiled, tests[0], args.rounds)
    plain = statistics.median(times["plain recipe"]) if "plain recipe" in times else None
    for name, ms in times.items():
        rows[name].update(ms=ms, p50_ms=statistics.median(ms),
                          vs_plain=(plain / statistics.median(ms)) if plain else None)
        print(f"{name:36s} p50 {rows[name]['p50_ms']:8.1f} ms  x{rows[name]['vs_plain'] or 0:.2f} vs plain", flush=True)
    best = min(rows, key=lambda n: rows[n]["p50_ms"])
    source, options, count, hint = RECIPES[best]
    folder = _folder_throughput(_quantize(sources[source], options, calib[:count])[0], hint, args.threads,
                                _images(args.out, 8, 3000))
    report = {"schema": SCHEMA, "started": started.isoformat(timespec="seconds"),
              "command": shlex.join(["python", "benchmarks/openvino_int8_recipes.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"cpu": cpu_model(), **cpu_summary(), "cores": os.cpu_count()},
              "load_avg": {"start": load_start, "end": load_average_1m()}, "model": ckpt.config.model.architecture,
              "input": "959x640", "rounds": args.rounds, "recipes": rows, "best": best,
              "best_folder_throughput_8_images": folder}
    atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    print(f"best: {best}; folder of 8: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
