#!/usr/bin/env python3
"""Train models/tiny-kjv: a tiny Llama on the King James Bible, saved by transformers.

Exact command lines used for the committed model (CPU, 2 threads):

    tools/extract_bible.sh /tmp/mopt-bible
    /tmp/mopt-venv/bin/python tools/train_tiny_kjv.py \\
        --train-text /tmp/mopt-bible/kjv-train.txt --out models/tiny-kjv \\
        --steps 800 --batch 16

Other modes:
    --bench 5        time 5 training steps and exit (to choose --steps for a time budget)
    --eval-only      recompute reference_eval.json, reference_logits.safetensors,
                     the generation samples and README.md from the saved checkpoint

Stages:
 1. Byte-level BPE tokenizer (`tokenizers`), trained on the training text only.
    vocab 4096 = 2 specials + 256 byte symbols + 3838 merges.
      id 0 <|begin_of_text|>  (BOS, prepended by the TemplateProcessing post-processor)
      id 1 <|end_of_text|>    (EOS, separates the books in the training stream)
    normalizer none; pre-tokenizer Sequence[Split(Llama-3 regex, Isolated),
    ByteLevel(add_prefix_space=False, use_regex=False)]; decoder ByteLevel.
 2. LlamaForCausalLM, vocab 4096, hidden 256, 6 layers, 8 heads (head_dim 32),
    4 KV heads, MLP 704, rope_theta 1e4, 512 positions, untied embeddings.
    Training stream: for every training book "<|begin_of_text|>" + verses (one per
    line, "\\n"-terminated) + "<|end_of_text|>". Batches are random 257-token
    windows of that stream (inputs = first 256, targets = shifted by one).
    AdamW(0.9, 0.95, wd 0.1 on matrices only), peak lr 3e-3, linear warmup, cosine
    decay to 10%, grad clip 1.0, fp32 on CPU, torch.set_num_threads(2), seed 1234.
 3. Saved with model.to(bfloat16).save_pretrained(..., safe_serialization=True) and
    PreTrainedTokenizerFast(tokenizer_object=...).save_pretrained(...).
 4. Reference numbers from the SAVED checkpoint reloaded in float32 (bf16 weights
    widened): Hugging Face's sliding-window perplexity on data/kjv-heldout.txt and
    data/web-heldout.txt, and f32 logits of the first 64 held-out tokens.
 5. Greedy generation samples, and README.md (model card) with all the numbers.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB = 4096
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PROMPTS = ["In the beginning", "And the LORD said unto Moses,"]
EVAL_FILES = ["data/kjv-heldout.txt", "data/web-heldout.txt"]
EVAL_SETTINGS = [(256, 256), (256, 128)]  # (context, stride)
SEED = 1234


def read_books(path):
    """kjv-train.txt: '@@BOOK name' lines start a book, other lines are verses."""
    books, name, verses = [], None, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("@@BOOK "):
                if verses:
                    books.append((name, "".join(v + "\n" for v in verses)))
                name, verses = line[7:], []
            elif line:
                verses.append(line)
    if verses:
        books.append((name, "".join(v + "\n" for v in verses)))
    return books


def train_tokenizer(texts):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert (bos_id, eos_id) == (0, 1), (bos_id, eos_id)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    vocab = tok.get_vocab()
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    assert not missing, missing
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tok


def make_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, hidden_act="silu",
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
        attention_bias=False, mlp_bias=False, initializer_range=0.02, use_cache=True)


def lr_at(step, steps, peak, warmup, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def train(args):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(2)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)

    books = read_books(args.train_text)
    print(f"{len(books)} training books, {sum(len(t) for _, t in books)} chars", flush=True)
    t0 = time.time()
    tok = train_tokenizer([t for _, t in books])
    print(f"tokenizer trained in {time.time() - t0:.1f}s", flush=True)

    stream = []
    for _, text in books:
        stream.append(0)
        stream.extend(tok.encode(text, add_special_tokens=False).ids)
        stream.append(1)
    data = torch.tensor(stream, dtype=torch.long)
    print(f"training stream: {len(data)} tokens ({sum(len(t) for _, t in books) / len(data):.2f} chars/token)",
          flush=True)

    cfg = make_config()
    model = LlamaForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params} ({2 * n_params / 2**20:.2f} MiB in bf16)", flush=True)
    assert 2 * n_params <= 16 * 2**20

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(SEED)
    ctx = args.context
    steps = args.bench if args.bench else args.steps
    warmup = max(1, int(0.05 * steps)) if not args.bench else 1
    log = []
    t_start = time.time()
    ema = None
    for step in range(steps):
        lr = lr_at(step, steps, args.lr, warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - ctx - 1, (args.batch,), generator=gen)
        chunk = torch.stack([data[s:s + ctx + 1] for s in starts])
        out = model(input_ids=chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, VOCAB).float(), chunk[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        el = time.time() - t_start
        log.append({"step": step + 1, "loss": lv, "lr": lr, "elapsed_s": el})
        if args.bench or (step + 1) % 10 == 0 or step == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} loss {lv:.4f} (ema {ema:.4f}) lr {lr:.2e} "
                  f"gnorm {gnorm:.2f} {el:.0f}s ({(step + 1) / el:.3f} steps/s)", flush=True)
    train_time = time.time() - t_start
    if args.bench:
        print(f"bench: {steps / train_time:.3f} steps/s -> {int(args.budget * steps / train_time)} "
              f"steps in {args.budget}s", flush=True)
        return

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                     model_max_length=cfg.max_position_embeddings)
    hf_tok.save_pretrained(args.out)
    last = log[-20:]
    info = {
        "steps": steps, "batch": args.batch, "context": ctx, "peak_lr": args.lr,
        "warmup_steps": warmup, "seed": SEED, "threads": 2,
        "train_tokens_in_stream": len(data), "tokens_seen": steps * args.batch * ctx,
        "train_time_s": round(train_time, 1), "parameters": n_params,
        "final_loss_last20_mean": sum(r["loss"] for r in last) / len(last),
        "final_loss": log[-1]["loss"],
        "loss_curve": [{"step": r["step"], "loss": round(r["loss"], 4)} for r in log
                       if r["step"] % 10 == 0 or r["step"] in (1, steps)],
    }
    with open(os.path.join(args.out, "training_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"saved to {args.out} after {train_time:.0f}s", flush=True)


def sliding_window_ppl(model, ids, ctx, stride):
    """Hugging Face's documented sliding-window perplexity (docs: perplexity.md).

    The model's loss shifts labels by one, so position 0 of each window is never
    scored; positions j >= len - trg_len (and j >= 1) are. We count exactly those
    and sum their NLL in float64. Also cross-checked against loss * count."""
    n = len(ids)
    total_nll, total_scored, prev_end, windows = 0.0, 0, 0, 0
    max_dev = 0.0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        trg_len = end - prev_end
        inp = torch.tensor(ids[begin:end], dtype=torch.long)[None]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids=inp, labels=labels)
        logp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
        tgt = labels[0, 1:]
        mask = tgt != -100
        nll = -logp[mask].gather(1, tgt[mask][:, None]).sum().item()
        scored = int(mask.sum())
        assert scored == (trg_len if end - begin - trg_len >= 1 else trg_len - 1)
        max_dev = max(max_dev, abs(out.loss.double().item() * scored - nll) / max(1, scored))
        total_nll += nll
        total_scored += scored
        windows += 1
        prev_end = end
        if end == n:
            break
    return {"context": ctx, "stride": stride, "windows": windows, "total_nll": total_nll,
            "scored_tokens": total_scored, "ppl": math.exp(total_nll / total_scored),
            "max_per_token_dev_vs_hf_loss": max_dev}


def evaluate(args):
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(2)
    model = LlamaForCausalLM.from_pretrained(args.out, torch_dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.out)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 1
    assert tok("In the beginning").input_ids[0] == 0
    assert tok("In the beginning", add_special_tokens=False).input_ids[0] != 0

    res = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "checkpoint_dtype": "bfloat16", "eval_dtype": "float32",
           "procedure": "HF sliding-window perplexity; whole file as one string, "
                        "add_special_tokens=False; first token of each window never scored",
           "files": {}}
    first_ids = None
    for path in EVAL_FILES:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        ids = tok(text, add_special_tokens=False).input_ids
        entry = {"bytes": len(text.encode("utf-8")), "chars": len(text), "tokens": len(ids),
                 "results": []}
        for ctx, stride in EVAL_SETTINGS:
            t0 = time.time()
            r = sliding_window_ppl(model, ids, ctx, stride)
            print(f"{path} ctx {ctx} stride {stride}: ppl {r['ppl']:.4f} "
                  f"({r['scored_tokens']} scored, {time.time() - t0:.0f}s)", flush=True)
            entry["results"].append(r)
        res["files"][os.path.basename(path)] = entry
        if first_ids is None:
            first_ids = ids[:64]
    with open(os.path.join(args.out, "reference_eval.json"), "w") as f:
        json.dump(res, f, indent=1)

    inp = torch.tensor(first_ids, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=inp[None]).logits[0].float().contiguous()
    save_file({"input_ids": inp.contiguous(), "logits": logits},
              os.path.join(args.out, "reference_logits.safetensors"))

    gens = []
    for p in PROMPTS:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=60, do_sample=False, pad_token_id=1)
        text = tok.decode(out[0], skip_special_tokens=True)
        gens.append({"prompt": p, "input_ids": enc.input_ids[0].tolist(),
                     "output_ids": out[0].tolist(), "text": text})
        print(f"--- {p!r}\n{text}\n", flush=True)
    with open(os.path.join(args.out, "generation_samples.json"), "w") as f:
        json.dump(gens, f, indent=1)
    write_card(args, res, gens, model)
    for name in os.listdir(args.out):
        os.chmod(os.path.join(args.out, name), 0o644)


def write_card(args, res, gens, model):
    with open(os.path.join(args.out, "training_log.json")) as f:
        tl = json.load(f)
    n_params = sum(p.numel() for p in model.parameters())
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    rows = []
    for fname, e in res["files"].items():
        for r in e["results"]:
            rows.append(f"| {fname} | {e['tokens']} | {r['context']} | {r['stride']} | "
                        f"{r['scored_tokens']} | {r['total_nll']:.3f} | {r['ppl']:.3f} |")
    gen_md = "\n\n".join(f"Prompt `{g['prompt']}`:\n\n```\n{g['text']}\n```" for g in gens)
    card = f"""# tiny-kjv

