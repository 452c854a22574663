#!/usr/bin/env bash
# `mopt train --qat`: with a learning rate too small to move an f32 weight, the written checkpoint is
# byte for byte what `mopt quantize` writes for the format (the frozen scales, the codes of the same
# weights); a real run (with distillation, clip STE, the KV cache, and each export) writes a model
# that loads and evaluates, its log starting with the PTQ model's validation loss.
# Usage: train_qat.sh MOPT MODEL TEXT WORKDIR
set -euo pipefail
mopt=$1 model=$2 text=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
# A small supervised set: the first verse of each line pair as prompt, the next as response.
awk 'NR % 2 == 1 { p = $0 } NR % 2 == 0 && NR <= 80 { gsub(/"/, "", p); gsub(/"/, ""); printf "{\"prompt\": \"%s\\n\", \"response\": \"%s\"}\n", p, $0 }' "$text" > "$work/sft.jsonl"
[ "$(wc -l < "$work/sft.jsonl")" -eq 40 ] || { echo "FAIL: the data set was not made"; exit 1; }
calib=(--calib "$text" --calib-size 8 --calib-seq-len 64)
quantize_calib=(--calib "$text" --calib-size 8 --seq-len 64)
train=(--data "$work/sft.jsonl" --val "$work/sft.jsonl" --batch 2 --seq-len 64)

for format in int4_awq nvfp4 int8_sq; do
  extra=()
  [ "$format" = int4_awq ] && extra=(--group-size 64)
  "$mopt" quantize "$model" --format "$format" "${extra[@]}" "${quantize_calib[@]}" --out "$work/ptq-$format" > "$work/ptq-$format.out" 2>&1 \
    || { cat "$work/ptq-$format.out"; exit 1; }
  "$mopt" train "$model" --qat "$format" "${extra[@]}" "${calib[@]}" "${train[@]}" --steps 1 --lr 1e-30 --out "$work/qat-$format" \
    > "$work/qat-$format.out" 2>&1 || { cat "$work/qat-$format.out"; exit 1; }
  for f in model.safetensors hf_quant_config.json config.json; do
    cmp "$work/ptq-$format/$f" "$work/qat-$format/$f" || { echo "FAIL: $format: QAT at lr 1e-30 wrote another $f than quantize"; exit 1; }
  done
  echo "$format: QAT output at lr 1e-30 is quantize's, byte for byte"
done

# A quantized checkpoint as the model: one clear refusal from quantize and from train, nothing written.
for cmd in quantize train; do
  if [ $cmd = quantize ]; then args=(--format fp8 "${quantize_calib[@]}"); else args=(--qat fp8 "${calib[@]}" "${train[@]}" --steps 1); fi
  if "$mopt" $cmd "$work/ptq-nvfp4" "${args[@]}" --out "$work/requantized" > "$work/requantized.out" 2>&1; then
    echo "FAIL: $cmd accepted a quantized checkpoint"; exit 1
  fi
  grep -q "already quantized" "$work/requantized.out" || { echo "FAIL: $cmd: no clear refusal"; cat "$work/requantized.out"; exit 1; }
  [ ! -e "$work/requantized" ] || { echo "FAIL: $cmd left $work/requantized"; exit 1; }
done

# Real runs: QAT, QAD with the clip STE and an FP8 KV cache, and the other exports.
"$mopt" train "$model" --qat int4_awq --group-size 64 "${calib[@]}" "${train[@]}" --steps 6 --lr 1e-4 --out "$work/qat" > "$work/qat.out" 2>&1 \
  || { cat "$work/qat.out"; exit 1; }
grep -q "validation loss before training (the PTQ model)" "$work/qat.out" || { echo "FAIL: no PTQ validation loss"; cat "$work/qat.out"; exit 1; }
head -1 "$work/qat/train_log.jsonl" | grep -q '"step":0' || { echo "FAIL: the log does not start with step 0"; exit 1; }
cmp -s "$work/qat/model.safetensors" "$work/ptq-int4_awq/model.safetensors" && { echo "FAIL: training changed nothing"; exit 1; }
"$mopt" eval ppl "$work/qat" --text "$text" --ctx 64 > "$work/qat-ppl.out" 2>&1 || { cat "$work/qat-ppl.out"; exit 1; }

"$mopt" train "$model" --qat fp8 --kv-cache fp8 --ste clip --distill --kd-temperature 2 --kd-weight 0.5 "${calib[@]}" "${train[@]}" --steps 4 --lr 1e-4 \
  --export compressed-tensors --log "$work/qad.jsonl" --out "$work/qad-ct" > "$work/qad.out" 2>&1 || { cat "$work/qad.out"; exit 1; }
# The distillation objective is logged beside the cross-entropy it is not.
grep -q '"cross_entropy"' "$work/qad.jsonl" || { echo "FAIL: the QAD log has no cross-entropy"; cat "$work/qad.jsonl"; exit 1; }
[ -f "$work/qad-ct/config.json" ] && grep -q compressed-tensors "$work/qad-ct/config.json" || { echo "FAIL: no compressed-tensors checkpoint"; exit 1; }
"$mopt" eval ppl "$work/qad-ct" --text "$text" --ctx 64 > "$work/qad-ppl.out" 2>&1 || { cat "$work/qad-ppl.out"; exit 1; }

