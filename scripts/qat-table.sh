#!/usr/bin/env bash
# The QAT/QAD table of docs/ACCURACY.md: a model fine-tuned on the Bible set (KJV verse -> WEB verse,
# tools/make_bible_sft.sh), then for each format its PTQ, QAT and QAD, scored by the validation loss on
# the response tokens of held-out books (with its standard error over tokens); and Q4_0 GGUF files from
# PTQ and from QAT, scored by mopt's perplexity on the held-out WEB text. Wall time and peak RSS of each
# run are recorded.
#
# Usage (repository root): bash scripts/qat-table.sh [WORKDIR]
#   MODEL=models/tiny-kjv  FT_STEPS=300  QAT_STEPS=150  FORMATS="int4_awq nvfp4 fp8 w4a8_awq"  BATCH=16
#   VAL_STRIDE=2 (every 2nd held-out pair)  GGUF=1 (the Q4_0 rows)  POST_SEED=2 (the data order after the
#   fine-tune: another seed than the fine-tune's 1, so that the runs from it do not re-read its first batches)
# Writes WORKDIR/results.tsv (one row per run) and each run's output beside it. Needs the Debian Bible
# packages tools/extract_bible.sh names and build/mopt (MOPT=... for another).
set -euo pipefail
work=${1:-${TMPDIR:-/tmp}/mopt-qat-table}
mopt=${MOPT:-build/mopt}
model=${MODEL:-models/tiny-kjv}
ft_steps=${FT_STEPS:-300}
qat_steps=${QAT_STEPS:-150}
formats=${FORMATS:-int4_awq nvfp4 fp8 w4a8_awq}
group=${GROUP:-64}  # tiny-kjv's MLP width (704) is not a multiple of 128
mkdir -p "$work"
[ -f "$work/sft/sft-train.jsonl" ] || bash tools/make_bible_sft.sh "$work/sft"
# Every VAL_STRIDE-th held-out pair (801 of 1602 by default): the validation set.
awk -v k="${VAL_STRIDE:-2}" 'NR % k == 1 || k == 1' "$work/sft/sft-val.jsonl" > "$work/val.jsonl"
results="$work/results.tsv"
printf 'run\tval_loss\tstderr\tptq_val_loss\tptq_stderr\twall_s\tpeak_rss_mib\n' > "$results"

data=(--data "$work/sft/sft-train.jsonl" --val "$work/val.jsonl" --batch "${BATCH:-16}" --seq-len 256 --seed 1)
post=(--data "$work/sft/sft-train.jsonl" --val "$work/val.jsonl" --batch "${BATCH:-16}" --seq-len 256 --seed "${POST_SEED:-2}")
calib=(--calib "$work/sft/sft-train.jsonl" --calib-size 64 --calib-seq-len 256)

# record NAME: the row of a finished run.
record() {
  local name=$1 val ptq wall rss
  val=$(grep -o 'validation loss [0-9.]* ± [0-9.]*' "$work/$name.out" | tail -1 | awk '{print $3 "\t" $5}' || true)
  ptq=$(grep -o 'the PTQ model): [0-9.]* ± [0-9.]*' "$work/$name.out" | awk '{print $4 "\t" $6}' || true)
  [ -n "$ptq" ] || ptq=$(printf -- '-\t-')
  wall=$(awk '{print $2}' "$work/$name.time")
  rss=$(awk '{printf "%.0f", $4 / 1024}' "$work/$name.time")
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$val" "$ptq" "$wall" "$rss" | tee -a "$results"
}

# run NAME ARGS...: one mopt command under /usr/bin/time (kept when a finished one is there and
# REUSE=1), then its row.
run() {
  local name=$1
  shift
  if [ "${REUSE:-0}" = 1 ] && grep -q '^wrote ' "$work/$name.out" 2>/dev/null; then
    record "$name"
    return
  fi
  rm -rf "$work/$name"
  if ! /usr/bin/time -f 'wall %e rss %M' -o "$work/$name.time" "$mopt" "$@" > "$work/$name.out" 2> "$work/$name.err"; then
    echo "FAILED: $name"; tail -3 "$work/$name.err"; return 1
  fi
  record "$name"
}