A tiny Llama-architecture causal LM trained from scratch on the King James Bible,
saved by Hugging Face transformers {res['transformers_version']} (torch {res['torch_version']}).
It is mopt's bundled demo/test model: small enough to commit, real enough that
perplexity and generations are meaningful. Produced by `tools/train_tiny_kjv.py`.

## Architecture

`LlamaForCausalLM`: vocab 4096, hidden 256, 6 layers, 8 attention heads (head_dim 32),
4 key/value heads (GQA), SwiGLU MLP 704, RMSNorm eps 1e-5, RoPE theta 10000,
max_position_embeddings 512, untied input/output embeddings, no biases.
{n_params:,} parameters; `model.safetensors` is {size:,} bytes (bfloat16).

Tokenizer (`tokenizer.json`, `tokenizers` format): byte-level BPE, 4096 tokens, trained on
the training text only. No normalizer; pre-tokenizer = Split(Llama-3 regex, Isolated) then
ByteLevel(add_prefix_space=False, use_regex=False); ByteLevel decoder. All 256 byte symbols
are in the vocabulary. Special tokens: id 0 `<|begin_of_text|>` (BOS, prepended by the
TemplateProcessing post-processor when `add_special_tokens=True`), id 1 `<|end_of_text|>` (EOS).

## Training data and split

