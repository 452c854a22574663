#include "quant/act_quant.h"

#include "core/error.h"
#include "quant/fake_quant.h"

namespace mopt::quant {

void ActivationQuantizer::apply(float* x, std::int64_t rows, std::int64_t cols) const {
  if (!pre_quant_scale.empty()) {
    if (static_cast<std::int64_t>(pre_quant_scale.size()) != cols) {
      fail("pre_quant_scale has {} values for {} columns", pre_quant_scale.size(), cols);
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t c = 0; c < cols; ++c) x[r * cols + c] *= pre_quant_scale[static_cast<std::size_t>(c)];
    }
  }
  fake_quantize(spec, x, rows, cols, amax, x);
}

}  // namespace mopt::quant

#include "quant/quantized_layer.h"

namespace mopt::quant {

float activation_scale(const QuantizerSpec& spec, float amax) {
  switch (spec.scaling) {
    case Scaling::nvfp4: return amax / (6.0f * 448.0f);
    default: return amax / spec.max_bound();
  }
}

}  // namespace mopt::quant
