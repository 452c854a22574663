#!/usr/bin/env bash
# What the calibration algorithms buy, side by side in one run (bench/ptq_formats.sh does the
# measuring): INT4 round-to-nearest vs AWQ (lite, full) vs GPTQ vs AWQ+GPTQ, W8A8 with and
# without SmoothQuant, NVFP4 with and without AWQ.
#
#   bash bench/ptq_algorithms.sh [MODEL] [TEXT] [CTX] [CALIB_SIZE] [SEQ_LEN]
#   defaults as bench/ptq_formats.sh; GROUP (INT4 group size, default 128; 64 for tiny-kjv and SmolLM2)
set -euo pipefail
cd "$(dirname "$0")/.."
GROUP=${GROUP:-128}
exec bash bench/ptq_formats.sh "${1:-models/tiny-kjv}" "${2:-data/kjv-heldout.txt}" "${3:-256}" "${4:-64}" "${5:-256}" \
  "int4_rtn --group-size $GROUP" \
  "int4_awq --group-size $GROUP --algo awq_lite" \
  "int4_awq --group-size $GROUP --algo awq_full" \
  "int4_awq --group-size $GROUP --algo gptq" \
  "int4_awq --group-size $GROUP --algo awq_lite+gptq" \
  "int8" \
  "int8_sq --algo smoothquant" \
  "nvfp4" \
  "nvfp4_awq --algo awq_lite"
