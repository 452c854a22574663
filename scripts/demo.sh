#!/usr/bin/env bash
# The main job on the bundled model, as far as mopt goes today: build, then
# inspect the bundled tiny-kjv model, measure its perplexity on held-out text
# (King James books it never saw, and the same books in the World English
# Bible), and let it continue a prompt. Quantization, its evaluation against
# this 16-bit model, export and benchmarking join here as they land.
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