"$mopt" train "$model" --qat int4_rtn --group-size 32 --distill "${train[@]}" --steps 3 --lr 1e-4 --export gguf --out "$work/qat.gguf" \
  > "$work/gguf.out" 2>&1 || { cat "$work/gguf.out"; exit 1; }
grep -q "written code for code" "$work/gguf.out" || { echo "FAIL: the GGUF export did not keep the codes"; cat "$work/gguf.out"; exit 1; }
"$mopt" eval ppl "$work/qat.gguf" --text "$text" --ctx 64 > "$work/gguf-ppl.out" 2>&1 || { cat "$work/gguf-ppl.out"; exit 1; }
# The trained model's validation loss, measured by eval loss on the written checkpoint (real INT4
# kernels, f32 products), is the one training reported; against itself the difference is zero.
"$mopt" eval loss "$work/qat" --data "$work/sft.jsonl" --seq-len 64 --products f32 --base "$work/qat" > "$work/loss.out" 2>&1 \
  || { cat "$work/loss.out"; exit 1; }
trained=$(grep -o 'validation loss [0-9.]*' "$work/qat.out" | tail -1 | awk '{print $3}')
measured=$(grep -o '^loss [0-9.]*' "$work/loss.out" | awk '{print $2}')
awk -v a="$trained" -v b="$measured" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 0.002) }' \
  || { echo "FAIL: eval loss $measured is not the trained validation loss $trained"; exit 1; }
grep -q 'difference +0.0000 ± 0.0000' "$work/loss.out" || { echo "FAIL: a model against itself"; cat "$work/loss.out"; exit 1; }
"$mopt" eval loss "$work/qat.gguf" --data "$work/sft.jsonl" --seq-len 64 > "$work/gguf-loss.out" 2>&1 || { cat "$work/gguf-loss.out"; exit 1; }
# Learned scales (LSQ) on INT4 blocks: the amax moves, the export holds the learned scales.
"$mopt" train "$model" --qat int4_rtn --group-size 32 --learn-scales --scale-lr 1e-3 "${train[@]}" --steps 3 --lr 1e-4 --out "$work/lsq" \
  > "$work/lsq.out" 2>&1 || { cat "$work/lsq.out"; exit 1; }
"$mopt" quantize "$model" --format int4_rtn --group-size 32 --out "$work/ptq-int4_rtn" > /dev/null 2>&1
cmp -s "$work/lsq/model.safetensors" "$work/ptq-int4_rtn/model.safetensors" && { echo "FAIL: LSQ changed nothing"; exit 1; }
"$mopt" eval loss "$work/lsq" --data "$work/sft.jsonl" --seq-len 64 > "$work/lsq-loss.out" 2>&1 || { cat "$work/lsq-loss.out"; exit 1; }
# Learned NVFP4 block scales (from the MSE sweep, then trained): the export loads and evaluates.
"$mopt" train "$model" --qat nvfp4 --learn-scales --scale-lr 1e-3 "${calib[@]}" "${train[@]}" --steps 3 --lr 1e-4 --out "$work/lsq-nvfp4" \
  > "$work/lsq-nvfp4.out" 2>&1 || { cat "$work/lsq-nvfp4.out"; exit 1; }
cmp -s "$work/lsq-nvfp4/model.safetensors" "$work/ptq-nvfp4/model.safetensors" && { echo "FAIL: NVFP4 LSQ wrote PTQ's weights"; exit 1; }
"$mopt" eval loss "$work/lsq-nvfp4" --data "$work/sft.jsonl" --seq-len 64 > "$work/lsq-nvfp4-loss.out" 2>&1 || { cat "$work/lsq-nvfp4-loss.out"; exit 1; }
# The QAT state resumes (its learned scales included) to the same output, and refuses other quantization settings.
lsq=(train "$model" --qat int4_rtn --group-size 32 --learn-scales "${train[@]}" --steps 4 --lr 1e-3 --save-every 2 --state "$work/lsq.state")
"$mopt" "${lsq[@]}" --out "$work/lsq-whole" > /dev/null 2>&1 || { echo "FAIL: the LSQ run with a state"; exit 1; }
"$mopt" "${lsq[@]}" --resume --out "$work/lsq-resumed" > "$work/resume.out" 2>&1 || { cat "$work/resume.out"; exit 1; }
grep -q "resuming" "$work/resume.out" || { echo "FAIL: did not resume"; exit 1; }
cmp "$work/lsq-whole/model.safetensors" "$work/lsq-resumed/model.safetensors" || { echo "FAIL: the resumed QAT output differs"; exit 1; }
if "$mopt" train "$model" --qat int4_rtn --group-size 64 --learn-scales "${train[@]}" --steps 4 --lr 1e-3 --save-every 2 \
     --state "$work/lsq.state" --resume --out "$work/never" > "$work/refused.out" 2>&1; then
  echo "FAIL: a state resumed under another group size"; exit 1
fi
grep -q "other settings" "$work/refused.out" || { cat "$work/refused.out"; exit 1; }
ls "$work" | grep -q "tmp-" && { echo "FAIL: a temporary directory was left"; ls "$work"; exit 1; }
echo "QAT, QAD, clip STE, KV cache and the three exports: written, loaded, evaluated"
