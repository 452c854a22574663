#!/usr/bin/env bash
# Installs every build and test dependency of mopt from Debian packages.
# Idempotent; run as root on a fresh Debian 12 machine (uses sudo otherwise).
set -euo pipefail

packages=(
  build-essential cmake ninja-build   # compiler and build
  clang libclang-rt-14-dev            # sanitizer build and libFuzzer targets
  nlohmann-json3-dev                  # JSON: config.json, safetensors headers, tokenizer.json
  libfmt-dev                          # formatting (GCC 12 has no <format>)
  libcli11-dev                        # the command line
  libpcre2-dev                        # tokenizer pre-tokenizer regexes (Unicode properties, JIT)
  libutf8proc-dev                     # NFC normalization (Qwen tokenizers)
  libopenblas-openmp-dev libomp-dev   # f32 GEMM; OpenMP for gcc (libgomp) and clang (libomp)
  libgtest-dev libgmock-dev           # unit tests
)

if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1; then
  sudo="sudo"
else
  echo "setup.sh: run as root (or install sudo)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup.sh: all ${#packages[@]} packages already installed"
  exit 0
fi
echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
