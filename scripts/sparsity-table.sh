#!/usr/bin/env bash
# The 2:4 sparsity table of docs/ACCURACY.md, in the shape of the reference's (dense / SparseGPT /
# SparseGPT + sparse fine-tuning): a model fine-tuned on the Bible set (KJV verse -> WEB verse,
# tools/make_bible_sft.sh), pruned to 2:4 by magnitude, by SparseGPT's mask alone (the reference's
# mode) and by full SparseGPT (mask and weight update), each in 16 bits and with FP8; then each
# fine-tuned with its masks kept (with FP8: sparse QAT) for as many steps as a 16-bit control trained
# on from the fine-tune. Scored by the validation loss on the response tokens of held-out books, as
# paired differences on the same tokens (mopt eval loss --base).
#
# Usage (repository root): bash scripts/sparsity-table.sh [WORKDIR]
#   MODEL=models/tiny-kjv  FT_STEPS=300 (0: score MODEL itself, no fine-tune)  SPARSE_STEPS=150 (0: no
#   sparse fine-tuning rows)  ALGOS="magnitude sparsegpt-mask sparsegpt"  PRECISIONS="none fp8"  BATCH=8
#   VAL_STRIDE=2  CALIB_SIZE=64
# Writes WORKDIR/paired.tsv and each run's output beside it; needs build/mopt (MOPT=... for another)
# and the Debian Bible packages tools/extract_bible.sh names (SFT=DIR reuses a built set).
set -euo pipefail
work=${1:-${TMPDIR:-/tmp}/mopt-sparsity-table}
mopt=${MOPT:-build/mopt}
model=${MODEL:-models/tiny-kjv}
ft_steps=${FT_STEPS:-300}
sparse_steps=${SPARSE_STEPS:-150}
algos=${ALGOS:-magnitude sparsegpt-mask sparsegpt}
precisions=${PRECISIONS:-none fp8}
mkdir -p "$work"
sft=${SFT:-$work/sft}
[ -f "$sft/sft-train.jsonl" ] || bash tools/make_bible_sft.sh "$sft"
awk -v k="${VAL_STRIDE:-2}" 'NR % k == 1 || k == 1' "$sft/sft-val.jsonl" > "$work/val.jsonl"

data=(--data "$sft/sft-train.jsonl" --val "$work/val.jsonl" --batch "${BATCH:-8}" --seq-len 256)
calib=(--calib "$sft/sft-train.jsonl" --calib-size "${CALIB_SIZE:-64}")

# run NAME ARGS...: one mopt command under /usr/bin/time, kept when it finished before (REUSE=1).
run() {
  local name=$1
  shift
  if [ "${REUSE:-0}" = 1 ] && grep -q '^wrote ' "$work/$name.out" 2>/dev/null; then return; fi
  rm -rf "$work/$name"
  if ! /usr/bin/time -f 'wall %e rss %M' -o "$work/$name.time" "$mopt" "$@" > "$work/$name.out" 2> "$work/$name.err"; then
    echo "FAILED: $name"; tail -3 "$work/$name.err"; return 1
  fi
  echo "$name: $(tail -n 1 "$work/$name.time")"
}

# 1. The 16-bit fine-tune (the dense row and everything's starting point) and its control.
base="$model"
if [ "$ft_steps" -gt 0 ]; then
  run ft train "$model" "${data[@]}" --seed 1 --steps "$ft_steps" --lr 5e-4 --warmup 20 --schedule cosine --out "$work/ft"
  base="$work/ft"
fi
if [ "$sparse_steps" -gt 0 ]; then
  run ft-more train "$base" "${data[@]}" --seed 2 --steps "$sparse_steps" --lr 1e-4 --warmup 10 --out "$work/ft-more"
fi
# 2. Pruned (and FP8-quantized), no fine-tuning; dense FP8 for the FP8 rows' reference.
for p in $precisions; do
  [ "$p" = none ] || run "ptq-$p" quantize "$base" --format "$p" "${calib[@]}" --seq-len 256 --out "$work/ptq-$p"
  for a in $algos; do
    run "prune-$p-$a" quantize "$base" --format "$p" --sparsity 2:4 --sparse-algo "$a" "${calib[@]}" --seq-len 256 --out "$work/prune-$p-$a"
  done
done
# 3. Sparse fine-tuning from each: masks kept (with FP8: fake-quantized too), as long as the control.
if [ "$sparse_steps" -gt 0 ]; then
  for p in $precisions; do
    for a in $algos; do
      qat=()
      [ "$p" = none ] || qat=(--qat "$p")
      run "sft-$p-$a" train "$base" "${qat[@]}" --sparsity 2:4 --sparse-algo "$a" "${calib[@]}" --calib-seq-len 256 "${data[@]}" --seed 2 \
        --steps "$sparse_steps" --lr 1e-4 --warmup 10 --out "$work/sft-$p-$a"
    done
  done
fi

# 4. Paired differences on the same validation tokens (each checkpoint as written, f32 products).
paired="$work/paired.tsv"
printf 'model\tloss\tstderr\tbase\tbase_loss\tdifference\tdifference_stderr\n' > "$paired"
pair() {
  "$mopt" eval loss "$1" --base "$2" --data "$work/val.jsonl" --seq-len 256 --products f32 --json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin); print('\t'.join(str(x) for x in ['$(basename "$1")', round(j['loss'],4), round(j['stderr'],4), '$(basename "$2")', round(j['base_loss'],4), round(j['difference'],4), round(j['difference_stderr'],4)]))" |
    tee -a "$paired"
}
[ "$sparse_steps" -gt 0 ] && pair "$work/ft-more" "$base"
for p in $precisions; do
  [ "$p" = none ] || pair "$work/ptq-$p" "$base"
  for a in $algos; do
    pair "$work/prune-$p-$a" "$base"
    if [ "$sparse_steps" -gt 0 ]; then
      pair "$work/sft-$p-$a" "$work/prune-$p-$a"  # what fine-tuning recovers
      pair "$work/sft-$p-$a" "$work/ft-more"      # against 16 bits trained as long
    fi
  done
done
