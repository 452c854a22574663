#!/usr/bin/env bash
# `mopt train` killed with kill -9 and resumed from its training state ends with exactly the weights
# (and the log's losses) of an uninterrupted run; the killed run leaves no output directory; the
# trained model loads and evaluates. Usage: train_resume.sh MOPT MODEL TEXT WORKDIR
set -euo pipefail
mopt=$1 model=$2 text=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
args=(train "$model" --data "$text" --steps 10 --batch 2 --seq-len 48 --lr 3e-4 --warmup 2 --weight-decay 0.1
      --save-every 1 --dtype f32)
"$mopt" "${args[@]}" --out "$work/whole" > "$work/whole.out" 2>&1 || { cat "$work/whole.out"; exit 1; }

"$mopt" "${args[@]}" --out "$work/resumed" --log "$work/live.jsonl" > "$work/killed.out" 2>&1 &
pid=$!
# Kill it once four steps are logged (the state is saved after every step).
for _ in $(seq 1 600); do
  [ -f "$work/live.jsonl" ] && [ "$(wc -l < "$work/live.jsonl")" -ge 4 ] && break
  sleep 0.02
done
kill -9 "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
if [ -e "$work/resumed" ]; then echo "FAIL: the run finished before it was killed; nothing was tested"; exit 1; fi
ls "$work"/resumed.tmp-* >/dev/null 2>&1 && { echo "FAIL: the killed run left a temporary directory"; exit 1; }
step=$(wc -l < "$work/live.jsonl")
echo "killed after $step logged steps"

"$mopt" "${args[@]}" --out "$work/resumed" --resume > "$work/resume.out" 2>&1 || { cat "$work/resume.out"; exit 1; }
grep -q "resuming .* at step" "$work/resume.out" || { echo "FAIL: did not resume"; cat "$work/resume.out"; exit 1; }
cmp "$work/whole/model.safetensors" "$work/resumed/model.safetensors" || { echo "FAIL: the resumed run's weights differ"; exit 1; }
strip() { sed -E 's/,?"tokens_per_s":[0-9.e+-]+//' "$1"; }
diff <(strip "$work/whole/train_log.jsonl") <(strip "$work/resumed/train_log.jsonl") || { echo "FAIL: the logs differ"; exit 1; }
[ "$(wc -l < "$work/whole/train_log.jsonl")" -eq 10 ] || { echo "FAIL: the log does not have 10 steps"; exit 1; }
grep -q "<svg" "$work/whole/loss_curve.svg" || { echo "FAIL: no loss curve"; exit 1; }
head -c 4000 "$text" > "$work/small.txt"
"$mopt" eval ppl "$work/whole" --text "$work/small.txt" --ctx 128 > "$work/ppl.out" 2>&1 || { cat "$work/ppl.out"; exit 1; }
# A state is resumed only by the run that saved it, and a damaged one is refused by name.
fails_with() {  # fails_with MESSAGE ARGS...: exit 1 and one line on stderr holding MESSAGE
  local message=$1
  shift
  set +e
  "$mopt" "$@" > /dev/null 2> "$work/err"
  local rc=$?
  set -e
  [ "$rc" -eq 1 ] && [ "$(wc -l < "$work/err")" -eq 1 ] && grep -qF "$message" "$work/err" ||
    { echo "FAIL: $* gave exit $rc and: $(cat "$work/err")"; exit 1; }
}
cp "$work/whole.train-state.safetensors" "$work/other.safetensors"
fails_with "saved by a run with other settings" train "$model" --data "$text" --steps 10 --batch 2 --seq-len 48 --lr 1e-3 \
  --state "$work/other.safetensors" --resume --out "$work/never"
head -c 1000 "$work/whole.train-state.safetensors" > "$work/cut.safetensors"
fails_with "cut.safetensors" "${args[@]}" --state "$work/cut.safetensors" --resume --out "$work/never"
fails_with "no training state to resume from" "${args[@]}" --state "$work/none.safetensors" --resume --out "$work/never"
# Mixed precision (--precision bf16): the run says so, its losses follow the f32 run's to bf16's rounding
# (within 1%, not the same bits), and the f32 run's state does not resume it.
"$mopt" "${args[@]}" --precision bf16 --out "$work/bf16" > "$work/bf16.out" 2>&1 || { cat "$work/bf16.out"; exit 1; }
grep -q "bf16 products" "$work/bf16.out" || { echo "FAIL: the bf16 run does not say so"; cat "$work/bf16.out"; exit 1; }
losses() { grep -o '"loss":[0-9.e+-]*' "$1" | cut -d: -f2; }
paste <(losses "$work/whole/train_log.jsonl") <(losses "$work/bf16/train_log.jsonl") |
  awk '{ d = ($2 - $1) / $1; if (d < 0) d = -d; if (d > 0.01) bad++; if ($1 != $2) differ++; n++ }
       END { if (n != 10 || bad || !differ) { print "FAIL: bf16 losses vs f32: " n " steps, " bad " beyond 1%, " differ " differing"; exit 1 } }'
fails_with "saved by a run with other settings" "${args[@]}" --precision bf16 --state "$work/whole.train-state.safetensors" --resume --out "$work/never"
[ ! -e "$work/never" ] || { echo "FAIL: a refused run wrote its output"; exit 1; }
echo "PASS: resumed at step $step, weights and log identical to the uninterrupted run"
