// Fake quantization of activations (a Linear's input, the keys or values):
// an optional per-column pre-quantization scale, then the quantizer.
#pragma once

#include <cstdint>
#include <vector>

#include "quant/spec.h"

namespace mopt::quant {

struct ActivationQuantizer {
  QuantizerSpec spec;
  std::vector<float> amax;             // per-tensor amax or NVFP4 global amax; empty for dynamic formats
  std::vector<float> pre_quant_scale;  // one per column; empty: none

  // x [rows, cols] in place: x *= pre_quant_scale (per column), then fake quantization.
  void apply(float* x, std::int64_t rows, std::int64_t cols) const;
};

}  // namespace mopt::quant
