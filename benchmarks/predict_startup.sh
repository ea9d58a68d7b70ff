#!/usr/bin/env bash
# ORT predict wall time (best of 5, median) for a 959x640 JPEG with a base-16 export at stored scale 0.5.
set -euo pipefail
# Usage: benchmarks/predict_startup.sh [WORK_DIR]   (unet-deploy on PATH; prints the load average before and after)
work=${1:-$(mktemp -d)}; mkdir -p "$work" && cd "$work"
if [ ! -f exported/best.onnx ]; then
  unet-deploy synth --out data --n 16 --width 480 --height 320 --overwrite >/dev/null
  unet-deploy train --data data -e 1 -b 4 --base-channels 16 --bilinear -q --max-steps 4 >/dev/null
  unet-deploy export --format onnx --quick-verify >/dev/null
  unet-deploy synth --out big --n 1 --width 959 --height 640 --seed 5 --overwrite >/dev/null
  cp big/imgs/*.jpg car.jpg
fi
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
times=()
for i in 1 2 3 4 5; do
  s=$(date +%s.%N); unet-deploy predict --backend ort car.jpg -q; e=$(date +%s.%N)
  times+=("$(echo "$e - $s" | bc)")
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "ORT predict wall: best %.2f s, median %.2f s (5 runs)\n", a[1], a[3]}'
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
