// Quantization-aware training (as NVIDIA Model Optimizer does it): post-training calibration with any
// format and algorithm first (algo::quantize_checkpoint), then training with fake quantizers in the
// forward pass — weights, Linear inputs and the KV cache as the recipe says.
//
// - Static scales (weight amax, per-tensor input amax, NVFP4's global amax, the KV amax) stay frozen
//   at their calibrated values; dynamic ones (NVFP4 and MX block scales, per-token FP8) are computed
//   from the current tensor at every step.
// - The master weights stay f32; each step rounds a copy. The calibration's transforms (AWQ and
//   SmoothQuant scales folded into norms, weights smoothed or updated by GPTQ) are the training's
//   starting point; a pre-quantization scale that stays on an input is applied, not trained.
// - The backward passes the gradient straight through the rounding (the reference's default,
//   pass_through_bwd=True) or, with SteMode::clip, zeroes it where a value lies outside its static
//   amax (pass_through_bwd=False). MX formats always pass through.
// - The result is what `mopt quantize` writes for the format: the trained weights quantized under the
//   frozen scales (quantized_layer), so every exporter and engine loads it.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "model/layer_backward.h"
#include "quant/act_quant.h"
#include "quant/quantized_layer.h"
#include "quant/recipe.h"

namespace mopt::train {

class TrainableModel;

enum class SteMode { pass_through, clip };
// "pass" or "clip".
SteMode parse_ste_mode(const std::string& name);

class FakeQuantization {
 public:
  // From the calibrated layers (algo::quantize_checkpoint with keep_master_weights, in layer order)
  // of the model `model` was loaded from: the tensors the calibration replaced (scales folded into
  // norms and biases) and each quantized Linear's master weight are written into `model`; the
  // quantizers' frozen scales are kept here. Throws Error when a layer is missing or a weight's shape
  // disagrees with the model's.
  // With `learn_scales` (LSQ, the reference's `lsq` algorithm with tied amax), each integer block
  // weight's amax becomes a trained parameter of `model` ("<linear>.weight_quantizer._amax"), starting
  // from the reference's MSE search around the calibrated amax; other weights are refused.
  FakeQuantization(std::vector<quant::QuantizedLayer> layers, std::optional<quant::KvScheme> kv, SteMode ste, TrainableModel& model,
                   bool learn_scales = false);
  FakeQuantization(const FakeQuantization&) = delete;
  FakeQuantization& operator=(const FakeQuantization&) = delete;

  SteMode ste() const { return ste_; }
  // True when Linear k (kAllLinears order) of `layer` has a weight quantizer.
  bool weight_quantized(std::int64_t layer, std::size_t k) const;
  // The index in the model's parameters of the learned amax of layer's Linear k, or -1.
  int learned_scale(std::int64_t layer, std::size_t k) const;
  // wq [out, in] = the fake quantization of layer's Linear k's weight w under its frozen scales, or
  // under `learned_amax` (the model's parameter learned_scale() names) when it has one.
  void quantize_weight(std::int64_t layer, std::size_t k, const float* w, std::int64_t out, std::int64_t in,
                       std::span<const float> learned_amax, float* wq) const;
  // From gq, the gradient of the fake-quantized weight: dw += gq straight through (SteMode::clip: zero
  // where |w| exceeds its static amax); with learned scales, LSQ's dw and damax (the amax's gradient).
  void weight_backward(std::int64_t layer, std::size_t k, const float* w, std::int64_t out, std::int64_t in,
                       std::span<const float> learned_amax, const float* gq, float* dw, float* damax) const;
  // The activation quantizers of a layer, for model::LayerParams.
  const model::LayerFakeQuant& activations(std::int64_t layer) const { return layers_[static_cast<std::size_t>(layer)].fake_quant; }

  // Layer `layer` for the exporters: the weights `model` holds now, quantized under the frozen scales
  // (NVFP4 and MX block scales from the trained weights), with the calibrated input and KV scales; the
  // tensors the calibration replaced, with their trained values, in the calibration's order and dtypes.
  quant::QuantizedLayer quantized_layer(std::int64_t layer, const TrainableModel& model) const;
  std::int64_t layers() const { return static_cast<std::int64_t>(layers_.size()); }

 private:
  struct Linear {
    std::string name;
    quant::LinearScheme scheme;
    std::vector<float> weight_amax;
    float weight_amax2 = 0.0f;
    std::vector<float> input_amax, pre_quant_scale;
    int learned_amax = -1;  // the model's parameter holding the learned weight amax
    std::unique_ptr<quant::ActivationQuantizer> input;  // the input's quantizer and/or pre-quantization scale
  };
  struct Layer {
    std::array<Linear, 7> linears;
    std::optional<float> key_amax, value_amax;
    std::vector<std::pair<std::string, DType>> replaced;  // tensors the calibration changed, in its order
    std::unique_ptr<quant::ActivationQuantizer> key, value;
    model::LayerFakeQuant fake_quant;
  };
  // The global amax LSQ's NVFP4 block scales live under (the calibrated one); integer blocks have none.
  static float lsq_global_amax(const Linear& lin);

  std::vector<Layer> layers_;
  std::optional<quant::KvScheme> kv_;
  SteMode ste_;
};

}  // namespace mopt::train
