#!/usr/bin/env bash
# OpenMP's waiting on a quiet and on a busy machine, side by side in one run.
# Each setting runs fixed workloads quietly, then again beside one CPU-bound
# competitor per core (a shell loop), and prints tokens/s (median of REPEATS)
# and busy / quiet. A fair share of the cores beside one competitor each is 50%.
#   bash bench/thread_waits.sh [MODEL_1B]
#   settings: mopt's own choice (nothing set: mopt sets GOMP_SPINCOUNT itself), then
#   GOMP_SPINCOUNT=S for each S in $SPINS (default "PASSIVE 10 100 1000 300000"; PASSIVE means
#   OMP_WAIT_POLICY=PASSIVE; 300000 is libgomp's default spin when nothing is set)
#   workloads: tiny-kjv prefill (eval ppl, 20,000 characters), tiny-kjv decode
#   (eval ppl --decode, 3,000 characters) and, with MODEL_1B, a 1B-shape prefill of 256
#   tokens and 16 decode steps (bench/model_bench).
set -euo pipefail
cd "$(dirname "$0")/.."
MOPT=build/mopt
MODEL_1B=${1:-}
REPEATS=${REPEATS:-3}
SPINS=${SPINS:-"PASSIVE 10 100 1000 300000"}
[[ -x $MOPT ]] || { echo "build first: bash scripts/setup.sh"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mopt-thread-waits.XXXXXX")
competitors=()
cleanup() {
  for p in "${competitors[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
head -c 20000 data/kjv-heldout.txt > "$WORK/prefill.txt"
head -c 3000 data/kjv-heldout.txt > "$WORK/decode.txt"

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# One workload once under the environment "$@"; prints tokens/s.
run_once() {
  local workload=$1
  shift
  case $workload in
    prefill) env "$@" "$MOPT" eval ppl models/tiny-kjv --text "$WORK/prefill.txt" --ctx 256 2>/dev/null | grep -o '[0-9.]* tokens/s' | cut -d' ' -f1 ;;
    decode) env "$@" "$MOPT" eval ppl models/tiny-kjv --text "$WORK/decode.txt" --ctx 256 --decode 2>/dev/null | grep -o '[0-9.]* tokens/s' | cut -d' ' -f1 ;;
    1b-prefill) env "$@" build/bench/model_bench "$MODEL_1B" --prompt 256 --gen 16 --runs 1 2>/dev/null | grep -o 'prefill [0-9]* tokens: [0-9.]*' | awk '{ print $4 }' ;;
    1b-decode) env "$@" build/bench/model_bench "$MODEL_1B" --prompt 256 --gen 16 --runs 1 2>/dev/null | grep -o 'batch 1: [0-9.]*' | awk '{ print $3 }' ;;
  esac
}

measure() {  # workload, env...
  local w=$1
  shift
  for _ in $(seq "$REPEATS"); do run_once "$w" "$@"; done | median
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

workloads=(prefill decode)
[[ -n $MODEL_1B ]] && workloads+=(1b-prefill 1b-decode)
settings=("-u OMP_WAIT_POLICY -u GOMP_SPINCOUNT")
for s in $SPINS; do
  if [[ $s == PASSIVE ]]; then settings+=("OMP_WAIT_POLICY=PASSIVE"); else settings+=("GOMP_SPINCOUNT=$s"); fi
done

"$MOPT" --version | grep -E '^(cpu|threads):'
echo "$(nproc) cores; medians of $REPEATS; tokens/s quiet | beside $(nproc) competitors | busy/quiet"
printf '%-36s' "setting"
for w in "${workloads[@]}"; do printf ' | %-28s' "$w"; done
echo
for s in "${settings[@]}"; do
  read -r -a envs <<< "$s"
  label=$s
  [[ $s == -u* ]] && label="mopt's choice (nothing set)"
  printf '%-36s' "$label"
  for w in "${workloads[@]}"; do
    quiet=$(measure "$w" "${envs[@]}")
    start_competitors
    busy=$(measure "$w" "${envs[@]}")
    stop_competitors
    printf ' | %8s %8s %8s' "$quiet" "$busy" "$(awk -v b="$busy" -v q="$quiet" 'BEGIN { printf "%.0f%%", 100 * b / q }')"
  done
  echo
done
