#!/usr/bin/env bash
# Do the quantized kernels compute what the format defines? One quantized
# export's perplexity with the kernels and with --fake-quant (dequantized
# weights, fake-quantized inputs: the definition), whole windows (prefill) and
# token by token through the KV cache (decode), on the same tokens, and each
# pair compared token by token:
#   mean dNLL  the mean per-token difference of negative log-likelihoods (b - a);
#              exp(mean dNLL) - 1 is the perplexity difference
#   SE         its standard error from the means of blocks of BLOCK tokens,
#              one window each by default (a difference in one token carries on
#              through the rest of its window, so single tokens are not
#              independent; windows are)
#   z          mean dNLL / SE: |z| < 2 is a gap that the per-token scatter of the
#              two runs explains; |z| > 3 is a systematic difference (a bug);
#              "-" where both runs agree to 1e-6
#
#   bash bench/kernels_vs_definition.sh EXPORT TEXT [CTX] [CHARS]
#   CHARS: evaluate the first CHARS characters of TEXT (default 5000; decode is slow)
#   BLOCK=CTX by default
#   PRODUCTS=f32 by default: the kernels' products as --products takes them (bf16 adds the
#   rounding of both operands to bf16, which the f32 definition does not have)
# Needs the Release build (scripts/setup.sh). Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 2 ]] || { echo "usage: bash bench/kernels_vs_definition.sh EXPORT TEXT [CTX] [CHARS]"; exit 2; }
MODEL=$1
TEXT=$2
CTX=${3:-512}
CHARS=${4:-5000}
BLOCK=${BLOCK:-$CTX}
PRODUCTS=${PRODUCTS:-f32}
MOPT=build/mopt
[[ -x $MOPT ]] || { echo "build first: bash scripts/setup.sh"; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mopt-kernels-vs-definition.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
head -c "$CHARS" "$TEXT" > "$WORK/text.txt"

run() {  # name, extra flags...
  local name=$1
  shift
  "$MOPT" eval ppl "$MODEL" --text "$WORK/text.txt" --ctx "$CTX" --token-nll "$WORK/$name.tsv" --products "$PRODUCTS" "$@" > "$WORK/$name.out"
}
run kernels_prefill
run definition_prefill --fake-quant
run kernels_decode --decode
run definition_decode --fake-quant --decode

# Prints one table row comparing run b against run a.
compare() {
  paste "$WORK/$1.tsv" "$WORK/$2.tsv" | awk -v label="$3" -v block="$BLOCK" '
    $1 != $3 { print "positions differ: " $1 " vs " $3 > "/dev/stderr"; exit 1 }
    { d = $4 - $2; n++; sa += $2; sb += $4; sd += d; bs += d; bn++
      if (bn == block) { m = bs / bn; blocks++; bsum += m; bsq += m * m; bs = 0; bn = 0 } }
    END {
      mean = sd / n
      if (blocks > 1) { bm = bsum / blocks; se = sqrt((bsq - blocks * bm * bm) / (blocks - 1) / blocks) } else { se = 0 }
      printf "| %s | %.4f | %.4f | %+.3f%% | %+.5f | %.5f | %s | %d |\n", label, exp(sa / n), exp(sb / n),
             100 * (exp(sb / n) / exp(sa / n) - 1), mean, se, (se > 1e-6 ? sprintf("%+.2f", mean / se) : "-"), n
    }'
}
echo "$MODEL on the first $CHARS characters of $TEXT (ctx $CTX; SE over blocks of $BLOCK tokens)"
echo
echo "| a -> b | ppl a | ppl b | difference | mean dNLL | SE | z | tokens |"
echo "|---|---|---|---|---|---|---|---|"
compare definition_prefill kernels_prefill "definition -> kernels (prefill)"
compare definition_decode kernels_decode "definition -> kernels (decode)"
compare definition_prefill definition_decode "definition: prefill -> decode"
compare kernels_prefill kernels_decode "kernels: prefill -> decode"
