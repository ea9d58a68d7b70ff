"""Throughput of ``predict --ray-address`` on one and on two local Ray nodes, against single-process ``predict``
and torchrun-sharded ``predict --nproc 2`` on the same images.

    python benchmarks/ray_predict.py --out benchmarks/results-ray.json --markdown benchmarks/RESULTS-ray.md
    python benchmarks/ray_predict.py --table benchmarks/results-ray.json      # the markdown of a JSON

What it does (all on this machine): a base-16 U-Net (bilinear, random weights: speed does not depend on them)
exported to ONNX, synthetic 959x640 JPEGs predicted at scale 0.5 with ``--no-save --rle``, each command a fresh
process timed from start to exit (what a user waits for), at two sizes of the input folder: the difference
gives the marginal rate (images/s once running) and the fixed cost (start-up, model loads, Ray's scheduling).
The Ray clusters (``ray.cluster_utils.Cluster``) are started before the timed commands, as a user's cluster
would be: one node of 2 CPUs (2 actors), and two nodes of 1 CPU each (2 actors, one per node). Every run's
submission must equal the single-process one. On a 2-core machine two nodes share the same two cores: the
figures measure Ray's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unet_deploy.runtime.cpu_share import usable_cpus  # noqa: E402

COMMAND = "python benchmarks/ray_predict.py --out benchmarks/results-ray.json --markdown benchmarks/RESULTS-ray.md"
SUMMARY = re.compile(r"predicted (\d+) of (\d+) files in ([\d.]+) s")
NOTE = ("Two Ray nodes on one 2-core machine share the same two cores: these figures measure Ray's overhead "
        "(connecting, starting actors, moving bytes through the object store), not a speed-up. On real "
        "machines each node adds its own cores.")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _setup(folder: Path, n: int, width: int, height: int, base: int) -> tuple[Path, dict[int, Path]]:
    """The ONNX model and input folders of the first ``k`` images for each k in (n // 8, n)."""
    import torch

    from unet_deploy.config import DeployConfig, InferenceConfig, ModelConfig
    from unet_deploy.export import export_onnx
    from unet_deploy.images.synth import generate_test_images

    torch.manual_seed(0)
    cfg = DeployConfig(model=ModelConfig(base_channels=base, bilinear=True), inference=InferenceConfig(scale=0.5))
    model = export_onnx(cfg.model.build().eval(), cfg, folder / f"unet{base}.onnx")
    names = generate_test_images(folder / "all", n=n, width=width, height=height, seed=3)
    sets = {}
    for k in (max(1, n // 8), n):
        sets[k] = folder / f"in{k}"
        sets[k].mkdir()
        for name in names[:k]:
            (sets[k] / f"{name}.jpg").symlink_to(folder / "all" / f"{name}.jpg")
    return Path(model), sets


def _timed(cmd: list[str], sub: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RAY_ADDRESS"):
        env.pop(key, None)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    found = SUMMARY.findall(proc.stdout + proc.stderr)
    return {"wall_s": round(wall, 2), "summary_s": float(found[-1][2]), "images": int(found[-1][0]),
            "submission": sub.read_bytes()}


def _cluster(nodes: list[int]) -> Any:
    from ray.cluster_utils import Cluster

    store = 200 * 1024 ** 2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": nodes[0], "object_store_memory": store})
    for cpus in nodes[1:]:
        cluster.add_node(num_cpus=cpus, object_store_memory=store)
    cluster.wait_for_nodes()
    return cluster


def _configs(model: Path) -> list[dict[str, Any]]:
    base = [sys.executable, "-m", "unet_deploy", "predict", "-m", str(model), "--no-save"]
    shown = "unet-deploy predict -m MODEL.onnx --no-save FOLDER --rle SUB.csv"
    return [
        {"name": "predict (1 process)", "cmd": base, "nodes": None, "workers": 1, "shown": shown},
        {"name": "predict --nproc 2 (torchrun)", "cmd": [*base, "--nproc", "2"], "nodes": None, "workers": 2,
         "shown": f"{shown} --nproc 2"},
        {"name": "--ray-address, 1 node x 2 CPUs", "cmd": base, "nodes": [2], "workers": 2,
         "shown": f"{shown} --ray-address HEAD:PORT"},
        {"name": "--ray-address, 2 nodes x 1 CPU", "cmd": base, "nodes": [1, 1], "workers": 2,
         "shown": f"{shown} --ray-address HEAD:PORT"},
    ]


def _measure(config: dict[str, Any], sets: dict[int, Path], work: Path, reference: dict[int, bytes],
             repeat: int) -> dict:
    cluster = _cluster(config["nodes"]) if config["nodes"] else None
    try:
        extra = ["--ray-address", cluster.address] if cluster is not None else []
        runs = {}
        for k, folder in sets.items():
            tries = []
            for _ in range(repeat):  # the fastest of `repeat` runs: the one least disturbed by other work
                sub = work / f"{len(reference)}-{k}.csv"
                tries.append(_timed([*config["cmd"], str(folder), "--rle", str(sub), *extra], sub))
                if reference.setdefault(k, tries[-1]["submission"]) != tries[-1].pop("submission"):
                    raise SystemExit(f"{config['name']}: the submission differs from single-process predict")
            runs[k] = {**min(tries, key=lambda r: r["wall_s"]), "wall_s_all": [r["wall_s"] for r in tries]}
    finally:
        if cluster is not None:
            cluster.shutdown()
    small, large = sorted(runs)
    extra_s = runs[large]["wall_s"] - runs[small]["wall_s"]
    marginal = (large - small) / extra_s if extra_s > 0 else None  # None: noise larger than the extra work
    return {"name": config["name"], "command": config["shown"],
            "nodes": len(config["nodes"] or [1]), "workers": config["workers"],
            "runs": {str(k): v for k, v in runs.items()},
            "images_per_s": round(large / runs[large]["wall_s"], 2),
            "marginal_images_per_s": round(marginal, 2) if marginal else None,
            "fixed_s": round(runs[small]["wall_s"] - small / marginal, 1) if marginal else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the JSON here")
    ap.add_argument("--markdown", type=Path, help="write the markdown (RESULTS-ray.md) here")
    ap.add_argument("--table", type=Path, help="print the markdown of this JSON and exit")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--width", type=int, default=959)
    ap.add_argument("--height", type=int, default=640)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="runs per command and size; the fastest is kept")
    args = ap.parse_args()
    if args.table:
        print(render(json.loads(args.table.read_text())), end="")
        return
    import ray

    result: dict[str, Any] = {
        "command": COMMAND, "note": NOTE,
        "machine": {"cpu": _cpu_model(), "usable_cpus": usable_cpus(), "logical_cpus": os.cpu_count(),
                    "load_avg_start": [round(x, 2) for x in os.getloadavg()], "ray": ray.__version__,
                    "python": platform.python_version(), "nice": os.nice(0)},
        "setup": {"images": args.images, "size": f"{args.width}x{args.height}", "scale": 0.5,
                  "model": f"U-Net base {args.base}, bilinear, ONNX Runtime", "flags": "--no-save --rle",
                  "repeat": args.repeat}}
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as tmp:
        model, sets = _setup(Path(tmp), args.images, args.width, args.height, args.base)
        reference: dict[int, bytes] = {}
        result["configs"] = [_measure(c, sets, Path(tmp), reference, args.repeat) for c in _configs(model)]
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.write_text(text)
    if args.markdown:
        args.markdown.write_text(render(result))
    print(render(result), end="")


def _or_dash(value: Any) -> str:
    return "–" if value is None else str(value)


def render(result: dict[str, Any]) -> str:
    """The markdown of RESULTS-ray.md from a JSON written by this script."""
    m, s = result["machine"], result["setup"]
    small, large = sorted(int(k) for k in result["configs"][0]["runs"])
    lines = [
        "# `predict --ray-address`: one vs two local Ray nodes, against torchrun",
        "",
        f"Made by `{result['command']}` (the JSON: `benchmarks/results-ray.json`).",
        "",
        f"Machine: {m['cpu']}, {m['usable_cpus']} usable cores ({m['logical_cpus']} logical), load average "
        f"{m['load_avg_start'][0]} at the start and {m['load_avg_end'][0]} at the end (shared with other work); "
        f"Ray {m['ray']}, Python {m['python']}; run at nice {m['nice']}.",
        "",
        f"Setup: {s['images']} synthetic {s['size']} JPEGs at scale {s['scale']}, {s['model']}, `{s['flags']}`; "
        f"each command a fresh process timed from start to exit, the fastest of {s['repeat']} runs (all of them in "
        "the JSON); the Ray clusters run before the command starts.",
        "",
        f"| how | processes / actors | nodes | wall s, {small} images | wall s, {large} images | images/s "
        f"({large}, end to end) | marginal images/s | fixed cost s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        walls = [c["runs"][str(k)]["wall_s"] for k in (small, large)]
        lines.append(f"| {c['name']} | {c['workers']} | {c['nodes']} | {walls[0]} | {walls[1]} | {c['images_per_s']} | "
                     f"{_or_dash(c['marginal_images_per_s'])} | {_or_dash(c['fixed_s'])} |")
    lines += [
        "",
        f"Marginal images/s = ({large} - {small}) / (wall at {large} - wall at {small}): the rate once running. Fixed "
        f"cost = wall at {small} - {small} / marginal rate: start-up, model loads and, for Ray, connecting and "
        "starting the actors. Every run's submission equals the single-process one.",
        "",
        f"**{result['note']}**",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
