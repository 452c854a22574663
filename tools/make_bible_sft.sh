#!/usr/bin/env bash
# The supervised fine-tuning set of the QAT work: KJV verse -> the same verse in the World English
# Bible, as {"prompt", "response"} records `mopt train --data/--val` reads (loss on the response only).
#
# Usage:  tools/make_bible_sft.sh [WORKDIR]     (default ${TMPDIR:-/tmp}/mopt-bible-sft)
# Needs what tools/extract_bible.sh needs (Debian's bible-kjv, bible-kjv-text, sword-text-web,
# diatheke; perl) and python3 (standard library only). Offline. BIBLE=DIR reuses another
# extraction (a directory holding extract_bible.sh's kjv.tsv and web.tsv).
#
# Writes into WORKDIR:
#   bible/            extract_bible.sh's output (kjv.tsv, web.tsv, ...), reused when present
#   sft-train.jsonl   one pair per verse of the 56 training books of models/tiny-kjv
#   sft-val.jsonl     one pair per verse of the 10 held-out books (data/README.md's split)
#   sft-dropped.tsv   the verses left out, and why
#   README.txt        the split, the prompt and the counts
# Records, in canonical verse order (the KJV's):
#   {"prompt": "Rewrite this verse from the King James Version in modern English (World English Bible):\n<KJV>\n",
#    "response": "<WEB>"}
# Verses are paired by (book, chapter:verse); diatheke maps the WEB onto the KJV's versification.
# A verse is dropped when either side lacks it or has no text, or when the WEB verse is more than
# MERGE_RATIO (default 3) times as long as the KJV's: then it also holds verses the KJV numbers
# elsewhere (Romans 14:23 carries the doxology the KJV has as Romans 16:25-27).
#
# extract_bible.sh also writes data/{kjv-heldout,web-heldout,kjv-calib}.txt under its working
# directory; it is run in WORKDIR/bible/scratch so the repository's committed data/ is never
# touched, and its held-out texts are compared with the committed ones.
set -euo pipefail
export LC_ALL=C.UTF-8

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-${TMPDIR:-/tmp}/mopt-bible-sft}
mkdir -p "$work"
work=$(cd "$work" && pwd)
bible=${BIBLE:-$work/bible}

if [ -s "$bible/kjv.tsv" ] && [ -s "$bible/web.tsv" ]; then
  echo "reusing $bible/kjv.tsv and $bible/web.tsv" >&2
else
  mkdir -p "$bible/scratch"
  bible=$(cd "$bible" && pwd)
  echo "running tools/extract_bible.sh in $bible/scratch (its data/ files go there, not to the repository)" >&2
  (cd "$bible/scratch" && bash "$repo/tools/extract_bible.sh" "$bible")
fi
if [ -d "$bible/scratch/data" ]; then
  for f in kjv-heldout.txt web-heldout.txt; do
    if ! cmp -s "$bible/scratch/data/$f" "$repo/data/$f"; then
      echo "warning: this extraction's $f differs from the committed data/$f (other package versions?)" >&2
    fi
  done
fi

# The held-out books: extract_bible.sh's list, the one source of the split.
heldout=$(sed -n 's/^HELDOUT="\(.*\)"$/\1/p' "$repo/tools/extract_bible.sh")
[ -n "$heldout" ] || { echo "no HELDOUT=\"...\" line in tools/extract_bible.sh" >&2; exit 1; }

HELDOUT="$heldout" MERGE_RATIO="${MERGE_RATIO:-3}" python3 - "$bible/kjv.tsv" "$bible/web.tsv" "$work" <<'PY'
import json, os, sys

kjv_path, web_path, work = sys.argv[1:4]
held = os.environ["HELDOUT"].split("|")
merge_ratio = float(os.environ["MERGE_RATIO"])
INSTRUCTION = "Rewrite this verse from the King James Version in modern English (World English Bible):"


def load(path):
    verses, books = {}, []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 3:
            sys.exit(f"{path}:{n}: expected Book<TAB>chapter:verse<TAB>text")
        book, ref, text = parts
        if (book, ref) in verses:
            sys.exit(f"{path}:{n}: {book} {ref} twice")
        verses[(book, ref)] = text.strip()
        if not books or books[-1] != book:
            books.append(book)
    return verses, books


kjv, kjv_books = load(kjv_path)
web, web_books = load(web_path)
if len(kjv_books) != 66 or len(set(kjv_books)) != 66:
    sys.exit(f"{kjv_path}: expected the 66 books once each, in order")
missing_books = [b for b in held if b not in kjv_books]
if missing_books:
    sys.exit(f"held-out books not in the KJV: {missing_books}")

