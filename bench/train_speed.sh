#!/usr/bin/env bash
# Training speed and memory of `mopt train` against PyTorch (transformers' LlamaForCausalLM, f32,
# AdamW) on the same model shape, batch x sequence length and thread count, side by side in one run:
# each takes STEPS steps on each shape, alternating, REPEATS times; medians of the per-step tokens/s
# (the first step of each run left out) and each run's peak RSS (/usr/bin/time).
#   bash bench/train_speed.sh [PYTHON]     (PYTHON: a python with torch and transformers;
#                                            default /tmp/mopt-venv/bin/python, see tools/fixtures)
# Environment: REPEATS (3), STEPS (6), THREADS (2), SHAPES (a name prefix; default all), PRECISION
# (f32, or bf16: mixed precision on both sides, mopt's --precision bf16 against torch's bf16 autocast).
# Shapes: tiny-kjv (6.5M parameters) at 16 x 256 and SmolLM2-135M at 4 x 512, the latter also with
# mopt's --recompute against torch's gradient checkpointing (both initialized at random from their
# config; mopt's tokens come from tiny-kjv's tokenizer on data/kjv-calib.txt, torch's are random).
set -euo pipefail
cd "$(dirname "$0")/.."
MOPT=${MOPT:-build/mopt}
PY=${1:-/tmp/mopt-venv/bin/python}
REPEATS=${REPEATS:-3}
STEPS=${STEPS:-6}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-f32}
case $PRECISION in
  f32) mprec=() tprec=() ;;
  bf16) mprec=(--precision bf16) tprec=(--bf16) ;;
  *) echo "PRECISION=$PRECISION: f32 or bf16" >&2; exit 1 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/smollm2-135m.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
 "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "tie_word_embeddings": true,
 "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02, "torch_dtype": "float32"}
JSON
cp models/tiny-kjv/config.json "$work/tiny-kjv.json"
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
rss_mib() { grep 'Maximum resident' "$1" | awk '{ printf "%.0f", $NF / 1024 }'; }
declare -A rate mem
# name batch seq-len [recompute: mopt --recompute, torch's gradient checkpointing]
shapes=("tiny-kjv 16 256" "smollm2-135m 4 512" "smollm2-135m 4 512 recompute")
# SHAPES=tiny-kjv (or smollm2-135m) keeps the shapes whose name starts so.
if [ -n "${SHAPES:-}" ]; then
  kept=()
  for s in "${shapes[@]}"; do [[ $s == "$SHAPES"* ]] && kept+=("$s"); done
  shapes=("${kept[@]}")
fi
for _ in $(seq "$REPEATS"); do
  for s in "${shapes[@]}"; do
    read -r name batch seq recompute <<< "$s"
    key="$name${recompute:+ recompute}"
    mflag=() tflag=()
    [ -n "$recompute" ] && mflag=(--recompute) tflag=(--checkpointing)
    rm -rf "$work/out"
    MOPT_THREADS=$THREADS /usr/bin/time -v "$MOPT" train --init "$work/$name.json" --tokenizer models/tiny-kjv \
      --data data/kjv-calib.txt --steps "$((STEPS + 1))" --batch "$batch" --seq-len "$seq" --out "$work/out" "${mflag[@]}" "${mprec[@]}" \
      > /dev/null 2> "$work/time"
    r=$(tail -n +2 "$work/out/train_log.jsonl" | grep -o '"tokens_per_s":[0-9.e+]*' | cut -d: -f2 | median)
    rate[mopt $key]+="$r "
    mem[mopt $key]+="$(rss_mib "$work/time") "
    /usr/bin/time -v "$PY" bench/train_speed_torch.py "$work/$name.json" --batch "$batch" --seq-len "$seq" \
      --steps "$STEPS" --threads "$THREADS" "${tflag[@]}" "${tprec[@]}" > "$work/torch.out" 2> "$work/time"
    rate[torch $key]+="$(grep -o ': [0-9]* tokens/s' "$work/torch.out" | grep -o '[0-9]*' | head -1) "
    mem[torch $key]+="$(rss_mib "$work/time") "
  done
done
"$MOPT" --version | grep -E '^(cpu|gemm|threads):'
echo "torch $("$PY" -c 'import torch; print(torch.__version__)'), $THREADS threads, $PRECISION products (parameters and AdamW f32), AdamW; medians of $REPEATS runs x $STEPS steps (the first of each run left out)"
printf '%-24s %-8s %12s %12s %8s %12s %12s\n' shape batch "mopt tok/s" "torch tok/s" ratio "mopt MiB" "torch MiB"
for s in "${shapes[@]}"; do
  read -r name batch seq recompute <<< "$s"
  key="$name${recompute:+ recompute}"
  m=$(tr ' ' '\n' <<< "${rate[mopt $key]}" | grep . | median)
  t=$(tr ' ' '\n' <<< "${rate[torch $key]}" | grep . | median)
  mm=$(tr ' ' '\n' <<< "${mem[mopt $key]}" | grep . | median)
  tm=$(tr ' ' '\n' <<< "${mem[torch $key]}" | grep . | median)
  printf '%-24s %-8s %12.0f %12.0f %7.2fx %12s %12s\n' "$key" "${batch}x$seq" "$m" "$t" "$(awk -v a="$m" -v b="$t" 'BEGIN { print a / b }')" "$mm" "$tm"
done
