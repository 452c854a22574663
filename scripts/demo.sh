#!/usr/bin/env bash
# The main job on the bundled model, as far as mopt goes today: build, then
# inspect the bundled tiny-kjv model, measure its perplexity on held-out text
# (King James books it never saw, and the same books in the World English
# Bible), let it continue a prompt, then quantize it to NVFP4 with an FP8 KV
# cache (a Hugging Face "modelopt" checkpoint under build/), and evaluate the
# quantized model against its 16-bit self, and distilled toward it (QAD); then INT4 weights with and without
# GPTQ, 2:4 sparsity (SparseGPT's mask alone and with its weight update), the
# GPTQ model exported for vLLM and llama.cpp, GPTQ on llama.cpp's Q4_0 grid against llama-quantize's own; finally the quantized and sparse
# models' speed and memory against the 16-bit model with their kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/tiny-kjv}

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
build/mopt --version
echo "== inspect"
build/mopt inspect "$model"
echo "== perplexity on held-out text"
build/mopt eval ppl "$model" --text data/kjv-heldout.txt --ctx 256  # the context tiny-kjv was trained on
build/mopt eval ppl "$model" --text data/web-heldout.txt --ctx 256
echo "== generation"
build/mopt generate "$model" --prompt "In the beginning" --max-tokens 48
build/mopt generate "$model" --prompt "And the LORD said unto Moses," --max-tokens 48 --temp 0.8 --top-p 0.9 --seed 1
echo "== quantize to NVFP4 (W4A4) with an FP8 KV cache, calibrated on KJV text"
rm -rf build/tiny-kjv-nvfp4
build/mopt quantize "$model" --format nvfp4 --kv-cache fp8 --calib data/kjv-calib.txt --calib-size 64 --seq-len 256 \
  --out build/tiny-kjv-nvfp4 --report build/tiny-kjv-nvfp4.json
build/mopt inspect build/tiny-kjv-nvfp4
echo "== the quantized model against the 16-bit one (held-out KJV)"
build/mopt eval kld build/tiny-kjv-nvfp4 --base "$model" --text data/kjv-heldout.txt --ctx 256
build/mopt generate build/tiny-kjv-nvfp4 --prompt "In the beginning" --max-tokens 32
echo "== quantization-aware distillation: the same NVFP4 model trained 20 steps toward its 16-bit self on KJV training text"
rm -rf build/tiny-kjv-nvfp4-qad
build/mopt train "$model" --qat nvfp4 --kv-cache fp8 --distill --calib data/kjv-calib.txt --calib-size 64 --calib-seq-len 256 \
  --data data/kjv-calib.txt --steps 20 --batch 8 --seq-len 256 --lr 5e-5 --warmup 2 --out build/tiny-kjv-nvfp4-qad | tail -1
build/mopt eval kld build/tiny-kjv-nvfp4-qad --base "$model" --text data/kjv-heldout.txt --ctx 256 | grep -E "ppl|mean"
echo "== INT4 weights (W4A16, groups of 64): round-to-nearest against GPTQ, same calibration"
for algo in max gptq; do
  rm -rf "build/tiny-kjv-int4-$algo"
  build/mopt quantize "$model" --format int4_awq --group-size 64 --algo "$algo" --calib data/kjv-calib.txt --calib-size 64 --seq-len 256 \
    --out "build/tiny-kjv-int4-$algo" | tail -2
  build/mopt eval kld "build/tiny-kjv-int4-$algo" --base "$model" --text data/kjv-heldout.txt --ctx 256 | grep -E "ppl|mean"
done
echo "== 2:4 sparsity: SparseGPT's mask alone (the reference's mode) against SparseGPT with its weight update"
for algo in sparsegpt-mask sparsegpt; do
  rm -rf "build/tiny-kjv-24-$algo"
  build/mopt quantize "$model" --format none --sparsity 2:4 --sparse-algo "$algo" --calib data/kjv-calib.txt --calib-size 64 --seq-len 256 \
    --out "build/tiny-kjv-24-$algo" | grep pruned
  build/mopt eval kld "build/tiny-kjv-24-$algo" --base "$model" --text data/kjv-heldout.txt --ctx 256 | grep -E "ppl|mean"
done
echo "== export for the engines: compressed-tensors (vLLM) and GGUF (llama.cpp) from the GPTQ model"
rm -rf build/tiny-kjv-int4-ct build/tiny-kjv-int4.gguf
build/mopt export build/tiny-kjv-int4-gptq --to compressed-tensors build/tiny-kjv-int4-ct
build/mopt export build/tiny-kjv-int4-gptq --to gguf build/tiny-kjv-int4.gguf --type q4_0
for m in build/tiny-kjv-int4-gptq build/tiny-kjv-int4-ct build/tiny-kjv-int4.gguf; do
  echo "$m: $(build/mopt eval ppl "$m" --text data/kjv-heldout.txt --ctx 256 | tail -1)"
done
echo "== llama.cpp's Q4_K_M: llama-quantize's file against GPTQ in the file's own blocks, weighted by the calibration text"
rm -rf build/tiny-kjv-q4_k_m.gguf build/tiny-kjv-q4_k_m-gptq.gguf
build/mopt export "$model" --to gguf build/tiny-kjv-q4_k_m.gguf --type q4_k_m
build/mopt quantize "$model" --format int4_awq --algo gptq --calib data/kjv-calib.txt --calib-size 64 --seq-len 256 \
  --export gguf --gguf-type q4_k_m --out build/tiny-kjv-q4_k_m-gptq.gguf 2>&1 | grep "own blocks"
for m in build/tiny-kjv-q4_k_m.gguf build/tiny-kjv-q4_k_m-gptq.gguf; do
  echo "$m: $(build/mopt eval kld "$m" --base "$model" --text data/kjv-heldout.txt --ctx 256 | grep "mean KLD")"
done
echo "== the quantized kernels compute what the fake-quantized definition does (NVFP4 model, perplexity)"
echo "kernels:      $(build/mopt eval ppl build/tiny-kjv-nvfp4 --text data/kjv-heldout.txt --ctx 256 | tail -1)"
echo "definition:   $(build/mopt eval ppl build/tiny-kjv-nvfp4 --text data/kjv-heldout.txt --ctx 256 --fake-quant | tail -1)"
echo "== INT8 W8A8 (SmoothQuant), then the benchmark: every model against the 16-bit one, in one process"
rm -rf build/tiny-kjv-int8
build/mopt quantize "$model" --format int8_sq --calib data/kjv-calib.txt --calib-size 64 --seq-len 256 --out build/tiny-kjv-int8 | tail -1
build/mopt bench build/tiny-kjv-int4-gptq build/tiny-kjv-int8 build/tiny-kjv-nvfp4 build/tiny-kjv-24-sparsegpt --base "$model" --batch 1,16 --prompt 128 --gen 64 --rounds 3
