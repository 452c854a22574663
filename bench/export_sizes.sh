#!/usr/bin/env bash
# Every export format of one model side by side: size on disk, saving against the 16-bit
# checkpoint, perplexity, and for exports made from a quantized checkpoint the perplexity of
# that checkpoint (the fake-quantized model) beside it.
#
#   bash bench/export_sizes.sh [MODEL] [TEXT] [CTX] [CALIB_SIZE] [SEQ_LEN]
#   defaults: models/tiny-kjv data/kjv-heldout.txt 256 64 256; GROUP (INT4 group, default 64)
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/tiny-kjv} text=${2:-data/kjv-heldout.txt} ctx=${3:-256} calib_size=${4:-64} seq_len=${5:-256}
group=${GROUP:-64}
mopt=build/mopt
[ -x "$mopt" ] || { echo "build first (cmake --build build)"; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/mopt-export-sizes.XXXXXX")
trap 'rm -rf "$work"' EXIT
calib=(--calib data/kjv-calib.txt --calib-size "$calib_size" --seq-len "$seq_len")
size() { du -sb "$1" | cut -f1; }
ppl() { "$mopt" eval ppl "$1" --text "$text" --ctx "$ctx" 2>/dev/null | sed -n 's/^perplexity \([0-9.]*\).*/\1/p'; }
base_bytes=$(find "$model" -maxdepth 1 -name 'model*.safetensors' -printf '%s\n' | awk '{s+=$1} END {print s}')
base_ppl=$(ppl "$model")
rows=()
row() {  # name path [fake-quant dir]
  local b p f="-"
  b=$(size "$2"); p=$(ppl "$2")
  [ -n "${3:-}" ] && f=$(ppl "$3")
  rows+=("$(awk -v n="$1" -v b="$b" -v base="$base_bytes" -v p="$p" -v f="$f" 'BEGIN {printf "| %-38s | %8.1f | %5.2fx | %9s | %9s |", n, b / 1048576, base / b, p, f}')")
  echo "${rows[-1]}"
}
q() { "$mopt" quantize "$model" "$@" >/dev/null 2>"$work/err" || { cat "$work/err"; exit 1; }; }

echo "model $model: $(awk -v b="$base_bytes" 'BEGIN {printf "%.1f", b / 1048576}') MiB of weights, ppl $base_ppl (ctx $ctx)"
echo "| export | MiB | saving | ppl | fake-quant ppl |"
echo "|---|---|---|---|---|"
"$mopt" export "$model" --to gguf "$work/bf16.gguf" >/dev/null 2>&1; row "GGUF bf16" "$work/bf16.gguf"
"$mopt" export "$model" --to gguf "$work/q8_0.gguf" --type q8_0 >/dev/null 2>&1; row "GGUF Q8_0" "$work/q8_0.gguf"
"$mopt" export "$model" --to gguf "$work/q4_k_m.gguf" --type q4_k_m >/dev/null 2>&1; row "GGUF Q4_K_M" "$work/q4_k_m.gguf"
"$mopt" export "$model" --to gguf "$work/q4_0.gguf" --type q4_0 >/dev/null 2>&1; row "GGUF Q4_0 (round-to-nearest)" "$work/q4_0.gguf"
q --format fp8 "${calib[@]}" --out "$work/fp8"; row "modelopt FP8" "$work/fp8"
q --format fp8 "${calib[@]}" --export compressed-tensors --out "$work/fp8-ct"; row "compressed-tensors FP8" "$work/fp8-ct"
q --format nvfp4 "${calib[@]}" --out "$work/nvfp4"; row "modelopt NVFP4" "$work/nvfp4"
"$mopt" export "$work/nvfp4" --to gguf "$work/nvfp4.gguf" --type nvfp4 >/dev/null 2>&1
row "  -> GGUF NVFP4 (weights only)" "$work/nvfp4.gguf" "$work/nvfp4"
q --format int8_sq "${calib[@]}" --out "$work/sq"; row "modelopt INT8 SmoothQuant" "$work/sq"
q --format int8_sq "${calib[@]}" --export compressed-tensors --out "$work/sq-ct"; row "compressed-tensors INT8 SmoothQuant" "$work/sq-ct"
q --format int4_awq --group-size "$group" "${calib[@]}" --out "$work/awq"; row "modelopt INT4 AWQ g$group" "$work/awq"
"$mopt" export "$work/awq" --to compressed-tensors "$work/awq-to-ct" >/dev/null 2>&1
row "  -> compressed-tensors (re-quantized)" "$work/awq-to-ct" "$work/awq"
"$mopt" export "$work/awq" --to gguf "$work/awq-q4_0.gguf" --type q4_0 >/dev/null 2>&1
row "  -> GGUF Q4_0" "$work/awq-q4_0.gguf" "$work/awq"
# Quantized for a target without pre_quant_scale: the staged modelopt export is the fake-quant model.
q --format int4_awq --group-size "$group" "${calib[@]}" --export compressed-tensors --out "$work/awq-ct"
row "compressed-tensors INT4 AWQ g$group" "$work/awq-ct"
q --format int4_awq --group-size "$group" "${calib[@]}" --export gguf --out "$work/awq.gguf"
row "GGUF Q4_0 from INT4 AWQ g$group" "$work/awq.gguf"
