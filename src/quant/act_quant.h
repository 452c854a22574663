// Fake quantization of activations (a Linear's input, the keys or values):
// an optional per-column pre-quantization scale, then the quantizer; and the
// straight-through gradient of the two (quantization-aware training).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "quant/spec.h"

namespace mopt::quant {

struct ActivationQuantizer {
  std::optional<QuantizerSpec> spec;   // absent: the pre-quantization scale alone (AWQ's W4A16 inputs)
  std::vector<float> amax;             // per-tensor amax or NVFP4 global amax; empty for dynamic formats
  std::vector<float> pre_quant_scale;  // one per column; empty: none

  // x [rows, cols] in place: x *= pre_quant_scale (per column), then fake quantization.
  void apply(float* x, std::int64_t rows, std::int64_t cols) const;
  // y = apply(copy of x); y may alias x.
  void forward(const float* x, std::int64_t rows, std::int64_t cols, float* y) const;
  // The gradient of forward at x: dx (written, or added to when `accumulate`) = pre_quant_scale *
  // dy, straight through the rounding; with `clip`, zero where the scaled x lies outside its amax
  // (zero_clipped_gradient).
  void backward(const float* x, const float* dy, std::int64_t rows, std::int64_t cols, bool clip, float* dx, bool accumulate) const;
};

}  // namespace mopt::quant
