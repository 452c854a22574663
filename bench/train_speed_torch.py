#!/usr/bin/env python3
"""PyTorch's side of bench/train_speed.sh: training steps of LlamaForCausalLM (transformers, f32, eager
attention as mopt computes it exactly, AdamW; --bf16: under bf16 autocast, PyTorch's mixed precision) from a config.json, on seeded random tokens, on a given
number of threads. Prints one line: "torch STEPS steps BATCHxSEQ: MEDIAN tokens/s (per-step tokens/s ...)".

    python3 bench/train_speed_torch.py CONFIG.json --batch 8 --seq-len 256 --steps 6 --threads 2
"""
import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--steps", type=int, default=6)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (recompute each layer)")
ap.add_argument("--bf16", action="store_true", help="mixed precision: the forward under torch.autocast('cpu', bfloat16)")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
cfg = AutoConfig.from_pretrained(args.config)
cfg._attn_implementation = "eager"
model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
if args.checkpointing:
    model.gradient_checkpointing_enable()
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
gen = torch.Generator().manual_seed(0)
rates = []
for step in range(args.steps + 1):
    tokens = torch.randint(0, min(cfg.vocab_size, 4096), (args.batch, args.seq_len + 1), generator=gen)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        logits = model(input_ids=tokens[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if step > 0:  # the first step allocates
        rates.append(args.batch * args.seq_len / (time.perf_counter() - t0))
print(f"torch {args.steps} steps {args.batch}x{args.seq_len}: {statistics.median(rates):.0f} tokens/s "
      f"(per step {' '.join(f'{r:.0f}' for r in rates)})")
