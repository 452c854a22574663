"""How uneven a model's Linear inputs are across channels: AWQ's premise.

For each decoder layer, the per-channel mean |x| at the inputs of q_proj
(attention norm output), gate_proj (MLP norm output) and down_proj, over
calibration text; prints max/median of those means (AWQ-lite's act_scale).
Large ratios (tens to hundreds in LLMs trained on trillions of tokens) are
the salient channels AWQ protects; ratios near a few mean there is little
for it to do. Needs transformers + torch (tools/fixtures/requirements.txt).

    python tools/analysis/activation_outliers.py MODEL_DIR TEXT [TOKENS]
"""
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

model_dir, text_path = sys.argv[1], sys.argv[2]
n_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
ids = tok.encode(open(text_path, encoding="utf-8").read(), add_special_tokens=False).ids[:n_tokens]
sums = {}


def hook(name):
    def f(_module, inputs):
        x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).double()
        sums[name] = sums.get(name, 0) + x.sum(0)
    return f


for i, layer in enumerate(model.model.layers):
    for short in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        layer.get_submodule(short).register_forward_pre_hook(hook((i, short)))
with torch.no_grad():
    for o in range(0, len(ids), 512):
        model(torch.tensor([ids[o:o + 512]]))
print(f"{model_dir}: per-channel mean |x|, max / median (and max / min), {len(ids)} tokens")
print("layer  q_proj input        gate_proj input     down_proj input")
for i in range(len(model.model.layers)):
    cells = []
    for short in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        m = sums[(i, short)]
        cells.append(f"{(m.max() / m.median()).item():7.1f} ({(m.max() / m.min()).item():8.1f})")
    print(f"{i:5d}  " + "  ".join(cells))
