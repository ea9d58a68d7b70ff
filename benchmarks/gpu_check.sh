#!/usr/bin/env bash
# One GPU check: every backend x precision at both scales, training img/s, peak memory -- one table.
#
#   benchmarks/gpu_check.sh [OUT_DIR]          # on an H100/H200 machine; within GPU_CHECK_BUDGET_S
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 benchmarks/gpu_check.sh /tmp/check   # smoke test, any machine
#
# Installs nothing: it runs the unet-deploy in this checkout with the Python on PATH (or $PYTHON).
# Every step has its own time limit, so the whole script stays within GPU_CHECK_BUDGET_S (480 s), and a
# step that runs over is reported and skipped, not fatal. Writes into OUT_DIR:
#   bench.json / bench-compiled.json  latency + peak memory per variant and scale (unet-deploy benchmark)
#   RESULTS.md                        the table, ratios, targets (rendered by unet-deploy benchmark)
#   train.log, train.json             training throughput (img/s) with AMP + channels_last
#   env.txt                           GPU, driver, torch, ONNX Runtime providers
set -uo pipefail

OUT=${1:-gpu-check-$(date +%Y%m%d-%H%M%S)}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
CLI=("$PY" -m unet_deploy)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# step NAME SECONDS CMD...: run with a limit (never beyond what is left of the budget)
step() {
  local name=$1 limit=$2; shift 2
  local rest; rest=$(left)
  (( limit > rest )) && limit=$rest
  if (( limit < 5 )); then echo "== $name: skipped (budget of ${BUDGET}s spent)"; return 124; fi
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  if (( rc == 124 || rc == 137 )); then echo "== $name: ran over ${limit}s, skipped"; fi
  return $rc
}

if [[ "$QUICK" == 1 ]]; then
  SIZE=(--quick)
  SYNTH=(--n 8 --width 240 --height 160)
  TRAIN=(--base-channels 8 --max-steps 6 -e 3 -b 2)
  BENCH_COUNTS=(--runs 2 --warmup 1)
else
  SIZE=()
  SYNTH=(--n 32 --width 1918 --height 1280)
  TRAIN=(--max-steps 60 -e 20 -b 4 --workers 8)
  BENCH_COUNTS=()
fi
if [[ "$DEVICE" == cpu ]]; then
  FAST=(torch torch-cl torch-bf16-cl torchscript ort ort-iob ort-int8)
  COMPILED=()
else
  # the seed default (eager fp32, cuDNN's TF32), fp16 + channels_last, TorchScript, ORT CUDA fp32/fp16
  # with IO binding; then torch.compile (default and reduce-overhead = CUDA graphs) in their own step
  FAST=(torch torch-fp16-cl torchscript ort-iob ort-fp16-iob)
  COMPILED=(torch torch-fp16-cl-compile torch-fp16-cl-cgraph)
fi

step env 60 "$PY" - > "$OUT/env.txt" 2>&1 <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, round(p.total_memory / 2**30, 1), "GiB", "cudnn", torch.backends.cudnn.version())
try:
    import onnxruntime as ort
    print("onnxruntime", ort.__version__, ort.get_available_providers())
except ImportError:
    print("onnxruntime missing")
EOF
cat "$OUT/env.txt"

step "benchmark: ${FAST[*]}" 240 "${CLI[@]}" benchmark "${SIZE[@]}" --device "$DEVICE" --backends "${FAST[@]}" \
  --scales 0.5 1.0 "${BENCH_COUNTS[@]}" --cache-dir "$OUT/models" --json "$OUT/bench.json" --quiet
MERGE=()
[[ -f "$OUT/bench.json" ]] && MERGE=(--merge "$OUT/bench.json")
if (( ${#COMPILED[@]} )); then
  step "benchmark: ${COMPILED[*]}" 200 "${CLI[@]}" benchmark "${SIZE[@]}" --device "$DEVICE" \
    --backends "${COMPILED[@]}" --scales 0.5 1.0 "${BENCH_COUNTS[@]}" --cache-dir "$OUT/models" \
    --json "$OUT/bench-compiled.json" --quiet
  [[ -f "$OUT/bench-compiled.json" ]] && MERGE+=(--merge "$OUT/bench-compiled.json")
fi

step "synthetic training data" 60 "${CLI[@]}" synth --out "$OUT/data" "${SYNTH[@]}" --overwrite > /dev/null
AMP=(--amp --channels-last)
step "training img/s (AMP, channels_last, scale 0.5)" 120 "${CLI[@]}" train --data "$OUT/data" --scale 0.5 \
  "${TRAIN[@]}" "${AMP[@]}" --device "$DEVICE" --checkpoint-dir "$OUT/ckpt" --quiet > "$OUT/train.log" 2>&1
tail -n 3 "$OUT/train.log"
"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
text = (out / "train.log").read_text() if (out / "train.log").exists() else ""
m = re.findall(r"([0-9.]+) img/s", text)
result = {"images_per_s": float(m[-1]) if m else None, "log_tail": text.strip().splitlines()[-3:]}
(out / "train.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"training: {result['images_per_s']} img/s (target on an H200 at scale 0.5: >= 150)")
EOF

# The whole table: every run so far merged into one RESULTS.md (markdown printed below).
if (( ${#MERGE[@]} )); then
  python_render() {
    "$PY" - "$OUT" "$@" <<'EOF'
import json, sys
from pathlib import Path
from unet_deploy.bench import render_markdown
out = Path(sys.argv[1])
reports = [json.loads(Path(p).read_text()) for p in sys.argv[2:]]
text = render_markdown(reports[0], merged=reports[1:], show_targets=True)
train = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else {}
text += f"\n## Training throughput\n\nAMP + channels_last, scale 0.5: {train.get('images_per_s')} img/s\n"
(out / "RESULTS.md").write_text(text)
print(text)
EOF
  }
  files=()
  for f in "$OUT/bench.json" "$OUT/bench-compiled.json"; do [[ -f "$f" ]] && files+=("$f"); done
  python_render "${files[@]}"
fi
echo "== done in $(( $(date +%s) - START ))s; results in $OUT"
