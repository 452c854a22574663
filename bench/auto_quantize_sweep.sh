#!/usr/bin/env bash
# Mixed precision against every uniform format, side by side in one run: for each budget, the
# --auto-bits choice scored by the gradient (the reference's default) and by KL divergence, and
# each uniform format, all evaluated by perplexity and KL divergence against the 16-bit model on
# held-out text. Prints a Markdown table and writes a TSV and an SVG plot (KLD against effective bits).
#
#   bash bench/auto_quantize_sweep.sh [MODEL] [TEXT] [CTX] [OUT_PREFIX]
#   defaults: models/tiny-kjv data/kjv-heldout.txt 256 /tmp/auto-quantize-sweep
#   BUDGETS="4.5 5 6 7 8"  CALIB_SIZE=16 SEQ_LEN=256 SCORE_SIZE=8  CHARS=20000 (of TEXT, from its start)
#   GROUP=64 (INT4 group size: SmolLM2's and tiny-kjv's widths are not all multiples of 128)
#   FORMATS="nvfp4 nvfp4_awq mxfp4 int4_awq fp8 int8_sq mxfp8" (uniform)  AUTO_FORMATS=nvfp4_awq,fp8 (candidates)
#   METHODS="gradient kl"
# Needs the Release build (scripts/setup.sh) and python3 (the plot; standard library only).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/tiny-kjv}
TEXT=${2:-data/kjv-heldout.txt}
CTX=${3:-256}
PREFIX=${4:-/tmp/auto-quantize-sweep}
BUDGETS=${BUDGETS:-4.5 5 6 7 8}
CALIB_SIZE=${CALIB_SIZE:-16}
SEQ_LEN=${SEQ_LEN:-256}
SCORE_SIZE=${SCORE_SIZE:-8}
CHARS=${CHARS:-20000}
GROUP=${GROUP:-64}
FORMATS=${FORMATS-nvfp4 nvfp4_awq mxfp4 int4_awq fp8 int8_sq mxfp8}  # FORMATS="" for none
AUTO_FORMATS=${AUTO_FORMATS:-nvfp4_awq,fp8}
METHODS=${METHODS:-gradient kl}
MOPT=build/mopt
[[ -x $MOPT ]] || { echo "build first: bash scripts/setup.sh"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mopt-auto-sweep.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
head -c "$CHARS" "$TEXT" > "$WORK/text.txt"
calib=(--calib data/kjv-calib.txt --calib-size "$CALIB_SIZE" --seq-len "$SEQ_LEN")
TSV="$PREFIX.tsv"
rm -f "$PREFIX-gradient.state.json" "$PREFIX-kl.state.json"  # scores from this run only
printf 'kind\tname\tbits\tppl\tmean_kld\tkld_se\tseconds\n' > "$TSV"

# The bits per weight of a uniform format, as the solver counts them (algo::effective_bits).
uniform_bits() {
  case $1 in
    nvfp4 | nvfp4_awq) echo 4.5 ;;
    mxfp4) echo 4.25 ;;
    int4_awq | int4_rtn | w4a8_awq) awk -v g="$GROUP" 'BEGIN { printf "%.6g", 4 + 16 / g }' ;;
    mxfp8) echo 8.25 ;;
    *) echo 8 ;;
  esac
}
evaluate() {  # evaluate KIND NAME BITS DIR SECONDS
  "$MOPT" eval kld "$4" --base "$MODEL" --text "$WORK/text.txt" --ctx "$CTX" --json > "$WORK/kld.json" 2> "$WORK/kld.err" || { cat "$WORK/kld.err"; exit 1; }
  python3 - "$WORK/kld.json" "$1" "$2" "$3" "$5" >> "$TSV" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
print("\t".join([sys.argv[2], sys.argv[3], sys.argv[4], "%.4f" % j["model_ppl"]["perplexity"], "%.6f" % j["mean_kld"], "%.6f" % j["kld_stderr"], sys.argv[5]]))
EOF
  echo "base ppl $(python3 -c "import json; print('%.4f' % json.load(open('$WORK/kld.json'))['base_ppl']['perplexity'])")" > "$WORK/base_ppl"
}
now() { date +%s.%N; }

for f in $FORMATS; do
  args=(--format "$f")
  [[ $f == int4* || $f == w4a8* ]] && args+=(--group-size "$GROUP")
  t0=$(now)
  "$MOPT" quantize "$MODEL" "${args[@]}" "${calib[@]}" --out "$WORK/u-$f" > "$WORK/q.out" 2>&1 || { cat "$WORK/q.out"; exit 1; }
  evaluate uniform "$f" "$(uniform_bits "$f")" "$WORK/u-$f" "$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
  rm -rf "$WORK/u-$f"
done
auto_args=(--auto-formats "$AUTO_FORMATS")
[[ $AUTO_FORMATS == *int4* || $AUTO_FORMATS == *w4a8* ]] && auto_args+=(--group-size "$GROUP")
for method in $METHODS; do
  for b in $BUDGETS; do
    t0=$(now)
    "$MOPT" quantize "$MODEL" --auto-bits "$b" "${auto_args[@]}" --auto-method "$method" --auto-score-size "$SCORE_SIZE" \
      --auto-state "$PREFIX-$method.state.json" "${calib[@]}" --out "$WORK/a" > "$WORK/a.out" 2>&1 || { cat "$WORK/a.out"; exit 1; }
    seconds=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    bits=$(sed -n 's/^mixed precision under .* bits: \([0-9.]*\) effective bits.*/\1/p' "$WORK/a.out")
    grep -q "scores: read from" "$WORK/a.out" || seconds="$seconds (scored)"
    evaluate "auto-$method" "auto $b" "$bits" "$WORK/a" "$seconds"
    rm -rf "$WORK/a"
  done
done

echo "model $MODEL, $CHARS characters of $TEXT (ctx $CTX), $(cat "$WORK/base_ppl"); calibration $CALIB_SIZE x $SEQ_LEN tokens of data/kjv-calib.txt, scores on the first $SCORE_SIZE; candidates $AUTO_FORMATS"
echo
echo "| kind | model | effective bits | ppl | mean KLD ± SE | wall s |"
echo "|---|---|---|---|---|---|"
tail -n +2 "$TSV" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s ± %s | %s |\n", $1, $2, $3, $4, $5, $6, $7 }'
python3 bench/plot_bits.py "$TSV" "$PREFIX.svg" "$(basename "$MODEL"): mean KLD against effective bits"
echo
echo "wrote $TSV and $PREFIX.svg"
