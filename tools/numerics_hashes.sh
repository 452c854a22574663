#!/usr/bin/env bash
# Quantizes the bundled tiny-kjv with every preset, the algorithms and calibrators, and every
# export target, and prints one line per run: the run's flags and a hash of every file it wrote
# (or "refused" and the exit code). Two builds that print the same lines compute the same
# numbers. Used to show a restructuring changed no result:
#
#   bash tools/numerics_hashes.sh OLD/mopt > old.txt
#   bash tools/numerics_hashes.sh build/mopt > new.txt && diff old.txt new.txt
#
# Environment: MODEL (default models/tiny-kjv), CALIB (default data/kjv-calib.txt), THREADS
# (default 2; results are compared at one thread count).
set -uo pipefail
mopt=${1:?usage: numerics_hashes.sh path/to/mopt}
model=${MODEL:-models/tiny-kjv}
calib=${CALIB:-data/kjv-calib.txt}
export MOPT_THREADS=${THREADS:-2} OMP_NUM_THREADS=${THREADS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {  # run EXPORT FLAGS...: one line
  local export=$1
  shift
  local out="$work/out"
  [ "$export" = gguf ] && out="$work/out.gguf"
  rm -rf "$work/out" "$work/out.gguf"
  if "$mopt" quantize "$model" --out "$out" --export "$export" --calib "$calib" --calib-size 8 --seq-len 128 "$@" \
      > "$work/log" 2>&1; then
    local hash
    if [ -d "$out" ]; then
      hash=$(cd "$out" && find . -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
    else
      hash=$(sha256sum < "$out" | cut -c1-16)
    fi
    echo "$export $* -> $hash"
  else
    echo "$export $* -> refused ($?): $(grep -i error "$work/log" | head -1 | cut -c1-100)"
  fi
}

formats="fp8 fp8_pc_pt fp8_block int8 int8_sq int8_wo int4_rtn int4_awq w4a8_awq nvfp4 nvfp4_awq mxfp8 mxfp4"
for f in $formats; do
  group=()
  case $f in int4* | w4a8*) group=(--group-size 64) ;; esac  # tiny-kjv's 704 inputs: no groups of 128
  for e in modelopt compressed-tensors gguf; do run "$e" --format "$f" "${group[@]}"; done
done
for a in max awq_lite awq_clip awq_full gptq awq_lite+gptq; do
  run modelopt --format int4_awq --algo "$a" --group-size 64
done
run modelopt --format int8_sq --algo smoothquant
run modelopt --format int8 --algo gptq
for c in percentile mse entropy; do
  run modelopt --format fp8 --calibrator "$c"
  run modelopt --format int8_sq --calibrator "$c"
done
run modelopt --format fp8 --kv-cache fp8
run modelopt --format nvfp4 --kv-cache nvfp4
run modelopt --format int4_awq --group-size 64 --quantize-lm-head
run modelopt --format int4_awq --group-size 64 --propagate-quantized
run modelopt --format int4_awq --group-size 64 --algo gptq --gptq-act-order
for t in q4_0 q8_0 q4_k_m q6_k q5_0 q4_0_pure q4_k bf16; do
  run gguf --format int4_awq --group-size 64 --gguf-type "$t"
done
