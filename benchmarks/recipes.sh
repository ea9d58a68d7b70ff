#!/usr/bin/env bash
# The default training recipe against Pytorch-UNet's (--recipe pytorch-unet), as README.md's table: the
# demo's data (72 synthetic 192x128 images, seed 0, -v 10) and training settings (-e 12 -b 4 -s 1.0,
# base 16, --bilinear), scored on two held-out sets: the demo's (synth --heldout 24, seed 1000) and
# 24 images of `synth --seed 1`. Writes one JSON: per recipe, wall time and both evaluate results.
# Usage: benchmarks/recipes.sh WORK_DIR JSON   (unet-deploy on PATH)
# A recipe whose WORK_DIR/ck-RECIPE/best.pth exists is not trained again (e.g. ck-default -> the checkpoints
# of `unet-deploy demo`, whose training command is the same); its wall time is then recorded as null.
set -euo pipefail
work=$1; json=$(realpath -m "$2"); mkdir -p "$work"
[ -d "$work/data/imgs" ] ||
  unet-deploy synth --out "$work/data" --n 72 --heldout 24 --width 192 --height 128 --seed 0 --overwrite >/dev/null
unet-deploy synth --out "$work/heldout-seed1" --n 24 --width 192 --height 128 --seed 1 --overwrite >/dev/null
for recipe in default pytorch-unet; do
  echo "load before $recipe: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$work/$recipe.load"
  if [ -f "$work/ck-$recipe/best.pth" ]; then
    echo "$recipe: reusing $(realpath "$work/ck-$recipe")"; echo null > "$work/$recipe.wall"
  else
    start=$(date +%s.%N)
    unet-deploy train --data "$work/data" -e 12 -b 4 -s 1.0 -v 10 --base-channels 16 --bilinear \
      --recipe "$recipe" --checkpoint-dir "$work/ck-$recipe" -q
    echo "$(date +%s.%N) - $start" | bc > "$work/$recipe.wall"
  fi
  echo "load after $recipe: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$work/$recipe.load"
  unet-deploy evaluate -m "$work/ck-$recipe/best.pth" --data "$work/data/heldout" -q --json "$work/$recipe-demo-heldout.json"
  unet-deploy evaluate -m "$work/ck-$recipe/best.pth" --data "$work/heldout-seed1" -q --json "$work/$recipe-seed1.json"
done
python3 - "$json" "$work" <<'PY'
import datetime, json, os, platform, sys
path, work = sys.argv[1:]
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
train = "unet-deploy train --data {w}/data -e 12 -b 4 -s 1.0 -v 10 --base-channels 16 --bilinear --recipe {r}"
runs = {}
for r in ("default", "pytorch-unet"):
    loads = [line.rsplit(":", 1)[1].split() for line in open(os.path.join(work, f"{r}.load"))]
    runs[r] = {
        "command": train.format(w=work, r=r),
        "wall_s": json.loads(open(os.path.join(work, f"{r}.wall")).read()),
        "checkpoint": os.path.realpath(os.path.join(work, f"ck-{r}", "best.pth")),
        "load_avg_before": [float(x) for x in loads[0]], "load_avg_after": [float(x) for x in loads[1]],
        "heldout_demo_seed1000": json.load(open(os.path.join(work, f"{r}-demo-heldout.json"))),
        "heldout_synth_seed1": json.load(open(os.path.join(work, f"{r}-seed1.json"))),
    }
record = {
    "schema": "unet-deploy/recipes/1",
    "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "runs": runs,
    "machine": {"cpu": cpu, "usable_cores": len(os.sched_getaffinity(0)), "platform": platform.platform()},
}
with open(path, "w") as f:
    json.dump(record, f, indent=2)
    f.write("\n")
print(f"wrote {path}")
PY
