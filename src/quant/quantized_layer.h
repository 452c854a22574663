// What quantizing one decoder layer produces, handed from the calibration
// pipeline (algo/) to the exporters (export/): per Linear its scheme, the real
// codes and scales, the calibrated input amax and pre-quantization scale; the
// keys' and values' amax; tensors of the layer that were changed (e.g. norms
// a scale was folded into).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "quant/qtensor.h"
#include "quant/recipe.h"

namespace mopt::quant {

struct QuantizedLinear {
  std::string name;                       // "model.layers.3.self_attn.q_proj"
  LinearScheme scheme;                    // unquantized when !scheme.quantized()
  std::optional<QuantizedWeight> weight;  // present when quantized
  std::vector<float> input_amax;          // static input amax (per tensor / NVFP4 global); empty otherwise
  std::vector<float> pre_quant_scale;     // per input column; empty: none
  double weight_error = 0.0;              // ||dequant(W) - W|| / ||W||
};

struct QuantizedLayer {
  std::int64_t index = 0;
  std::vector<QuantizedLinear> linears;
  std::optional<float> key_amax, value_amax;
  std::vector<std::pair<std::string, Tensor>> replaced;  // full tensor name -> new contents
};

// The activation-side scale the export stores for `amax`: amax / 448 (FP8),
// amax / 127 (INT8), amax / (6 * 448) (NVFP4's global scale).
float activation_scale(const QuantizerSpec& spec, float amax);

}  // namespace mopt::quant
