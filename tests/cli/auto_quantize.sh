#!/usr/bin/env bash
# Mixed precision from the command line (`mopt quantize --auto-bits`): at the cheapest candidate's bits
# the output is byte for byte the uniform quantization with that format (the exported Linears are the
# candidates' own, AWQ's folded norms included); at a budget between the formats it is a
# MIXED_PRECISION checkpoint within the budget that loads and evaluates, by the gradient score (the
# default) and by KL divergence; the saved scores re-solve another budget without scoring; bad
# requests are refused with one line.
# Usage: auto_quantize.sh MOPT MODEL TEXT WORKDIR
set -euo pipefail
mopt=$1 model=$2 text=$3 work=$4
rm -rf "$work"
mkdir -p "$work"
calib=(--calib "$text" --calib-size 8 --seq-len 64)
fail() { echo "FAIL: $*"; exit 1; }
same_files() {  # same_files DIR_A DIR_B: every file byte for byte
  (cd "$1" && sha256sum -- * | sort) > "$work/a.sum"
  (cd "$2" && sha256sum -- * | sort) > "$work/b.sum"
  diff "$work/a.sum" "$work/b.sum" || fail "$1 and $2 differ"
}

# The cheapest budget: every group takes the 4-bit candidate, exactly as a uniform run writes it.
# nvfp4_awq moves scales between Linears (attention and MLP are whole groups); int4_awq folds its
# scales into the norms (q/k/v, o, gate/up, down are groups).
"$mopt" quantize "$model" --auto-bits 4.5 "${calib[@]}" --auto-score-size 2 --out "$work/auto-4.5" > "$work/auto-4.5.out" 2>&1 || { cat "$work/auto-4.5.out"; exit 1; }
grep -q "attention and MLP of each layer whole" "$work/auto-4.5.out" || fail "nvfp4_awq did not group attention and MLP whole"
"$mopt" quantize "$model" --format nvfp4_awq "${calib[@]}" --out "$work/nvfp4_awq" > /dev/null 2>&1
same_files "$work/auto-4.5" "$work/nvfp4_awq"
"$mopt" quantize "$model" --auto-bits 4.25 --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 --out "$work/auto-int4" > "$work/auto-int4.out" 2>&1 || { cat "$work/auto-int4.out"; exit 1; }
"$mopt" quantize "$model" --format int4_awq --group-size 64 "${calib[@]}" --out "$work/int4_awq" > /dev/null 2>&1
same_files "$work/auto-int4" "$work/int4_awq"

# Between the formats: a mixed checkpoint within the budget, its choices reported, loading and evaluating.
"$mopt" quantize "$model" --auto-bits 6 --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 \
  --auto-state "$work/state.json" --report "$work/report.json" --out "$work/auto-6" > "$work/auto-6.out" 2>&1 || { cat "$work/auto-6.out"; exit 1; }
grep -q '"MIXED_PRECISION"' "$work/auto-6/hf_quant_config.json" || fail "budget 6 did not write MIXED_PRECISION"
bits=$(sed -n 's/^mixed precision under 6 bits: \([0-9.]*\) effective bits.*/\1/p' "$work/auto-6.out")
[ -n "$bits" ] && awk -v b="$bits" 'BEGIN { exit !(b <= 6 && b > 4.25) }' || fail "effective bits '$bits' not within (4.25, 6]"
[ "$(grep -c '"choice"' "$work/report.json")" -eq 24 ] || fail "the report does not give 24 groups' choices"
grep -q '"choice": "fp8"\|"choice": "none"' "$work/report.json" || fail "budget 6 chose only int4"
# Uniform int4_awq fits the budget: it is checked against the solver's choice on the score samples.
grep -q "check on the score samples: KL .* for uniform int4_awq" "$work/auto-6.out" || { cat "$work/auto-6.out"; fail "no check against uniform int4_awq"; }
grep -q '"uniform_check"' "$work/report.json" || fail "the report does not give the check"
"$mopt" eval kld "$work/auto-6" --base "$model" --text "$text" --ctx 64 > "$work/kld.out" 2>&1 || { cat "$work/kld.out"; exit 1; }
grep -q "mean KLD" "$work/kld.out" || fail "no KLD of the mixed model"

# The same choice written for vLLM (compressed-tensors: one config group per scheme) and llama.cpp (GGUF:
# each Linear in the type that holds it), from the saved scores; both load and evaluate.
"$mopt" quantize "$model" --auto-bits 6 --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 \
  --export compressed-tensors --out "$work/auto-6-ct" > "$work/auto-6-ct.out" 2>&1 || { cat "$work/auto-6-ct.out"; exit 1; }
grep -q '"format": "mixed-precision"' "$work/auto-6-ct/config.json" || fail "the compressed-tensors export is not mixed-precision"
[ "$(grep -c '"group_[0-9]*"' "$work/auto-6-ct/config.json")" -ge 2 ] || fail "the compressed-tensors export has fewer than two config groups"
"$mopt" quantize "$model" --auto-bits 6 --auto-formats nvfp4,fp8 "${calib[@]}" --auto-score-size 2 \
  --export gguf --out "$work/auto-6.gguf" > "$work/auto-6-gguf.out" 2>&1 || { cat "$work/auto-6-gguf.out"; exit 1; }
