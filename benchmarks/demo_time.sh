#!/usr/bin/env bash
# Wall time of `unet-deploy demo` and the held-out dice of the model it trained, as one JSON.
# Usage: benchmarks/demo_time.sh OUT_DIR JSON   (unet-deploy on PATH; OUT_DIR is passed to demo -o)
set -euo pipefail
out=$1; json=$(realpath -m "$2")
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start=$(date +%s.%N)
unet-deploy demo -o "$out" > "$out.log" 2>&1
wall=$(echo "$(date +%s.%N) - $start" | bc)
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
unet-deploy evaluate -m "$out/checkpoints/best.pth" --data "$out/data/heldout" -q --json "$out/heldout-dice.json"
python3 - "$json" "$out" "$wall" "$load_before" "$load_after" <<'PY'
import datetime, json, os, platform, sys
path, out, wall, before, after = sys.argv[1:]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
record = {
    "schema": "unet-deploy/demo-time/1",
    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": f"unet-deploy demo -o {out}",
    "wall_s": float(wall),
    "load_avg_before": [float(x) for x in before.split()],
    "load_avg_after": [float(x) for x in after.split()],
    "heldout_evaluate": json.load(open(os.path.join(out, "heldout-dice.json"))),
    "machine": {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "platform": platform.platform()},
}
with open(path, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
print(f"wall {float(wall):.1f} s; wrote {path}")
PY
