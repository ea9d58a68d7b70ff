"""Threads or processes, spinning or sleeping: a short `unet-deploy train` (the demo's model and data, 3 epochs)
with each way of using 2 CPUs, alone and beside two other multi-threaded jobs.

Usage: python benchmarks/train_threads.py --json benchmarks/train-threads.json [--work /tmp/train-threads]

Ways: "spin" = one process of 2 threads with libgomp's default wait (an ``OMP_WAIT_POLICY`` it does not
recognise is ignored, and unet-deploy keeps a policy the user set), "sleep" = the same with
``OMP_WAIT_POLICY=PASSIVE``, "auto" = unet-deploy's choice (sleep when the CPUs are busy as the command
starts), "2 processes" = `train --nproc 2` (DistributedDataParallel, one thread each; what the demo runs).
The busy jobs are those of `benchmarks/quickstart_busy.py`. A benchmark, not a test: quote it with the
machine and load it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

from quickstart_busy import BUSY_JOB, busy_jobs, load, write_record

#: name -> (OMP_WAIT_POLICY, or None to leave it to unet-deploy; extra train flags)
WAYS: dict[str, tuple[str | None, list[str]]] = {
    "spin": ("", []), "sleep": ("PASSIVE", []), "auto": (None, []), "2 processes": (None, ["--nproc", "2"])}
TRAIN = ["-e", "3", "-b", "4", "-s", "1.0", "-v", "10", "--base-channels", "16", "--bilinear", "-q", "--verbose"]


def train_once(data: Path, work: Path, policy: str | None, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    before, start = load(), time.perf_counter()
    proc = subprocess.run(["unet-deploy", "train", "--data", str(data), *TRAIN, *extra,
                           "--checkpoint-dir", str(work)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"train exited {proc.returncode}: {proc.stderr[-800:]}")
    out = proc.stdout + proc.stderr
    rate = re.findall(r"; ([\d.]+) img/s; checkpoints", out)
    return {"wall_s": round(wall, 1), "img_per_s": float(rate[-1]) if rate else None,
            "load_avg_before": before, "load_avg_after": load(),
            "threads": [line for line in out.splitlines() if line.startswith("threads: ")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/train-threads"))
    args = parser.parse_args()
    data = args.work / "data"
    if not data.is_dir():
        subprocess.run(["unet-deploy", "synth", "--out", str(data), "--n", "72", "--width", "192",
                        "--height", "128", "--seed", "0"], check=True, capture_output=True)
    results: dict[str, dict] = {}
    for condition in ("quiet", "busy"):
        for name, (policy, extra) in WAYS.items():
            ctx = busy_jobs(2) if condition == "busy" else contextlib.nullcontext()
            with ctx:
                work = args.work / f"ck-{condition}-{name.replace(' ', '-')}"
                results[f"{condition}/{name}"] = train_once(data, work, policy, extra)
            print(condition, name, results[f"{condition}/{name}"], flush=True)
    ratios = {name: round(results[f"busy/{name}"]["wall_s"] / results[f"quiet/{name}"]["wall_s"], 2) for name in WAYS}
    write_record(args.json, "train-threads/1", "train_threads.py",
                 {"train_flags": TRAIN, "busy_job": BUSY_JOB, "results": results, "busy_to_quiet": ratios})
    print(f"busy / quiet wall time per way: {ratios}; wrote {args.json}")


if __name__ == "__main__":
    main()