# 1. The 16-bit fine-tune, every later run's starting point (its PTQ is QAT's step 0).
run ft train "$model" "${data[@]}" --steps "$ft_steps" --lr 5e-4 --warmup 20 --schedule cosine --out "$work/ft"
# The control: the fine-tune trained on in 16 bits for as many steps as QAT takes.
run ft-more train "$work/ft" "${post[@]}" --steps "$qat_steps" --lr 1e-4 --warmup 10 --out "$work/ft-more"
# 2. Per format: QAT and QAD from the fine-tuned model, the same steps and learning rate.
for f in $formats; do
  extra=()
  case $f in int4* | w4a8*) extra=(--group-size "$group") ;; esac
  run "qat-$f" train "$work/ft" --qat "$f" "${extra[@]}" "${calib[@]}" "${post[@]}" --steps "$qat_steps" --lr 1e-4 --warmup 10 \
    --out "$work/qat-$f"
  run "qad-$f" train "$work/ft" --qat "$f" "${extra[@]}" "${calib[@]}" "${post[@]}" --steps "$qat_steps" --lr 1e-4 --warmup 10 \
    --distill --out "$work/qad-$f"
done
# 3. Q4_0 GGUF: PTQ (round to nearest in blocks of 32) against QAT written code for code.
if [ "${GGUF:-1}" = 1 ]; then
  [ -f "$work/ptq-q4_0.gguf" ] || "$mopt" quantize "$work/ft" --format int4_rtn --group-size 32 --export gguf --out "$work/ptq-q4_0.gguf" \
    > "$work/ptq-q4_0.out" 2>&1
  run qat-q4_0 train "$work/ft" --qat int4_rtn --group-size 32 "${post[@]}" --steps "$qat_steps" --lr 1e-4 --warmup 10 --export gguf \
    --out "$work/qat-q4_0.gguf"
fi

# 4. Paired differences on the same validation tokens, each checkpoint as written (real kernels, f32
# products): QAT against PTQ (quantize of the fine-tune with QAT's calibration), QAD against QAT, the
# 16-bit control against the fine-tune.
paired="$work/paired.tsv"
printf 'model\tloss\tstderr\tbase\tbase_loss\tdifference\tdifference_stderr\n' > "$paired"
pair() {
  "$mopt" eval loss "$1" --base "$2" --data "$work/val.jsonl" --seq-len 256 --products f32 --json 2>/dev/null |
    python3 -c "import json,sys; j=json.load(sys.stdin); print('\t'.join(str(x) for x in ['$(basename "$1")', round(j['loss'],4), round(j['stderr'],4), '$(basename "$2")', round(j['base_loss'],4), round(j['difference'],4), round(j['difference_stderr'],4)]))" |
    tee -a "$paired"
}
pair "$work/ft-more" "$work/ft"
for f in $formats; do
  extra=()
  case $f in int4* | w4a8*) extra=(--group-size "$group") ;; esac
  [ -d "$work/ptq-$f" ] || "$mopt" quantize "$work/ft" --format "$f" "${extra[@]}" --calib "$work/sft/sft-train.jsonl" --calib-size 64 \
    --seq-len 256 --out "$work/ptq-$f" > "$work/ptq-$f.out" 2>&1
  pair "$work/ptq-$f" "$work/ft"
  pair "$work/qat-$f" "$work/ptq-$f"
  pair "$work/qad-$f" "$work/qat-$f"
  pair "$work/qat-$f" "$work/ft-more"  # QAT against 16 bits trained as long
  pair "$work/qad-$f" "$work/ft"       # QAD against its teacher
done
if [ "${GGUF:-1}" = 1 ]; then
  pair "$work/ptq-q4_0.gguf" "$work/ft"
  pair "$work/qat-q4_0.gguf" "$work/ptq-q4_0.gguf"
  pair "$work/qat-q4_0.gguf" "$work/ft-more"
fi