King James Version (Debian `bible-kjv`, public domain), one verse per line, see
`data/README.md` and `tools/extract_bible.sh`. Held out for evaluation (~5% of the text):
Ruth, Esther, Ecclesiastes, Lamentations, Joel, Jonah, Mark, Philippians, Titus, Jude.
All other 56 books are training text: {tl['train_tokens_in_stream']:,} tokens, each book
wrapped as `<|begin_of_text|>` verses `<|end_of_text|>`.

## Training

Random 256-token windows, batch {tl['batch']}, {tl['steps']} steps ({tl['tokens_seen']:,} tokens seen),
AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {tl['peak_lr']}, {tl['warmup_steps']} warmup steps,
cosine decay to 10%, grad clip 1.0, fp32 on CPU with 2 threads, seed {tl['seed']}.
Wall clock {tl['train_time_s']:.0f} s. Final training loss {tl['final_loss']:.4f}
(mean of the last 20 steps {tl['final_loss_last20_mean']:.4f}). Loss curve in `training_log.json`.

## Reference evaluation (`reference_eval.json`)

Computed with transformers on this saved checkpoint reloaded with `torch_dtype=torch.float32`
(bf16 weights widened), eval mode, following Hugging Face's sliding-window perplexity
procedure: the whole file tokenized as one string with `add_special_tokens=False`; windows of
`ctx` tokens every `stride` tokens; only the tokens not already scored by the previous window
are labelled; the first token of each window is never scored (the loss shifts labels by one).
NLL summed in float64.

| file | tokens | ctx | stride | scored | total NLL | ppl |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

`data/web-heldout.txt` is the same held-out books in the World English Bible: unseen
content in a different (modern) translation, hence the much higher perplexity.

`reference_logits.safetensors`: `input_ids` (int64 [64], the first 64 tokens of
`data/kjv-heldout.txt`, no BOS) and `logits` (float32 [64, 4096]) from the same f32 model.

## Greedy generation (transformers `generate`, 60 new tokens, BOS prepended)

{gen_md}

## Regenerate

```
apt-get install bible-kjv bible-kjv-text sword-text-web diatheke
tools/extract_bible.sh /tmp/mopt-bible
/tmp/mopt-venv/bin/python tools/train_tiny_kjv.py --train-text /tmp/mopt-bible/kjv-train.txt \\
    --out models/tiny-kjv --steps {tl['steps']} --batch {tl['batch']}
```

`--eval-only` recomputes the reference files, samples and this card from the saved
checkpoint. Training runs on CPU; bit-exact reproduction of the weights is not guaranteed
across machines/thread counts.
"""
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(card)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-text", default="/tmp/mopt-bible/kjv-train.txt")
    ap.add_argument("--out", default="models/tiny-kjv")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--bench", type=int, default=0, help="time N steps and exit")
    ap.add_argument("--budget", type=float, default=1800.0, help="seconds, for --bench")
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args()
    if not args.eval_only:
        train(args)
        if args.bench:
            return
    evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
