#include "train/qat.h"

#include <cmath>

#include "core/error.h"
#include "model/llama.h"
#include "quant/fake_quant.h"
#include "quant/qtensor.h"
#include "train/model.h"

namespace mopt::train {

SteMode parse_ste_mode(const std::string& name) {
  if (name == "pass") return SteMode::pass_through;
  if (name == "clip") return SteMode::clip;
  fail("--ste {}: pass (the gradient straight through the rounding) or clip (zero where a value exceeds its amax)", name);
}

float FakeQuantization::lsq_global_amax(const Linear& lin) {
  return lin.scheme.weight->scaling == quant::Scaling::nvfp4 ? lin.weight_amax.at(0) : 0.0f;
}

FakeQuantization::FakeQuantization(std::vector<quant::QuantizedLayer> layers, std::optional<quant::KvScheme> kv, SteMode ste,
                                   TrainableModel& model, bool learn_scales)
    : kv_(std::move(kv)), ste_(ste) {
  const auto& c = model.config();
  if (static_cast<std::int64_t>(layers.size()) != c.num_layers) {
    fail("quantization-aware training: the calibration gave {} layers for a model of {}", layers.size(), c.num_layers);
  }
  layers_.resize(layers.size());
  for (std::size_t l = 0; l < layers.size(); ++l) {
    quant::QuantizedLayer& ql = layers[l];
    if (ql.index != static_cast<std::int64_t>(l)) fail("quantization-aware training: calibrated layer {} arrived as layer {}", ql.index, l);
    if (ql.linears.size() != 7) fail("quantization-aware training: layer {} has {} Linears, not 7", l, ql.linears.size());
    Layer& layer = layers_[l];
    layer.fake_quant.clip = ste_ == SteMode::clip;
    for (auto& [name, tensor] : ql.replaced) {
      Parameter& p = model.parameter(name);
      if (tensor.shape() != p.shape) fail("quantization-aware training: calibration's {} does not have the model's shape", name);
      p.value = tensor.to_f32();
      layer.replaced.emplace_back(name, tensor.dtype());
    }
    for (std::size_t k = 0; k < 7; ++k) {
      quant::QuantizedLinear& q = ql.linears[k];
      Linear& lin = layer.linears[k];
      lin.name = q.name;
      lin.scheme = q.scheme;
      if (!q.sparsity_mask.empty()) {  // 2:4: the pruned weights stay zero (Parameter::mask)
        Parameter& w = model.parameter(q.name + ".weight");
        if (q.sparsity_mask.size() != w.value.size()) fail("sparse training: {} has a mask of {} values for a weight of {}", q.name, q.sparsity_mask.size(), w.value.size());
        w.mask = std::move(q.sparsity_mask);
      }
      if (!q.scheme.quantized()) continue;
      Parameter& w = model.parameter(q.name + ".weight");
      if (q.master_weight.size() != w.value.size()) {
        fail("quantization-aware training: {} has {} calibrated weights for a weight of {} (was keep_master_weights set?)", q.name,
             q.master_weight.size(), w.value.size());
      }
      w.value = std::move(q.master_weight);
      if (!w.mask.empty()) {
        for (std::size_t i = 0; i < w.value.size(); ++i) {
          if (w.mask[i] == 0 && w.value[i] != 0.0f) fail("sparse training: {}'s calibrated weight is not zero where its mask prunes", q.name);
        }
      }
      lin.weight_amax = std::move(q.weight_amax);
      if (learn_scales) {
        const quant::QuantizerSpec& spec = *q.scheme.weight;
        if (!quant::supports_learned_scales(spec)) {
          fail("--learn-scales: {} is quantized as {}; learned scales are for integer weights in blocks (int4_rtn, int4_awq, int8 blocks) and NVFP4 (nvfp4, nvfp4_awq)",
               q.name, spec.describe());
        }
        std::vector<float> start = with_context(q.name, [&] { return quant::lsq_initial_amax(spec, w.value.data(), w.shape[0], w.shape[1], lin.weight_amax); });
        const auto n = static_cast<std::int64_t>(start.size());
        lin.learned_amax = model.add_parameter({q.name + ".weight_quantizer._amax", {n}, std::move(start), {}, {}});
      }
      lin.weight_amax2 = q.weight_amax2;
      lin.input_amax = std::move(q.input_amax);
      lin.pre_quant_scale = std::move(q.pre_quant_scale);
      if (q.scheme.input || !lin.pre_quant_scale.empty()) {
        lin.input = std::make_unique<quant::ActivationQuantizer>(quant::ActivationQuantizer{q.scheme.input, lin.input_amax, lin.pre_quant_scale});
        layer.fake_quant.input[k] = lin.input.get();
      }
    }
    layer.key_amax = ql.key_amax;
    layer.value_amax = ql.value_amax;
    if (kv_ && ql.key_amax && ql.value_amax) {
      layer.key = std::make_unique<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv_->spec, {*ql.key_amax}, {}});
      layer.value = std::make_unique<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv_->spec, {*ql.value_amax}, {}});
      layer.fake_quant.key = layer.key.get();
      layer.fake_quant.value = layer.value.get();
    }
  }
}

