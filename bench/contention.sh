#!/usr/bin/env bash
# mopt on a quiet and on a busy machine, side by side in one run.
#
# Fixed workloads run quietly, then again beside one CPU-bound competitor per core (a shell
# loop): the situation of a laptop or a shared runner. Prints tokens/s (median of REPEATS),
# the busy run as a share of the quiet one (a fair share of the cores is 50%), and, when a
# second build is given, the same for it and the quiet ratio of the two builds.
#
#   bash bench/contention.sh MODEL_1B [OTHER_BUILD]
#
#   MODEL_1B: a checkpoint of the Llama-3.2-1B shape (mopt create-random DIR --like llama-3.2-1b)
#   OTHER_BUILD: a directory holding another build's mopt and model_bench (its bench/ or itself),
#     for instance the previous commit's, to compare against build/
#   workloads: `eval ppl` of tiny-kjv (20,000 characters), tiny-kjv decode (eval ppl --decode,
#   3,000 characters), NVFP4, INT4 GPTQ and 2:4 SparseGPT quantization of tiny-kjv (tokens/s:
#   calibration tokens / wall time; GPTQ and SparseGPT are mostly Hessian products, Cholesky
#   factors and column sweeps), and the 1B shape's prefill of 256 tokens and 16 decode steps
#   (bench/model_bench). WORKLOADS="gptq sparsegpt" runs some of them (then MODEL_1B may be -).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_1B=${1:?usage: bench/contention.sh MODEL_1B [OTHER_BUILD]}
OTHER=${2:-}
REPEATS=${REPEATS:-3}
[[ -x build/mopt ]] || { echo "build first: bash scripts/setup.sh"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mopt-contention.XXXXXX")
competitors=()
cleanup() {
  for p in "${competitors[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
head -c 20000 data/kjv-heldout.txt > "$WORK/prefill.txt"
head -c 3000 data/kjv-heldout.txt > "$WORK/decode.txt"

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

model_bench_of() {  # build dir -> its model_bench
  if [[ -x $1/bench/model_bench ]]; then echo "$1/bench/model_bench"; else echo "$1/model_bench"; fi
}

# One workload once with the build in $1; prints tokens/s.
run_once() {
  local build=$1 workload=$2 t0 t1
  case $workload in
    ppl) "$build/mopt" eval ppl models/tiny-kjv --text "$WORK/prefill.txt" --ctx 256 2>/dev/null | grep -o '[0-9.]* tokens/s' | cut -d' ' -f1 ;;
    decode) "$build/mopt" eval ppl models/tiny-kjv --text "$WORK/decode.txt" --ctx 256 --decode 2>/dev/null | grep -o '[0-9.]* tokens/s' | cut -d' ' -f1 ;;
    quantize)
      rm -rf "$WORK/q"
      t0=$(date +%s.%N)
      "$build/mopt" quantize models/tiny-kjv --format nvfp4 --calib data/kjv-calib.txt --calib-size 32 --seq-len 256 --out "$WORK/q" >/dev/null 2>&1
      t1=$(date +%s.%N)
      awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", 32 * 256 / (b - a) }' ;;
    gptq | sparsegpt)
      local flags=(--format int4_rtn --algo gptq --group-size 64)
      [[ $workload == sparsegpt ]] && flags=(--format none --sparsity 2:4 --sparse-algo sparsegpt)
      rm -rf "$WORK/q"
      t0=$(date +%s.%N)
      "$build/mopt" quantize models/tiny-kjv "${flags[@]}" --calib data/kjv-calib.txt --calib-size 32 --seq-len 256 --out "$WORK/q" >/dev/null 2>&1
      t1=$(date +%s.%N)
      awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", 32 * 256 / (b - a) }' ;;
    1b-prefill) "$(model_bench_of "$build")" "$MODEL_1B" --prompt 256 --gen 16 --runs 1 2>/dev/null | grep -o 'prefill [0-9]* tokens: [0-9.]*' | awk '{ print $4 }' ;;
    1b-decode) "$(model_bench_of "$build")" "$MODEL_1B" --prompt 256 --gen 16 --runs 1 2>/dev/null | grep -o 'batch 1: [0-9.]*' | awk '{ print $3 }' ;;
  esac
}

measure() {  # build, workload
  for _ in $(seq "$REPEATS"); do run_once "$1" "$2"; done | median
}

start_competitors() {
  for _ in $(seq "$(nproc)"); do
    sh -c 'while :; do :; done' &
    competitors+=($!)
  done
}
stop_competitors() {
  for p in "${competitors[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  competitors=()
}

builds=(build)
[[ -n $OTHER ]] && builds+=("$OTHER")
build/mopt --version | grep -E '^(cpu|threads):'
[[ -n $OTHER ]] && echo "other build: $OTHER ($("$OTHER/mopt" --version | grep -E '^threads:'))"
echo "$(nproc) cores; medians of $REPEATS; tokens/s quiet | beside $(nproc) competitors | busy/quiet"
printf '%-12s' "workload"
for b in "${builds[@]}"; do printf ' | %-26s' "$b"; done
[[ -n $OTHER ]] && printf ' | quiet build/other'
echo
for w in ${WORKLOADS:-ppl decode quantize gptq sparsegpt 1b-prefill 1b-decode}; do
  printf '%-12s' "$w"
  quiet_first=""
  for b in "${builds[@]}"; do
    quiet=$(measure "$b" "$w")
    start_competitors
    busy=$(measure "$b" "$w")
    stop_competitors
    [[ -z $quiet_first ]] && quiet_first=$quiet
    printf ' | %8s %8s %7s' "$quiet" "$busy" "$(awk -v b="$busy" -v q="$quiet" 'BEGIN { printf "%.0f%%", 100 * b / q }')"
  done
  [[ -n $OTHER ]] && printf ' | %.2fx' "$(awk -v a="$quiet_first" -v b="$quiet" 'BEGIN { print a / b }')"
  echo
done
