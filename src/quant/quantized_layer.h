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
  // Scales folded out of the Linear into its neighbours (the export stores them there): per input
  // column, the factor the operation before it (a norm, or v_proj's/up_proj's rows) now multiplies its
  // input by; per output row, the factor its outputs now carry for the Linear after it. The Linear
  // applied to x ⊙ folded_input_scale, divided by folded_output_scale, stands for the original one.
  // Empty: none.
  std::vector<float> folded_input_scale;
  std::vector<float> folded_output_scale;
  double weight_error = 0.0;              // ||dequant(W) - W|| / ||W||
  // The weight's static scales: amax as compute_amax lays it out (NVFP4: the global amax; clipped by
  // AWQ's search), and W4A8's second-stage amax.
  std::vector<float> weight_amax;
  float weight_amax2 = 0.0f;
  // Kept only when asked (algo::PtqOptions::keep_master_weights; quantization-aware training starts
  // from it): [out, in] the f32 values the codes quantize (smoothed, or GPTQ's updated weights).
  std::vector<float> master_weight;
  // [out, in] 1 = kept, 0 = pruned, when the Linear was pruned to 2:4 (its weight, quantized or in
  // QuantizedLayer::replaced, is zero where the mask is); empty: dense.
  std::vector<std::uint8_t> sparsity_mask;
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
