#!/usr/bin/env bash
# Peak memory of `mopt quantize` does not grow with depth: the same layer
# shape (random weights) at 8 and at 32 layers, quantized side by side with
# the same calibration, several runs each; prints peak RSS and time per run.
#
#   bash bench/ptq_memory.sh [FORMAT] [RUNS]     (defaults: nvfp4, 2)
# Needs the Release build (scripts/setup.sh). Uses $TMPDIR (about 1 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
FORMAT=${1:-nvfp4}
RUNS=${2:-2}
MOPT=build/mopt
GEN=build/bench/make_random_model
[[ -x $MOPT && -x $GEN ]] || { echo "build first: bash scripts/setup.sh (needs build/mopt and build/bench/make_random_model)"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mopt-ptq-memory.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
for layers in 8 32; do
  $GEN "$WORK/random-$layers" --layers $layers --hidden 1024 --intermediate 2816 --heads 16 --kv-heads 8 >/dev/null
done
printf '%-8s %-6s %-4s %12s %12s %10s\n' format layers run "weights MiB" "peak RSS MiB" seconds
for run in $(seq 1 "$RUNS"); do
  for layers in 8 32; do
    out="$WORK/q-$layers-$run"
    $MOPT quantize "$WORK/random-$layers" --format "$FORMAT" --calib data/kjv-calib.txt --calib-size 16 --seq-len 256 \
      --out "$out" --report "$out.json" >/dev/null 2>&1
    weights=$(du -sm "$WORK/random-$layers" | cut -f1)
    peak=$(grep -o '"peak_rss_bytes": [0-9]*' "$out.json" | grep -o '[0-9]*$')
    secs=$(grep -o '"seconds": [0-9.]*' "$out.json" | tail -1 | grep -o '[0-9.]*$')
    printf '%-8s %-6s %-4s %12s %12.1f %10.1f\n' "$FORMAT" "$layers" "$run" "$weights" "$(echo "$peak / 1048576" | bc -l)" "$secs"
    rm -rf "$out"
  done
done
