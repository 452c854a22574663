#!/usr/bin/env bash
# tiny-kjv trained by mopt itself: the recipe of tools/train_tiny_kjv.py (the PyTorch script that made
# models/tiny-kjv: 800 steps of 16 x 256 tokens, AdamW 0.9/0.95, weight decay 0.1 on the matrices,
# peak lr 3e-3, 5% warmup, cosine to 10%, clipping at 1) from transformers' initialization of the same
# config and the same tokenizer, then held-out KJV perplexity beside the bundled model's.
# The one difference: mopt packs each book into pieces of 256 tokens starting with BOS, where the
# PyTorch script drew random windows of a stream of BOS + book + EOS.
#
# Usage (repository root): bash scripts/train-tiny-kjv.sh [WORKDIR]    (~30 min on 2 cores)
# PRECISION=bf16: mixed precision (--precision bf16: bf16 products, f32 weights and optimizer).
# SEED=N: another initialization and data order (default 1234, the documented run).
# Needs the Debian Bible packages tools/extract_bible.sh names, and build/mopt (MOPT=... for another).
set -euo pipefail
work=${1:-${TMPDIR:-/tmp}/mopt-tiny-kjv}
mopt=${MOPT:-build/mopt}
steps=${STEPS:-800}
precision=${PRECISION:-f32}
seed=${SEED:-1234}
mkdir -p "$work"
[ -f "$work/bible/kjv-train.txt" ] || bash tools/extract_bible.sh "$work/bible"
# One JSON record per training book (the "@@BOOK name" lines separate them), verses newline-terminated.
python3 - "$work/bible/kjv-train.txt" "$work/kjv-train.jsonl" <<'PY'
import json, sys
books, verses = [], []
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.rstrip("\n")
    if line.startswith("@@BOOK "):
        if verses:
            books.append("".join(v + "\n" for v in verses))
        verses = []
    elif line:
        verses.append(line)
if verses:
    books.append("".join(v + "\n" for v in verses))
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for b in books:
        f.write(json.dumps({"text": b}) + "\n")
print(f"{len(books)} books", file=sys.stderr)
PY
out="$work/tiny-kjv-mopt"
rm -rf "$out"
"$mopt" train --init models/tiny-kjv/config.json --tokenizer models/tiny-kjv --data "$work/kjv-train.jsonl" \
  --val data/kjv-heldout.txt --eval-every 200 --steps "$steps" --batch 16 --seq-len 256 --lr 3e-3 \
  --warmup $((steps / 20)) --schedule cosine --min-lr-ratio 0.1 --weight-decay 0.1 --beta1 0.9 --beta2 0.95 --clip 1 \
  --seed "$seed" --save-every 100 --log "$work/train_log.jsonl" --precision "$precision" --out "$out"
echo "held-out KJV perplexity (mopt eval ppl --ctx 256, f32 products; the bundled model: 55.55 in transformers):"
for m in models/tiny-kjv "$out"; do
  printf '%-40s ' "$m"
  "$mopt" eval ppl "$m" --text data/kjv-heldout.txt --ctx 256 --products f32 --json 2>/dev/null | python3 -c "import json,sys; print(json.load(sys.stdin)['perplexity'])"
done
