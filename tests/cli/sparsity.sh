#!/usr/bin/env bash
# 2:4 sparsity from the command line: pruning alone writes a plain checkpoint; pruned and quantized
# models in every export load, evaluate and read back 2:4 (`inspect --sparsity`); sparse fine-tuning
# keeps the masks, and at a learning rate too small to move an f32 weight writes byte for byte what
# quantize writes with the same sparsity (alone and with QAT).
# Usage: sparsity.sh MOPT MODEL TEXT WORKDIR
set -euo pipefail
mopt=$1 model=$2 text=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
awk 'NR % 2 == 1 { p = $0 } NR % 2 == 0 && NR <= 80 { gsub(/"/, "", p); gsub(/"/, ""); printf "{\"prompt\": \"%s\\n\", \"response\": \"%s\"}\n", p, $0 }' "$text" > "$work/sft.jsonl"
quantize_calib=(--calib "$text" --calib-size 8 --seq-len 64)
calib=(--calib "$text" --calib-size 8 --calib-seq-len 64)
train=(--data "$work/sft.jsonl" --val "$work/sft.jsonl" --batch 2 --seq-len 64)
all_sparse() {  # all_sparse DIR: every decoder Linear of DIR reads back 2:4
  "$mopt" inspect "$1" --sparsity > "$work/inspect.out" 2>&1 || { cat "$work/inspect.out"; exit 1; }
  grep -q "2:4 in 42 of 42 decoder Linears" "$work/inspect.out" || { echo "FAIL: $1 is not 2:4 throughout"; cat "$work/inspect.out"; exit 1; }
}
evaluates() {
  "$mopt" eval ppl "$1" --text "$text" --ctx 64 > "$work/ppl.out" 2>&1 || { cat "$work/ppl.out"; exit 1; }
}

# Pruning alone (magnitude needs no calibration): a plain checkpoint, no quantization config.
"$mopt" quantize "$model" --format none --sparsity 2:4 --out "$work/magnitude" > "$work/magnitude.out" 2>&1 || { cat "$work/magnitude.out"; exit 1; }
[ ! -f "$work/magnitude/hf_quant_config.json" ] || { echo "FAIL: pruning alone wrote a quantization config"; exit 1; }
grep -q "pruned 42 linears to 2:4 (magnitude)" "$work/magnitude.out" || { echo "FAIL: no pruning report"; cat "$work/magnitude.out"; exit 1; }
all_sparse "$work/magnitude"
evaluates "$work/magnitude"
"$mopt" inspect "$model" --sparsity | grep -q "2:4 in 0 of 42" || { echo "FAIL: the dense model reads as sparse"; exit 1; }

# Pruned and quantized, every export.
for export in modelopt compressed-tensors gguf; do
  out="$work/fp8-$export"
  [ "$export" = gguf ] && out="$work/fp8.gguf"
  "$mopt" quantize "$model" --format fp8 --sparsity 2:4 --sparse-algo sparsegpt "${quantize_calib[@]}" --export "$export" --out "$out" \
    > "$work/fp8-$export.out" 2>&1 || { cat "$work/fp8-$export.out"; exit 1; }
  all_sparse "$out"
  evaluates "$out"
done
grep -q '"sparse-24-bitmask"' "$work/fp8-compressed-tensors/config.json" || { echo "FAIL: no sparse-24-bitmask config"; exit 1; }
echo "pruned fp8: modelopt, compressed-tensors and gguf exports load and are 2:4"

# Sparse fine-tuning at lr 1e-30 is quantize with the same sparsity, byte for byte; a real run trains.
"$mopt" quantize "$model" --format none --sparsity 2:4 --sparse-algo sparsegpt-mask "${quantize_calib[@]}" --out "$work/mask" > /dev/null 2>&1
"$mopt" train "$model" --sparsity 2:4 --sparse-algo sparsegpt-mask "${calib[@]}" "${train[@]}" --steps 1 --lr 1e-30 --out "$work/sft-still" \
  > "$work/sft-still.out" 2>&1 || { cat "$work/sft-still.out"; exit 1; }
for f in model.safetensors config.json; do
  cmp "$work/mask/$f" "$work/sft-still/$f" || { echo "FAIL: sparse training at lr 1e-30 wrote another $f than quantize"; exit 1; }
done
"$mopt" quantize "$model" --format int4_rtn --group-size 64 --sparsity 2:4 --sparse-algo sparsegpt "${quantize_calib[@]}" --out "$work/int4" > /dev/null 2>&1
"$mopt" train "$model" --qat int4_rtn --group-size 64 --sparsity 2:4 --sparse-algo sparsegpt "${calib[@]}" "${train[@]}" --steps 1 --lr 1e-30 \
  --out "$work/qat-still" > "$work/qat-still.out" 2>&1 || { cat "$work/qat-still.out"; exit 1; }
for f in model.safetensors hf_quant_config.json config.json; do
  cmp "$work/int4/$f" "$work/qat-still/$f" || { echo "FAIL: sparse QAT at lr 1e-30 wrote another $f than quantize"; exit 1; }
done
echo "sparse training at lr 1e-30 writes quantize's output, alone and with QAT"
"$mopt" train "$model" --sparsity 2:4 --sparse-algo magnitude "${train[@]}" --steps 6 --lr 1e-3 --out "$work/sft" > "$work/sft.out" 2>&1 \
  || { cat "$work/sft.out"; exit 1; }
grep -q "validation loss before training (the pruned model)" "$work/sft.out" || { echo "FAIL: no pruned validation loss"; cat "$work/sft.out"; exit 1; }
cmp -s "$work/sft/model.safetensors" "$work/magnitude/model.safetensors" && { echo "FAIL: training changed nothing"; exit 1; }
all_sparse "$work/sft"
"$mopt" train "$model" --qat nvfp4 --sparsity 2:4 --distill "${calib[@]}" "${train[@]}" --steps 3 --lr 1e-3 --export compressed-tensors \
  --out "$work/sqad" > "$work/sqad.out" 2>&1 || { cat "$work/sqad.out"; exit 1; }
all_sparse "$work/sqad"
evaluates "$work/sqad"
echo "sparse fine-tuning keeps the masks (alone; NVFP4 QAD to compressed-tensors)"
