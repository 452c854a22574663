#include "train/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "core/error.h"
#include "core/random.h"
#include "core/thread_pool.h"
#include "kernels/backward.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "train/qat.h"

namespace mopt::train {

namespace {

using kernels::matmul_f32;

std::vector<float>& sized(std::vector<float>& v, std::int64_t n) {
  v.resize(static_cast<std::size_t>(n));
  return v;
}

// The seeded stream of the initialization (splitmix64).
struct Random {
  std::uint64_t state;
  double uniform() { return static_cast<double>((splitmix64(state) >> 11) + 1) * 0x1.0p-53; }  // (0, 1]
  // Box-Muller: two normals per pair of uniforms.
  void normals(float* out, std::int64_t n, double std_dev) {
    for (std::int64_t i = 0; i < n; i += 2) {
      const double r = std::sqrt(-2.0 * std::log(uniform())), t = 2.0 * 3.14159265358979323846 * uniform();
      out[i] = static_cast<float>(r * std::cos(t) * std_dev);
      if (i + 1 < n) out[i + 1] = static_cast<float>(r * std::sin(t) * std_dev);
    }
  }
};

}  // namespace

std::int64_t Batch::target_count() const {
  return std::count_if(targets.begin(), targets.end(), [](std::int32_t t) { return t >= 0; });
}

void Batch::check(std::int64_t vocab, const std::string& label) const {
  if (targets.size() != tokens.size()) fail("{}: {} tokens but {} targets", label, tokens.size(), targets.size());
  if (bounds.size() < 2 || bounds.front() != 0 || bounds.back() != rows()) fail("{}: sequence bounds do not cover the {} rows", label, rows());
  for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
    if (bounds[s + 1] <= bounds[s]) fail("{}: sequence {} is empty", label, s);
  }
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    if (tokens[r] < 0 || tokens[r] >= vocab) fail("{}: token {} at row {} is outside the vocabulary of {}", label, tokens[r], r, vocab);
    if (targets[r] >= vocab) fail("{}: target {} at row {} is outside the vocabulary of {}", label, targets[r], r, vocab);
  }
}

TrainableModel::TrainableModel(io::ModelConfig config, std::vector<Parameter> params, bool gradients)
    : config_(std::move(config)), params_(std::move(params)), gradients_(gradients) {
  for (std::size_t i = 0; i < params_.size(); ++i) {
    index_.emplace(params_[i].name, static_cast<int>(i));
    if (gradients_) params_[i].grad.assign(params_[i].value.size(), 0.0f);
  }
  auto find = [&](const std::string& name, bool required) {
    const auto it = index_.find(name);
    if (it == index_.end()) {
      if (required) fail("training: the model has no parameter {}", name);
      return -1;
    }
    return it->second;
  };
  embed_ = find("model.embed_tokens.weight", true);
  final_norm_ = find("model.norm.weight", true);
  head_ = config_.tie_word_embeddings ? embed_ : find("lm_head.weight", true);
  for (std::int64_t l = 0; l < config_.num_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    LayerIndex x;
    x.input_norm = find(p + "input_layernorm.weight", true);
    x.post_norm = find(p + "post_attention_layernorm.weight", true);
    x.q_norm = find(p + "self_attn.q_norm.weight", config_.qk_norm);
    x.k_norm = find(p + "self_attn.k_norm.weight", config_.qk_norm);
    for (std::size_t i = 0; i < 7; ++i) {
      const std::string base = p + std::string(model::linear_name(model::kAllLinears[i]));
      x.weight[i] = find(base + ".weight", true);
      x.bias[i] = find(base + ".bias", false);
    }
    layers_.push_back(x);
  }
  inv_freq_ = model::rope_inv_freq(config_);
}

TrainableModel TrainableModel::from_checkpoint(const io::Checkpoint& checkpoint, bool gradients) {
  std::vector<Parameter> params;
  for (const auto& e : io::expected_tensors(checkpoint.config())) {
    const Tensor t = checkpoint.tensor(e.name);
    params.push_back({e.name, e.shape, t.to_f32(), {}, {}});
    for (const float v : params.back().value) {
      if (!std::isfinite(v)) fail("{}: tensor {} holds NaN or Inf", checkpoint.dir(), e.name);
    }
  }
  return TrainableModel(checkpoint.config(), std::move(params), gradients);
}

