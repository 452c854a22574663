#!/usr/bin/env bash
# A model quantized under 1, 2 and 3 threads is the same file (issue 21): calibration, SmoothQuant,
# AWQ and GPTQ reductions and products are blocked by the shape, never by the thread count.
# Usage: threads_same_bytes.sh MOPT MODEL CALIB WORKDIR
set -euo pipefail
mopt=$1 model=$2 calib=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
digest() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16); }
for args in "--format int8_sq" "--format int4_awq --group-size 64" "--format int4_awq --group-size 64 --algo gptq" \
            "--format nvfp4 --calibrator mse"; do
  first=""
  for t in 1 2 3; do
    out="$work/t$t"
    rm -rf "$out"
    # shellcheck disable=SC2086
    MOPT_THREADS=$t "$mopt" quantize "$model" $args --calib "$calib" --calib-size 8 --seq-len 128 --out "$out" > /dev/null 2>&1
    d=$(digest "$out")
    if [ -z "$first" ]; then first=$d; elif [ "$d" != "$first" ]; then
      echo "FAIL: $args: $t threads wrote $d, 1 thread $first"
      # Which files differ, and for the weights which tensors (the header's offsets name them).
      (cd "$work/t1" && sha256sum -- *) > "$work/sums1"
      (cd "$out" && sha256sum -- *) > "$work/sums$t"
      diff "$work/sums1" "$work/sums$t" || true
      cmp -l "$work/t1/model.safetensors" "$out/model.safetensors" | head -5 || true
      exit 1
    fi
  done
  echo "same bytes at 1, 2, 3 threads: $args ($first)"
done
