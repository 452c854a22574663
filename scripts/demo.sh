#!/usr/bin/env bash
# The main job on the bundled model, as far as mopt goes today: build, then
# inspect the bundled checkpoint (written by Hugging Face transformers).
# Quantization, evaluation, export and benchmarking join here as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-tests/data/hf/llama}

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
build/mopt --version
build/mopt inspect "$model"
