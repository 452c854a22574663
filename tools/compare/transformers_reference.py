#!/usr/bin/env python3
"""The same measurements `mopt eval ppl` and bench/model_bench make, done by
Hugging Face transformers on this machine, for side-by-side comparison in
docs and notes. Never needed to build or test mopt.

    /tmp/mopt-venv/bin/python tools/compare/transformers_reference.py MODEL_DIR TEXT_FILE \
        [--ctx 512] [--stride 512] [--prompt 512] [--gen 64] [--threads 2]

Prints JSON: perplexity (Hugging Face's sliding-window procedure, every scored
token counted exactly, NLL summed in float64), prefill tokens/s for a
`--prompt`-token random prompt, greedy decode tokens/s for `--gen` tokens with
the KV cache (batch 1), and peak RSS. The model runs in float32 (bf16 weights
widened), as mopt computes.
"""
import argparse
import json
import math
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def perplexity(model, ids, ctx, stride):
    n = len(ids)
    nll, scored, prev_end = 0.0, 0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + ctx, n)
            trg = end - prev_end
            window = torch.tensor([ids[begin:end]])
            logits = model(window).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            first = max(begin + 1, end - trg)
            for p in range(first, end):
                nll -= logp[p - 1 - begin, ids[p]].item()
                scored += 1
            prev_end = end
            if end == n:
                break
    return nll, scored, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--stride", type=int, default=0)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ctx = min(args.ctx, model.config.max_position_embeddings)
    stride = args.stride or ctx
    ids = tok(open(args.text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    nll, scored, seconds = perplexity(model, ids, ctx, stride)

    g = torch.Generator().manual_seed(1)
    prompt_len = min(args.prompt, model.config.max_position_embeddings - args.gen)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True)
        prefill = time.perf_counter() - t0
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(args.gen):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t0
    print(json.dumps({
        "model": args.model, "text": args.text, "ctx": ctx, "stride": stride,
        "tokens": len(ids), "scored_tokens": scored, "nll_sum": nll, "perplexity": math.exp(nll / scored),
        "ppl_seconds": seconds, "prefill_tokens": prompt_len, "prefill_tokens_per_s": prompt_len / prefill,
        "decode_tokens": args.gen, "decode_tokens_per_s": args.gen / decode,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": args.threads, "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