TrainableModel TrainableModel::initialize(const io::ModelConfig& config, std::uint64_t seed) {
  const double std_dev = config.raw.is_object() ? config.raw.value("initializer_range", 0.02) : 0.02;
  Random random{seed};
  std::vector<Parameter> params;
  for (const auto& e : io::expected_tensors(config)) {
    Parameter p{e.name, e.shape, std::vector<float>(static_cast<std::size_t>(shape_numel(e.shape))), {}, {}};
    const bool is_norm = e.name.ends_with("norm.weight");
    const bool is_bias = e.name.ends_with(".bias");
    if (is_norm) {
      std::fill(p.value.begin(), p.value.end(), 1.0f);
    } else if (!is_bias) {
      random.normals(p.value.data(), p.numel(), std_dev);
    }
    params.push_back(std::move(p));
  }
  return TrainableModel(config, std::move(params));
}

int TrainableModel::add_parameter(Parameter parameter) {
  if (index_.count(parameter.name)) fail("training: a parameter {} exists already", parameter.name);
  if (parameter.value.size() != shape_numel(parameter.shape)) fail("training: {} has the wrong size", parameter.name);
  if (gradients_) parameter.grad.assign(parameter.value.size(), 0.0f);
  const int i = static_cast<int>(params_.size());
  index_.emplace(parameter.name, i);
  params_.push_back(std::move(parameter));
  return i;
}

Parameter& TrainableModel::parameter(const std::string& name) {
  const auto it = index_.find(name);
  if (it == index_.end()) fail("training: the model has no parameter {}", name);
  return params_[static_cast<std::size_t>(it->second)];
}

const Parameter& TrainableModel::parameter(const std::string& name) const {
  return const_cast<TrainableModel*>(this)->parameter(name);
}

void TrainableModel::set_distillation(std::optional<Distillation> distillation) {
  if (distillation) {
    if (distillation->teacher == nullptr) fail("distillation needs a teacher");
    if (distillation->teacher->config().vocab_size != config_.vocab_size || distillation->teacher->config().hidden_size <= 0) {
      fail("distillation: the teacher's vocabulary ({}) is not the student's ({})", distillation->teacher->config().vocab_size, config_.vocab_size);
    }
    if (!(distillation->temperature > 0.0f)) fail("distillation: temperature {} is not positive", distillation->temperature);
    if (!(distillation->kd_weight >= 0.0f && distillation->kd_weight <= 1.0f)) fail("distillation: --kd-weight {} is not in [0, 1]", distillation->kd_weight);
  }
  distillation_ = distillation;
}

void TrainableModel::quantize_weights() {
  if (!fake_quant_) return;
  quantized_weights_.resize(params_.size());
  for (std::int64_t l = 0; l < config_.num_layers; ++l) {
    const LayerIndex& x = layers_[static_cast<std::size_t>(l)];
    for (std::size_t k = 0; k < 7; ++k) {
      if (!fake_quant_->weight_quantized(l, k)) continue;
      const auto i = static_cast<std::size_t>(x.weight[k]);
      const Parameter& p = params_[i];
      quantized_weights_[i].resize(p.value.size());
      const int a = fake_quant_->learned_scale(l, k);
      const std::span<const float> amax = a >= 0 ? std::span<const float>(params_[static_cast<std::size_t>(a)].value) : std::span<const float>();
      fake_quant_->quantize_weight(l, k, p.value.data(), p.shape[0], p.shape[1], amax, quantized_weights_[i].data());
    }
  }
}

void TrainableModel::zero_grad() {
  for (auto& p : params_) {
    float* g = p.grad.data();
    parallel_ranges(static_cast<std::int64_t>(p.grad.size()), 1 << 16, [&](std::int64_t i0, std::int64_t i1) { std::fill(g + i0, g + i1, 0.0f); });
  }
}

