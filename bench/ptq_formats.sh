#!/usr/bin/env bash
# What each PTQ format costs and saves on one model, measured side by side in
# one run: perplexity and KL divergence against the 16-bit model on held-out
# text, weight bytes, quantization wall time and peak RSS.
#
#   bash bench/ptq_formats.sh [MODEL] [TEXT] [CTX] [CALIB_SIZE] [SEQ_LEN] [FORMATS...]
#   defaults: models/tiny-kjv data/kjv-heldout.txt 256 64 256, every format mopt runs with 'max'
#   a format spec may name an algorithm: "int4_awq --group-size 64 --algo gptq" (else --algo max)
#   GROUP=64 for models whose Linear inputs are not multiples of 128 (tiny-kjv)
# Needs the Release build (scripts/setup.sh). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/tiny-kjv}
TEXT=${2:-data/kjv-heldout.txt}
CTX=${3:-256}
CALIB_SIZE=${4:-64}
SEQ_LEN=${5:-256}
shift $(( $# < 5 ? $# : 5 ))
FORMATS=("$@")
GROUP=${GROUP:-128}  # INT4 group size; tiny-kjv needs 64 (its 704-wide down_proj input)
[[ ${#FORMATS[@]} -gt 0 ]] || FORMATS=(fp8 fp8_pc_pt fp8_block int8 int8_wo "int4_rtn --group-size $GROUP" "w4a8_awq --group-size $GROUP"
                                       nvfp4 mxfp8 mxfp4 "nvfp4 --kv-cache fp8")
MOPT=build/mopt
[[ -x $MOPT ]] || { echo "build first: bash scripts/setup.sh"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mopt-ptq-formats.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

field() { grep -o "\"$2\": [-0-9.e+]*" "$1" | head -1 | sed 's/.*: //'; }
# The report's own "seconds" comes after the per-layer ones (keys are sorted).
total_seconds() { grep -o '"seconds": [-0-9.e+]*' "$1" | tail -1 | sed 's/.*: //'; }
base_bytes=$(du -b --apparent-size "$MODEL"/*.safetensors | awk '{s += $1} END {print s}')
echo "model $MODEL, text $TEXT (ctx $CTX), calibration $CALIB_SIZE x $SEQ_LEN tokens of data/kjv-calib.txt"
echo
echo "| format | ppl | Δppl | mean KLD | top-1 agree | weights MiB | vs 16-bit | quantize s | quantize peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
first=1
for spec in "${FORMATS[@]}"; do
  read -r -a args <<< "$spec"
  out="$WORK/q"
  rm -rf "$out"
  algo=(--algo max)  # round-to-nearest unless the spec names an algorithm
  [[ " ${args[*]} " == *" --algo "* ]] && algo=()
  $MOPT quantize "$MODEL" --format "${args[@]}" "${algo[@]}" --calib data/kjv-calib.txt --calib-size "$CALIB_SIZE" --seq-len "$SEQ_LEN" \
    --out "$out" --report "$WORK/report.json" >/dev/null 2>"$WORK/err" || { echo "| ${spec} | failed: $(tail -1 "$WORK/err") |"; continue; }
  $MOPT eval kld "$out" --base "$MODEL" --text "$TEXT" --ctx "$CTX" --json > "$WORK/kld.json" 2>/dev/null
  if [[ $first == 1 ]]; then
    base_ppl=$(grep -A3 '"base_ppl"' "$WORK/kld.json" | grep -o '"perplexity": [0-9.e+]*' | sed 's/.*: //')
    printf '| bf16 (the model) | %.3f | | | | %.1f | 1.00x | | |\n' "$base_ppl" "$(echo "$base_bytes / 1048576" | bc -l)"
    first=0
  fi
  ppl=$(grep -A3 '"model_ppl"' "$WORK/kld.json" | grep -o '"perplexity": [0-9.e+]*' | sed 's/.*: //')
  bytes=$(du -b --apparent-size "$out"/*.safetensors | awk '{s += $1} END {print s}')
  printf '| %s | %.3f | %+.3f | %.5f | %.2f%% | %.1f | %.2fx | %.1f | %.0f |\n' "$spec" "$ppl" "$(field "$WORK/kld.json" delta_ppl)" \
    "$(field "$WORK/kld.json" mean_kld)" "$(echo "$(field "$WORK/kld.json" top1_agreement) * 100" | bc -l)" \
    "$(echo "$bytes / 1048576" | bc -l)" "$(echo "$base_bytes / $bytes" | bc -l)" "$(total_seconds "$WORK/report.json")" \
    "$(echo "$(field "$WORK/report.json" peak_rss_bytes) / 1048576" | bc -l)"
done