bool FakeQuantization::weight_quantized(std::int64_t layer, std::size_t k) const {
  return layers_[static_cast<std::size_t>(layer)].linears[k].scheme.quantized();
}

int FakeQuantization::learned_scale(std::int64_t layer, std::size_t k) const {
  return layers_[static_cast<std::size_t>(layer)].linears[k].learned_amax;
}

void FakeQuantization::quantize_weight(std::int64_t layer, std::size_t k, const float* w, std::int64_t out, std::int64_t in,
                                       std::span<const float> learned_amax, float* wq) const {
  const Linear& lin = layers_[static_cast<std::size_t>(layer)].linears[k];
  const quant::QuantizerSpec& spec = *lin.scheme.weight;
  if (lin.learned_amax >= 0) {
    with_context(lin.name, [&] { quant::lsq_forward(spec, w, out, in, learned_amax, lsq_global_amax(lin), wq); });
    return;
  }
  if (spec.fp8_second_stage) {
    // W4A8: INT4 blocks, then FP8 per tensor; the export's arithmetic is the definition of the two stages.
    const quant::QuantizedWeight q = quant::quantize_weight(spec, w, out, in, lin.weight_amax, lin.weight_amax2);
    const std::vector<float> d = quant::dequantize_weight(spec, q, out, in);
    std::copy(d.begin(), d.end(), wq);
    return;
  }
  with_context(lin.name, [&] { quant::fake_quantize(spec, w, out, in, lin.weight_amax, wq); });
}

void FakeQuantization::weight_backward(std::int64_t layer, std::size_t k, const float* w, std::int64_t out, std::int64_t in,
                                       std::span<const float> learned_amax, const float* gq, float* dw, float* damax) const {
  const Linear& lin = layers_[static_cast<std::size_t>(layer)].linears[k];
  const std::int64_t n = out * in;
  if (lin.learned_amax >= 0) {
    quant::lsq_backward(*lin.scheme.weight, w, out, in, learned_amax, lsq_global_amax(lin), gq, dw, damax);
    return;
  }
  if (ste_ == SteMode::clip) {
    std::vector<float> g(gq, gq + n);
    quant::zero_clipped_gradient(*lin.scheme.weight, w, out, in, lin.weight_amax, g.data());
    for (std::int64_t i = 0; i < n; ++i) dw[i] += g[static_cast<std::size_t>(i)];
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) dw[i] += gq[i];
}

quant::QuantizedLayer FakeQuantization::quantized_layer(std::int64_t index, const TrainableModel& model) const {
  const Layer& layer = layers_[static_cast<std::size_t>(index)];
  quant::QuantizedLayer ql;
  ql.index = index;
  for (std::size_t k = 0; k < 7; ++k) {
    const Linear& lin = layer.linears[k];
    quant::QuantizedLinear q;
    q.name = lin.name;
    q.scheme = lin.scheme;
    if (lin.scheme.quantized()) {
      const Parameter& w = model.parameter(lin.name + ".weight");
      const std::int64_t out = w.shape[0], in = w.shape[1];
      // Integer blocks export their learned amax as the weight amax. NVFP4 keeps its global amax and
      // gives each block 6 x its learned scale: the export's FP8 rounding of that amax is the learned
      // scale's own code (the ratio lies within a few ulps of it), so the model written is the one trained.
      std::vector<float> amax = lin.weight_amax, block_amax;
      if (lin.learned_amax >= 0) {
        const std::vector<float>& learned = model.parameters()[static_cast<std::size_t>(lin.learned_amax)].value;
        if (lin.scheme.weight->scaling == quant::Scaling::nvfp4) {
          for (const float a : learned) block_amax.push_back(6.0f * quant::nvfp4_lsq_scale(a, lsq_global_amax(lin)));
        } else {
          amax = learned;
        }
      }
      q.weight = with_context(lin.name, [&] {
        return quant::quantize_weight(*lin.scheme.weight, w.value.data(), out, in, amax, lin.weight_amax2, block_amax);
      });
      q.weight_error = quant::relative_error(quant::dequantize_weight(*lin.scheme.weight, *q.weight, out, in), w.value);
      q.weight_amax = std::move(amax);
      q.weight_amax2 = lin.weight_amax2;
      q.input_amax = lin.input_amax;
      q.pre_quant_scale = lin.pre_quant_scale;
    }
    ql.linears.push_back(std::move(q));
  }
  ql.key_amax = layer.key_amax;
  ql.value_amax = layer.value_amax;
  for (const auto& [name, dtype] : layer.replaced) {
    const Parameter& p = model.parameter(name);
    ql.replaced.emplace_back(name, Tensor::from_f32(p.value, p.shape).to(dtype));
  }
  return ql;
}

}  // namespace mopt::train