model::LayerParams TrainableModel::layer_params(std::int64_t layer) const {
  const LayerIndex& x = layers_[static_cast<std::size_t>(layer)];
  auto at = [&](int i) { return i >= 0 ? value(i) : nullptr; };
  model::LayerParams p{at(x.input_norm), at(x.post_norm), at(x.q_norm), at(x.k_norm), {}, {}};
  for (std::size_t i = 0; i < 7; ++i) {
    p.weight[i] = at(x.weight[i]);
    p.bias[i] = at(x.bias[i]);
    if (fake_quant_ && fake_quant_->weight_quantized(layer, i)) p.weight[i] = quantized_weights_[static_cast<std::size_t>(x.weight[i])].data();
  }
  if (fake_quant_) p.fake_quant = &fake_quant_->activations(layer);
  p.bf16_products = bf16_products_;
  return p;
}

model::LayerGrads TrainableModel::layer_grads(std::int64_t layer) {
  const LayerIndex& x = layers_[static_cast<std::size_t>(layer)];
  auto at = [&](int i) { return i >= 0 ? grad(i) : nullptr; };
  model::LayerGrads g{at(x.input_norm), at(x.post_norm), at(x.q_norm), at(x.k_norm), {}, {}, {}};
  for (std::size_t i = 0; i < 7; ++i) {
    g.weight[i] = at(x.weight[i]);
    g.bias[i] = at(x.bias[i]);
    // A fake-quantized weight's gradient goes to its own buffer first (FakeQuantization::weight_backward).
    if (fake_quant_ && parameter_grads_ && fake_quant_->weight_quantized(layer, i)) {
      g.weight[i] = quantized_grads_[static_cast<std::size_t>(x.weight[i])].data();
    }
  }
  if (linear_observer_) {
    g.observe_linear = [this, layer](std::size_t kind, const float* in_x, const float* dy, std::int64_t rows, std::int64_t in, std::int64_t out) {
      linear_observer_(layer, kind, in_x, dy, rows, in, out);
    };
  }
  return g;
}

void TrainableModel::forward_to_head(const Batch& batch, bool backward) {
  const auto& c = config_;
  batch.check(c.vocab_size, "training batch");
  const std::int64_t rows = batch.rows(), H = c.hidden_size, L = c.num_layers;
  const auto eps = static_cast<float>(c.rms_norm_eps);
  quantize_weights();

  // Embeddings.
  std::vector<float>& hidden = sized(hidden_, rows * H);
  const float* table = value(embed_);
  for (std::int64_t r = 0; r < rows; ++r) {
    std::memcpy(hidden.data() + r * H, table + static_cast<std::int64_t>(batch.tokens[static_cast<std::size_t>(r)]) * H, H * sizeof(float));
  }
  // Layers: every layer's activations kept, or (recomputing, or the forward alone) one set reused.
  const bool keep_all = backward && !recompute_;
  const std::size_t sets = keep_all ? static_cast<std::size_t>(L) : 1;
  if (saved_.size() < sets) saved_.resize(sets);
  const bool keep_inputs = backward && recompute_;
  if (keep_inputs && inputs_.size() < static_cast<std::size_t>(L)) inputs_.resize(static_cast<std::size_t>(L));
  for (std::int64_t l = 0; l < L; ++l) {
    if (keep_inputs) inputs_[static_cast<std::size_t>(l)].assign(hidden.begin(), hidden.end());
    model::decoder_layer_forward_saving(c, inv_freq_, layer_params(l), hidden.data(), rows, batch.bounds,
                                        saved_[keep_all ? static_cast<std::size_t>(l) : 0], hidden.data());
  }
  activation_bytes_ = 0;
  for (std::size_t i = 0; i < sets; ++i) activation_bytes_ += saved_[i].bytes();
  if (keep_inputs) {
    for (const auto& in : inputs_) activation_bytes_ += in.size() * sizeof(float);
  }

  // Final norm; the rows with a target.
  kernels::rmsnorm_saving(hidden.data(), value(final_norm_), rows, H, eps, sized(normed_, rows * H).data(), sized(rstd_, rows).data());
  chosen_.clear();
  for (std::int64_t r = 0; r < rows; ++r) {
    if (batch.targets[static_cast<std::size_t>(r)] >= 0) chosen_.push_back(r);
  }
}

