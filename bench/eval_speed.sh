#!/usr/bin/env bash
# Evaluation speed of quantized models against their 16-bit base, side by side in one run:
# `mopt eval ppl` tokens/s (the prefill-shaped work every evaluation is) of the base and of each
# model, each model's prefill over the base's, and the wall time of `mopt eval kld MODEL --base BASE`
# over one `eval ppl` of the base (kld runs both models). Models run interleaved, REPEATS times
# (default 3), medians. A model may be a .gguf file.
#   bash bench/eval_speed.sh BASE TEXT [--ctx N] [--products bf16|f32] MODEL...
set -euo pipefail
cd "$(dirname "$0")/.."
MOPT=${MOPT:-build/mopt}
REPEATS=${REPEATS:-3}
[[ $# -ge 3 ]] || { sed -n 2,7p "$0"; exit 2; }
base=$1 text=$2
shift 2
opts=()
while [[ $# -gt 0 && $1 == --* ]]; do opts+=("$1" "$2"); shift 2; done
models=("$@")
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
now() { date +%s.%N; }
declare -A tps kld
for _ in $(seq "$REPEATS"); do
  for m in "$base" "${models[@]}"; do
    t=$("$MOPT" eval ppl "$m" --text "$text" "${opts[@]}" 2>/dev/null | grep -o '[0-9.]* tokens/s' | cut -d' ' -f1 || true)
    tps[$m]+="${t:-failed} "
  done
  t0=$(now)
  "$MOPT" eval ppl "$base" --text "$text" "${opts[@]}" >/dev/null 2>&1
  tbase=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
  for m in "${models[@]}"; do
    [[ $m == *.gguf ]] && continue
    t0=$(now)
    "$MOPT" eval kld "$m" --base "$base" --text "$text" "${opts[@]}" >/dev/null 2>&1 || continue
    kld[$m]+="$(awk -v a="$t0" -v b="$(now)" -v t="$tbase" 'BEGIN { print (b - a) / t }') "
  done
done
"$MOPT" --version | grep -E '^(cpu|gemm|threads):'
echo "eval ppl on $text ${opts[*]}; medians of $REPEATS"
b=$(tr ' ' '\n' <<< "${tps[$base]}" | grep . | median)
printf '%-44s %10s %9s %16s\n' model tokens/s "/ base" "kld / ppl time"
printf '%-44s %10s %9s %16s\n' "$base" "$b" 1.00x -
for m in "${models[@]}"; do
  if [[ ${tps[$m]} == *failed* ]]; then printf '%-44s %10s\n' "$m" "failed (mopt eval ppl $m)"; continue; fi
  t=$(tr ' ' '\n' <<< "${tps[$m]}" | grep . | median)
  k=-
  [[ -n ${kld[$m]:-} ]] && k=$(tr ' ' '\n' <<< "${kld[$m]}" | grep . | median | awk '{ printf "%.2fx", $1 }')
  printf '%-44s %10s %9s %16s\n' "$m" "$t" "$(awk -v t="$t" -v b="$b" 'BEGIN { printf "%.2fx", t / b }')" "$k"
done
