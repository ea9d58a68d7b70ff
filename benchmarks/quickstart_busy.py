"""The Quick start's main job (`unet-deploy demo`) on a quiet machine, beside two other multi-threaded jobs, and
under a 1-CPU cgroup quota (where this process may create a cgroup): wall time, held-out dice, load averages.

Usage: python benchmarks/quickstart_busy.py --json benchmarks/quickstart-busy.json [--work /tmp/qs]
[--conditions quiet busy quota1] [--rounds 2]

Each condition runs `unet-deploy demo -o WORK/<condition>-<round>` in a fresh folder, in --rounds interleaved
rounds (the JSON keeps every run, its per-step times, and the median). "busy": two background Python
processes, each multiplying 1024x1024 matrices on 2 torch threads without pause, started 5 s before the demo
and stopped after it. "quota1": the demo (and its child processes) in a cgroup v1 `cpu` group with
cfs_quota_us = cfs_period_us (1 CPU). A fair share of 2 cores among 3 busy jobs is 2/3 of a core: the goal is
busy <= 3x quiet. This is a benchmark, not a test: quote it with the machine and load it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

BUSY_JOB = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
            "while True:\n    a = (a @ a).clamp_(-1, 1)\n")
CGROUP = Path("/sys/fs/cgroup/cpu")


def cpu_model() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


@contextlib.contextmanager
def busy_jobs(count: int) -> Iterator[None]:
    jobs = [subprocess.Popen([sys.executable, "-c", BUSY_JOB]) for _ in range(count)]
    time.sleep(5)
    try:
        yield
    finally:
        for job in jobs:
            job.kill()
            job.wait()


@contextlib.contextmanager
def one_cpu_quota() -> Iterator[list[str]]:
    """A cgroup v1 cpu group with a 1-CPU quota; yields the shell prefix that runs a command inside it."""
    group = CGROUP / f"unet-deploy-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text("100000")
        yield ["bash", "-c", f'echo $$ > {group / "tasks"} && exec "$0" "$@"']
        time.sleep(1)
    finally:
        group.rmdir()


def write_record(path: Path, schema: str, script: str, fields: dict) -> None:
    """The benchmark's JSON: schema, finish time, the command that made it, ``fields``, and the machine."""
    record = {"schema": f"unet-deploy/{schema}",
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]), **fields,
              "machine": {"cpu": cpu_model(), "usable_cores": len(os.sched_getaffinity(0)),
                          "platform": platform.platform()}}
    path.write_text(json.dumps(record, indent=2) + "\n")


def run_demo(out: Path, prefix: list[str]) -> dict:
    before, start = load(), time.perf_counter()
    proc = subprocess.run([*prefix, "unet-deploy", "demo", "-o", str(out)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = load()
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"demo in {out} exited {proc.returncode}: {proc.stderr[-800:]}")
    dice_json = out / "heldout-dice.json"
    subprocess.run(["unet-deploy", "evaluate", "-m", str(out / "checkpoints" / "best.pth"), "--data",
                    str(out / "data" / "heldout"), "-q", "--json", str(dice_json)], check=True,
                   capture_output=True)
    dice = json.loads(dice_json.read_text())
    steps = {f"step{n}": float(s) for n, s in re.findall(r"^step (\d+) took ([\d.]+) s$", proc.stdout, re.MULTILINE)}
    crf = re.findall(r"^dice with --crf ([\d.]+) over", proc.stdout, re.MULTILINE)  # step 3 prints both
    return {"wall_s": round(wall, 1), "step_s": steps, "heldout_dice_crf": float(crf[0]) if crf else None,
            "load_avg_before": before, "load_avg_after": after,
            "heldout_dice": dice["dice"], "heldout_images": dice["n"]}


def run_condition(condition: str, out: Path) -> dict:
    if out.exists():
        raise SystemExit(f"{out} exists: give an empty --work folder")
    ctx = busy_jobs(2) if condition == "busy" else contextlib.nullcontext()
    quota = one_cpu_quota() if condition == "quota1" else contextlib.nullcontext([])
    with ctx, quota as prefix:
        result = run_demo(out, prefix)
    print(condition, result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/unet-quickstart-busy"))
    parser.add_argument("--conditions", nargs="+", default=["quiet", "busy", "quota1"])
    parser.add_argument("--rounds", type=int, default=2,
                        help="Rounds of all conditions, interleaved (quiet, busy, quota1, quiet, ...); medians")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    conditions = [c for c in args.conditions if c != "quota1" or os.access(CGROUP, os.W_OK)]
    runs: dict[str, list[dict]] = {c: [] for c in conditions}
    for round_no in range(1, args.rounds + 1):
        for condition in conditions:
            runs[condition].append(run_condition(condition, args.work / f"{condition}-{round_no}"))
    results: dict[str, dict] = {
        c: {"median_wall_s": round(statistics.median(r["wall_s"] for r in runs[c]), 1), "runs": runs[c]}
        for c in conditions}
    results.update({c: {"skipped": "no writable cgroup v1 cpu controller here"}
                    for c in args.conditions if c not in conditions})
    quiet = results.get("quiet", {}).get("median_wall_s")
    ratios = {c: round(r["median_wall_s"] / quiet, 2) for c, r in results.items() if quiet and "runs" in r}
    write_record(args.json, "quickstart-busy/2", "quickstart_busy.py",
                 {"busy_job": BUSY_JOB, "results": results, "ratio_of_medians_to_quiet": ratios})
    print(f"ratios of median wall times to quiet: {ratios}; wrote {args.json}")


if __name__ == "__main__":
    main()