const std::vector<float>& TrainableModel::head_inputs(const Batch& batch) {
  forward_to_head(batch, false);
  const std::int64_t H = config_.hidden_size;
  sized(head_inputs_, static_cast<std::int64_t>(chosen_.size()) * H);
  for (std::size_t i = 0; i < chosen_.size(); ++i) {
    std::memcpy(head_inputs_.data() + static_cast<std::int64_t>(i) * H, normed_.data() + chosen_[i] * H, H * sizeof(float));
  }
  return head_inputs_;
}

LossResult TrainableModel::run(const Batch& batch, float grad_scale, bool backward) {
  const auto& c = config_;
  const std::int64_t rows = batch.rows(), H = c.hidden_size, V = c.vocab_size, L = c.num_layers;
  // With distillation, the teacher's head inputs first (its own buffers; the student's stay as they are).
  const bool distill = backward && distillation_.has_value();
  const float* teacher_x = distill ? distillation_->teacher->head_inputs(batch).data() : nullptr;
  forward_to_head(batch, backward);
  std::vector<float>& hidden = hidden_;
  std::vector<float>& normed = normed_;
  std::vector<float>& rstd = rstd_;
  const std::vector<std::int64_t>& chosen = chosen_;

  // Head and loss over the rows with a target, a chunk of rows at a time so that the logits never
  // take more than ~32 MiB whatever the vocabulary.
  LossResult result;
  result.targets = static_cast<std::int64_t>(chosen.size());
  if (backward) dnormed_.assign(static_cast<std::size_t>(rows * H), 0.0f);
  std::int64_t chunk = std::max<std::int64_t>(1, (std::int64_t{8} << 20) / V);
  if (bf16_products_ && chunk > 32) chunk = chunk / 32 * 32;  // whole 32-row blocks of the AMX product
  std::vector<std::int32_t> targets;
  const float* head = value(head_);
  if (bf16_products_ && result.targets > 0) {
    head_rows_.assign(true, H, V, head, H);
    if (backward) head_columns_.assign(false, V, H, head, H);
  }
  for (std::int64_t c0 = 0; c0 < result.targets; c0 += chunk) {
    const std::int64_t n = std::min(chunk, result.targets - c0);
    float* x = sized(x_, n * H).data();
    targets.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t r = chosen[static_cast<std::size_t>(c0 + i)];
      std::memcpy(x + i * H, normed.data() + r * H, H * sizeof(float));
      targets[static_cast<std::size_t>(i)] = batch.targets[static_cast<std::size_t>(r)];
    }
    float* logits = sized(logits_, n * V).data();
    if (bf16_products_) head_rows_.multiply(false, n, x, H, logits, V, false);
    else kernels::gemm_f32(x, n, H, head, V, logits);
    if (!distill) {
      row_losses_.resize(static_cast<std::size_t>(n));
      const double ce = kernels::cross_entropy_backward(logits, targets.data(), n, V, grad_scale, row_losses_.data());
      result.loss_sum += ce;
      result.cross_entropy_sum += ce;
      for (const double l : row_losses_) result.cross_entropy_squares += l * l;
    } else {
      const Distillation& d = *distillation_;
      float* teacher_logits = sized(teacher_logits_, n * V).data();
      kernels::gemm_f32(teacher_x + c0 * H, n, H, d.teacher->head_weight(), V, teacher_logits);
      // The cross-entropy on a copy of the logits, then the distillation gradient in place, mixed.
      float* ce_grad = sized(ce_grad_, n * V).data();
      std::memcpy(ce_grad, logits, static_cast<std::size_t>(n * V) * sizeof(float));
      const double ce = kernels::cross_entropy_backward(ce_grad, targets.data(), n, V, grad_scale * (1.0f - d.kd_weight));
      const double kd = kernels::distillation_backward(logits, teacher_logits, n, V, d.temperature, grad_scale * d.kd_weight);
      if (d.kd_weight < 1.0f) {
        for (std::int64_t i = 0; i < n * V; ++i) logits[i] += ce_grad[i];
      }
      result.loss_sum += static_cast<double>(d.kd_weight) * kd + (1.0 - static_cast<double>(d.kd_weight)) * ce;
      result.cross_entropy_sum += ce;
    }
    if (!backward) continue;
    float* dx = sized(dx_, n * H).data();
    if (bf16_products_) {
      if (float* dhead = grad(head_)) kernels::matmul_bf16_operands(true, false, V, H, n, logits, V, x, H, dhead, H, true);
      head_columns_.multiply(false, n, logits, V, dx, H, false);
    } else {
      if (float* dhead = grad(head_)) matmul_f32(true, false, V, H, n, logits, V, x, H, dhead, H, true);
      matmul_f32(false, false, n, H, V, logits, V, head, H, dx, H, false);
    }
    for (std::int64_t i = 0; i < n; ++i) {
      std::memcpy(dnormed_.data() + chosen[static_cast<std::size_t>(c0 + i)] * H, dx + i * H, H * sizeof(float));
    }
  }
  if (!backward || !std::isfinite(result.loss_sum)) return result;  // the caller names the step of a NaN or Inf loss

  if (fake_quant_) {
    quantized_grads_.resize(params_.size());
    for (std::int64_t l = 0; l < L; ++l) {
      for (std::size_t k = 0; k < 7; ++k) {
        if (!fake_quant_->weight_quantized(l, k)) continue;
        const auto i = static_cast<std::size_t>(layers_[static_cast<std::size_t>(l)].weight[k]);
        quantized_grads_[i].assign(params_[i].value.size(), 0.0f);
      }
    }
  }
  std::vector<float>& dhidden = dhidden_;
  dhidden.assign(static_cast<std::size_t>(rows * H), 0.0f);
  kernels::rmsnorm_backward(hidden.data(), value(final_norm_), rstd.data(), dnormed_.data(), rows, H, dhidden.data(), grad(final_norm_));
  if (recompute_) sized(recomputed_out_, rows * H);
  for (std::int64_t l = L - 1; l >= 0; --l) {
    if (recompute_) {
      model::decoder_layer_forward_saving(c, inv_freq_, layer_params(l), inputs_[static_cast<std::size_t>(l)].data(), rows, batch.bounds,
                                          saved_[0], recomputed_out_.data());
    }
    model::decoder_layer_backward(c, inv_freq_, layer_params(l), saved_[recompute_ ? 0 : static_cast<std::size_t>(l)], rows, batch.bounds,
                                  dhidden.data(), layer_grads(l), scratch_);
  }
  if (float* dtable = grad(embed_)) kernels::embedding_backward(batch.tokens.data(), rows, dhidden.data(), H, dtable);
  if (fake_quant_ && parameter_grads_) {
    for (std::int64_t l = 0; l < L; ++l) {
      for (std::size_t k = 0; k < 7; ++k) {
        if (!fake_quant_->weight_quantized(l, k)) continue;
        const auto i = static_cast<std::size_t>(layers_[static_cast<std::size_t>(l)].weight[k]);
        Parameter& p = params_[i];
        const int a = fake_quant_->learned_scale(l, k);
        Parameter* amax = a >= 0 ? &params_[static_cast<std::size_t>(a)] : nullptr;
        fake_quant_->weight_backward(l, k, p.value.data(), p.shape[0], p.shape[1],
                                     amax ? std::span<const float>(amax->value) : std::span<const float>(), quantized_grads_[i].data(),
                                     p.grad.data(), amax ? amax->grad.data() : nullptr);
      }
    }
  }
  return result;
}

LossResult TrainableModel::forward_backward(const Batch& batch, float grad_scale) {
  if (!gradients_) fail("training: this model was loaded without gradients (a teacher)");
  return run(batch, grad_scale, true);
}

LossResult TrainableModel::loss(const Batch& batch) { return run(batch, 0.0f, false); }

LossResult TrainableModel::input_gradients(const Batch& batch, float grad_scale) {
  parameter_grads_ = false;
  try {
    const LossResult r = run(batch, grad_scale, true);
    parameter_grads_ = true;
    return r;
  } catch (...) {
    parameter_grads_ = true;
    throw;
  }
}

}  // namespace mopt::train