"$mopt" inspect "$work/auto-6.gguf" > "$work/auto-6-gguf.inspect" 2>&1
grep -q "NVFP4" "$work/auto-6-gguf.inspect" && grep -q "Q8_0" "$work/auto-6-gguf.inspect" || { cat "$work/auto-6-gguf.inspect"; fail "the GGUF does not hold NVFP4 and Q8_0 Linears"; }
for out in "$work/auto-6-ct" "$work/auto-6.gguf"; do
  "$mopt" eval kld "$out" --base "$model" --text "$text" --ctx 64 > "$work/kld.out" 2>&1 || { cat "$work/kld.out"; exit 1; }
  grep -q "mean KLD" "$work/kld.out" || fail "no KLD of $out"
done

# The saved scores re-solve another budget without scoring; scores for other candidates are refused.
"$mopt" quantize "$model" --auto-bits 5 --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 \
  --auto-state "$work/state.json" --out "$work/auto-5" > "$work/auto-5.out" 2>&1 || { cat "$work/auto-5.out"; exit 1; }
grep -q "scores: read from" "$work/auto-5.out" || fail "the saved scores were not used"
grep -q "scoring (" "$work/auto-5.out" && fail "scored again although the scores were saved"
grep -q '"method": "gradient"' "$work/state.json" || fail "the default method is not the gradient score"
# KL scores: their own state; gradient scores are not taken for them.
"$mopt" quantize "$model" --auto-bits 6 --auto-method kl --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 \
  --auto-state "$work/state-kl.json" --out "$work/auto-6-kl" > "$work/auto-6-kl.out" 2>&1 || { cat "$work/auto-6-kl.out"; exit 1; }
grep -q "scoring (KL" "$work/auto-6-kl.out" || fail "--auto-method kl did not score by KL divergence"
grep -q '"MIXED_PRECISION"' "$work/auto-6-kl/hf_quant_config.json" || fail "KL at budget 6 did not write MIXED_PRECISION"
if "$mopt" quantize "$model" --auto-bits 5 --auto-method kl --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 \
    --auto-state "$work/state.json" --out "$work/never" > "$work/other.out" 2>&1; then fail "gradient scores were taken for --auto-method kl"; fi
grep -q '"gradient" scores, not kl' "$work/other.out" || { cat "$work/other.out"; fail "no message naming the method"; }
if "$mopt" quantize "$model" --auto-bits 5 --auto-formats nvfp4,fp8 "${calib[@]}" --auto-score-size 2 --auto-state "$work/state.json" \
    --out "$work/never" > "$work/other.out" 2>&1; then fail "scores of other candidates were accepted"; fi
grep -q "scores for candidates" "$work/other.out" || { cat "$work/other.out"; fail "no message naming the candidates"; }
if "$mopt" quantize "$model" --auto-bits 5 --auto-formats int4_awq,fp8 --group-size 64 --calib "$text" --calib-size 4 --seq-len 64 \
    --auto-score-size 2 --auto-state "$work/state.json" --out "$work/never" > "$work/other.out" 2>&1; then fail "scores from other calibration were accepted"; fi
grep -q "scores of another model or from other calibration settings" "$work/other.out" || { cat "$work/other.out"; fail "no message on other calibration"; }
# Scores of other candidates' Linears: INT4 in other groups, or scales folded for another export.
for other in "--group-size 32" "--group-size 64 --export compressed-tensors"; do
  read -r -a extra <<< "$other"
  if "$mopt" quantize "$model" --auto-bits 5 --auto-formats int4_awq,fp8 "${extra[@]}" "${calib[@]}" --auto-score-size 2 \
      --auto-state "$work/state.json" --out "$work/never" > "$work/other.out" 2>&1; then fail "scores were taken with $other"; fi
  grep -q "scores of another model or from other calibration settings" "$work/other.out" || { cat "$work/other.out"; fail "no message with $other"; }
done
# A damaged state file: one error naming it, nothing written.
head -c 100 "$work/state.json" > "$work/broken.json"
if "$mopt" quantize "$model" --auto-bits 5 --auto-formats int4_awq,fp8 --group-size 64 "${calib[@]}" --auto-score-size 2 \
    --auto-state "$work/broken.json" --out "$work/never" > "$work/broken.out" 2>&1; then fail "a truncated state file was accepted"; fi
grep -q "broken.json" "$work/broken.out" || { cat "$work/broken.out"; fail "the error does not name the state file"; }
[ ! -e "$work/never" ] || fail "a refused run left an output"
[ ! -e "$work/never" ] || fail "a refused run left an output"

# Refusals: one line each, nothing written.
refused() {  # refused MESSAGE ARGS...
  local message=$1
  shift
  if "$mopt" quantize "$model" "$@" --out "$work/never" > "$work/refused.out" 2>&1; then fail "accepted: $*"; fi
  grep -q -- "$message" "$work/refused.out" || { cat "$work/refused.out"; fail "no '$message' for: $*"; }
  [ ! -e "$work/never" ] || fail "a refused run left an output: $*"
}
refused "below the cheapest candidate's 4.5 bits" --auto-bits 4 "${calib[@]}" --auto-score-size 2
refused "choose gradient" --auto-bits 6 --auto-method hessian "${calib[@]}"
refused "--gguf-type q4_0 does not apply" --auto-bits 6 --export gguf --gguf-type q4_0 "${calib[@]}"
refused "--format does not apply" --auto-bits 6 --format fp8 "${calib[@]}"
refused "give --calib FILE" --auto-bits 6
refused "unknown format 'fp7'" --auto-bits 6 --auto-formats fp8,fp7 "${calib[@]}"
refused "none of --auto-formats fp8 takes one" --auto-bits 8 --auto-formats fp8 --group-size 64 "${calib[@]}"
echo "auto_quantize.sh: all checks passed"