pairs = {"train": [], "val": []}
dropped = []  # (book, ref, reason)
for key, k in kjv.items():  # insertion order = canonical order
    w = web.get(key)
    if w is None:
        dropped.append((*key, "not in the WEB"))
    elif not k or not w:
        dropped.append((*key, "empty in the " + ("KJV" if not k else "WEB")))
    elif len(w) > merge_ratio * len(k):
        dropped.append((*key, f"merged: the WEB verse is {len(w) / len(k):.1f}x the KJV's length (holds other verses)"))
    else:
        pairs["val" if key[0] in held else "train"].append(
            (key, {"prompt": f"{INSTRUCTION}\n{k}\n", "response": w}))
for key in web:
    if key not in kjv:
        dropped.append((*key, "not in the KJV"))

stats = {}
for split in ("train", "val"):
    path = os.path.join(work, f"sft-{split}.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for _, rec in pairs[split]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    recs = [r for _, r in pairs[split]]
    books = []
    for (b, _), _ in pairs[split]:
        if not books or books[-1] != b:
            books.append(b)
    stats[split] = {
        "pairs": len(recs),
        "books": books,
        "prompt_chars": sum(len(r["prompt"]) for r in recs),
        "response_chars": sum(len(r["response"]) for r in recs),
        "max_response_chars": max((len(r["response"]) for r in recs), default=0),
    }
with open(os.path.join(work, "sft-dropped.tsv"), "w", encoding="utf-8") as f:
    for b, r, why in dropped:
        f.write(f"{b}\t{r}\t{why}\n")

kinds = {}
for _, _, why in dropped:
    kind = why.split(":")[0]
    kinds[kind] = kinds.get(kind, 0) + 1
total_chars = sum(s["prompt_chars"] + s["response_chars"] for s in stats.values())
err = sys.stderr
print(f"KJV {len(kjv)} verses, WEB {len(web)} verses", file=err)
for split in ("train", "val"):
    s = stats[split]
    print(f"{split:5s} {s['pairs']:6d} pairs, {len(s['books']):2d} books, prompt {s['prompt_chars']:8d} chars, "
          f"response {s['response_chars']:8d} chars (longest {s['max_response_chars']})", file=err)
print(f"dropped {len(dropped)} verses: " + (", ".join(f"{n} {k}" for k, n in kinds.items()) or "none"), file=err)
for b, r, why in dropped:
    print(f"  {b} {r}: {why}", file=err)
print(f"total {total_chars} characters (prompts + responses), {sum(s['pairs'] for s in stats.values())} pairs", file=err)

t, v = stats["train"], stats["val"]
drop_lines = "".join(f"  {b} {r}: {why}\n" for b, r, why in dropped) or "  none\n"
readme = f"""Bible fine-tuning set: KJV -> WEB (written by tools/make_bible_sft.sh)

Each line of sft-train.jsonl and sft-val.jsonl is one verse:
  {{"prompt": "{INSTRUCTION}\\n<KJV verse>\\n", "response": "<the same verse in the WEB>"}}
for `mopt train --data sft-train.jsonl --val sft-val.jsonl` (the loss counts the response and the
EOS mopt appends, not the prompt). Sources: King James Version (Debian bible-kjv-text, read with
`bible`) and World English Bible (sword-text-web, module engWEB2015eb, read with `diatheke`), both
public domain, extracted by tools/extract_bible.sh into {os.path.dirname(kjv_path)}.

Pairing: by (book, chapter:verse); diatheke maps the WEB onto the KJV's versification. Canonical
order (Genesis 1:1 first), no shuffling: the trainer draws its own order.

Split by book, as for models/tiny-kjv (data/README.md), so no validation verse is from a book the
model was trained on:
  validation: {len(v['books'])} books, {v['pairs']} pairs: {", ".join(v['books'])}
  train:      {len(t['books'])} books, {t['pairs']} pairs: all the other books

Characters: train {t['prompt_chars']} in prompts + {t['response_chars']} in responses,
            val {v['prompt_chars']} + {v['response_chars']}; total {total_chars}.

Dropped ({len(dropped)} verses, also in sft-dropped.tsv): a verse is left out when either version lacks
it or has no text for it, or when the WEB verse is more than {merge_ratio:g}x as long as the KJV's (it
then also holds text the KJV numbers as other verses):
{drop_lines}Kept although they differ in content: verses where the WEB follows another Greek or
Hebrew text than the KJV (e.g. 1 John 5:7-8, Acts 9:5-6), so a response can be shorter or longer
than a plain rewording of its prompt.
"""
with open(os.path.join(work, "README.txt"), "w", encoding="utf-8") as f:
    f.write(readme)
print(f"wrote {work}/sft-train.jsonl, sft-val.jsonl, sft-dropped.tsv, README.txt", file=err)
PY
