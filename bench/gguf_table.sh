#!/usr/bin/env bash
# GGUF files for llama.cpp against llama-quantize's own, in mopt's evaluation: llama-quantize's mix of
# TYPE (q4_0 by default, q4_k_m, q8_0, ...; mopt's `export --type TYPE` is byte for byte its file), and
# `mopt quantize --export gguf --gguf-type TYPE` (the weights in each tensor's blocks of the mix, weighted
# by the calibration text's mean squares) with round-to-nearest, AWQ, GPTQ and AWQ+GPTQ. Each file's
# perplexity, mean KLD and top-1 agreement against the 16-bit model on TEXT, and its size.
#   [TYPE=q4_k_m] bash bench/gguf_table.sh MODEL TEXT CALIB OUT_DIR [CTX]      (e.g. models/smollm2-135m data/web-heldout.txt data/kjv-calib.txt /tmp/q40)
set -euo pipefail
cd "$(dirname "$0")/.."
MOPT=${MOPT:-build/mopt}
[[ $# -ge 4 ]] || { sed -n 2,7p "$0"; exit 2; }
type=${TYPE:-q4_0}
model=$1 text=$2 calib=$3 out=$4 ctx=${5:-512}
mkdir -p "$out"
calib_opts=(--calib "$calib" --calib-size "${CALIB_SIZE:-32}" --seq-len "${SEQ_LEN:-256}")
rm -f "$out/llama-$type.gguf"
"$MOPT" export "$model" --to gguf "$out/llama-$type.gguf" --type "$type" >/dev/null
files=("$out/llama-$type.gguf")
for algo in max awq_lite gptq awq_lite+gptq; do
  f="$out/mopt-$type-${algo/+/-}.gguf"
  rm -f "$f"
  "$MOPT" quantize "$model" --format int4_awq --algo "$algo" "${calib_opts[@]}" --export gguf --gguf-type "$type" --out "$f" >/dev/null 2>&1
  files+=("$f")
done
printf '%-28s %12s %10s %10s %8s\n' file bytes ppl "mean KLD" top-1
for f in "${files[@]}"; do
  r=$("$MOPT" eval kld "$f" --base "$model" --text "$text" --ctx "$ctx" 2>/dev/null)
  printf '%-28s %12s %10s %10s %8s\n' "$(basename "$f")" "$(stat -c %s "$f")" "$(awk '/^ppl\(model\)/ { print $2 }' <<< "$r")" \
    "$(awk '/^mean KLD/ { print $3 }' <<< "$r")" "$(awk '/^top-1 agree/ { print $3 }' <<< "$r")"
done
