#include "quant/act_quant.h"

#include <cstring>

#include "core/convert.h"
#include "core/error.h"
#include "quant/fake_quant.h"

namespace mopt::quant {

namespace {

void check_scale(const std::vector<float>& pre_quant_scale, std::int64_t cols) {
  if (!pre_quant_scale.empty() && static_cast<std::int64_t>(pre_quant_scale.size()) != cols) {
    fail("pre_quant_scale has {} values for {} columns", pre_quant_scale.size(), cols);
  }
}

}  // namespace

void ActivationQuantizer::apply(float* x, std::int64_t rows, std::int64_t cols) const { forward(x, rows, cols, x); }

void ActivationQuantizer::forward(const float* x, std::int64_t rows, std::int64_t cols, float* y) const {
  check_scale(pre_quant_scale, cols);
  if (!pre_quant_scale.empty()) {
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) y[r * cols + c] = x[r * cols + c] * pre_quant_scale[static_cast<std::size_t>(c)];
    }
  } else if (y != x) {
    std::memcpy(y, x, static_cast<std::size_t>(rows * cols) * sizeof(float));
  }
  if (spec) fake_quantize(*spec, y, rows, cols, amax, y);
}

void ActivationQuantizer::backward(const float* x, const float* dy, std::int64_t rows, std::int64_t cols, bool clip, float* dx,
                                   bool accumulate) const {
  check_scale(pre_quant_scale, cols);
  const std::int64_t n = rows * cols;
  std::vector<float> g(dy, dy + n);
  if (clip && spec) {
    std::vector<float> scaled(x, x + n);
    if (!pre_quant_scale.empty()) {
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t c = 0; c < cols; ++c) scaled[static_cast<std::size_t>(r * cols + c)] *= pre_quant_scale[static_cast<std::size_t>(c)];
      }
    }
    zero_clipped_gradient(*spec, scaled.data(), rows, cols, amax, g.data());
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const std::int64_t i = r * cols + c;
      const float v = pre_quant_scale.empty() ? g[static_cast<std::size_t>(i)] : g[static_cast<std::size_t>(i)] * pre_quant_scale[static_cast<std::size_t>(c)];
      dx[i] = accumulate ? dx[i] + v : v;
    }
  }
}

}  // namespace mopt::quant

#include "quant/quantized_layer.h"

namespace mopt::quant {

float activation_scale(const QuantizerSpec& spec, float amax) {
  switch (spec.scaling) {
    case Scaling::nvfp4: return amax / kNvfp4AmaxBound;
    default: return amax / spec.max_bound();
  }
}

}  // namespace mopt::quant
