#!/usr/bin/env bash
# ORT predict wall time (best of 5, median) for a 959x640 JPEG with a base-16 export at stored scale 0.5.
set -euo pipefail
# Usage: benchmarks/predict_startup.sh [WORK_DIR] [JSON]   (unet-deploy on PATH; prints the load average
# before and after; with JSON, also writes the five wall times, the load averages and the machine there)
json=${2:+$(realpath -m "$2")}
work=${1:-$(mktemp -d)}; mkdir -p "$work" && cd "$work"
if [ ! -f exported/best.onnx ]; then
  unet-deploy synth --out data --n 16 --width 480 --height 320 --overwrite >/dev/null
  unet-deploy train --data data -e 1 -b 4 --base-channels 16 --bilinear -q --max-steps 4 >/dev/null
  unet-deploy export --format onnx --quick-verify >/dev/null
  unet-deploy synth --out big --n 1 --width 959 --height 640 --seed 5 --overwrite >/dev/null
  cp big/imgs/*.jpg car.jpg
fi
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load before: $load_before"
times=()
for i in 1 2 3 4 5; do
  s=$(date +%s.%N); unet-deploy predict --backend ort car.jpg -q; e=$(date +%s.%N)
  times+=("$(echo "$e - $s" | bc)")
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "ORT predict wall: best %.2f s, median %.2f s (5 runs)\n", a[1], a[3]}'
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
echo "load after: $load_after"
if [ -n "$json" ]; then
  python3 - "$json" "$load_before" "$load_after" "${times[@]}" <<'PY'
import datetime, json, os, platform, statistics, sys
path, before, after, *times = sys.argv[1:]
wall = sorted(float(t) for t in times)
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
record = {
    "schema": "unet-deploy/predict-startup/1",
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": "unet-deploy predict --backend ort car.jpg -q",
    "input": "959x640 JPEG (synth --seed 5), base-16 bilinear export at its stored scale 0.5",
    "wall_s": [float(t) for t in times],
    "best_s": wall[0],
    "median_s": statistics.median(wall),
    "load_avg_before": [float(x) for x in before.split()],
    "load_avg_after": [float(x) for x in after.split()],
    "machine": {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "platform": platform.platform()},
}
with open(path, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
print(f"wrote {path}")
PY
fi
