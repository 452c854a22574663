#include "train/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "core/error.h"
#include "core/random.h"
#include "kernels/backward.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "model/llama.h"

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

TrainableModel::TrainableModel(io::ModelConfig config, std::vector<Parameter> params)
    : config_(std::move(config)), params_(std::move(params)) {
  std::unordered_map<std::string, int> index;
  for (std::size_t i = 0; i < params_.size(); ++i) {
    index.emplace(params_[i].name, static_cast<int>(i));
    params_[i].grad.assign(params_[i].value.size(), 0.0f);
  }
  auto find = [&](const std::string& name, bool required) {
    const auto it = index.find(name);
    if (it == index.end()) {
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

TrainableModel TrainableModel::from_checkpoint(const io::Checkpoint& checkpoint) {
  std::vector<Parameter> params;
  for (const auto& e : io::expected_tensors(checkpoint.config())) {
    const Tensor t = checkpoint.tensor(e.name);
    params.push_back({e.name, e.shape, t.to_f32(), {}});
    for (const float v : params.back().value) {
      if (!std::isfinite(v)) fail("{}: tensor {} holds NaN or Inf", checkpoint.dir(), e.name);
    }
  }
  return TrainableModel(checkpoint.config(), std::move(params));
}

TrainableModel TrainableModel::initialize(const io::ModelConfig& config, std::uint64_t seed) {
  const double std_dev = config.raw.is_object() ? config.raw.value("initializer_range", 0.02) : 0.02;
  Random random{seed};
  std::vector<Parameter> params;
  for (const auto& e : io::expected_tensors(config)) {
    Parameter p{e.name, e.shape, std::vector<float>(static_cast<std::size_t>(shape_numel(e.shape))), {}};
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

void TrainableModel::zero_grad() {
  for (auto& p : params_) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
}

model::LayerParams TrainableModel::layer_params(std::int64_t layer) const {
  const LayerIndex& x = layers_[static_cast<std::size_t>(layer)];
  auto at = [&](int i) { return i >= 0 ? value(i) : nullptr; };
  model::LayerParams p{at(x.input_norm), at(x.post_norm), at(x.q_norm), at(x.k_norm), {}, {}};
  for (std::size_t i = 0; i < 7; ++i) {
    p.weight[i] = at(x.weight[i]);
    p.bias[i] = at(x.bias[i]);
  }
  return p;
}

model::LayerGrads TrainableModel::layer_grads(std::int64_t layer) {
  const LayerIndex& x = layers_[static_cast<std::size_t>(layer)];
  auto at = [&](int i) { return i >= 0 ? grad(i) : nullptr; };
  model::LayerGrads g{at(x.input_norm), at(x.post_norm), at(x.q_norm), at(x.k_norm), {}, {}};
  for (std::size_t i = 0; i < 7; ++i) {
    g.weight[i] = at(x.weight[i]);
    g.bias[i] = at(x.bias[i]);
  }
  return g;
}

LossResult TrainableModel::run(const Batch& batch, float grad_scale, bool backward) {
  const auto& c = config_;
  batch.check(c.vocab_size, "training batch");
  const std::int64_t rows = batch.rows(), H = c.hidden_size, V = c.vocab_size, L = c.num_layers;
  const auto eps = static_cast<float>(c.rms_norm_eps);

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

  // Final norm, head and loss over the rows with a target, a chunk of rows at a time so that the
  // logits never take more than ~32 MiB whatever the vocabulary.
  std::vector<float>& normed = sized(normed_, rows * H);
  std::vector<float>& rstd = sized(rstd_, rows);
  kernels::rmsnorm_saving(hidden.data(), value(final_norm_), rows, H, eps, normed.data(), rstd.data());
  std::vector<std::int64_t> chosen;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (batch.targets[static_cast<std::size_t>(r)] >= 0) chosen.push_back(r);
  }
  LossResult result;
  result.targets = static_cast<std::int64_t>(chosen.size());
  if (backward) dnormed_.assign(static_cast<std::size_t>(rows * H), 0.0f);
  const std::int64_t chunk = std::max<std::int64_t>(1, (std::int64_t{8} << 20) / V);
  std::vector<std::int32_t> targets;
  const float* head = value(head_);
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
    kernels::gemm_f32(x, n, H, head, V, logits);
    result.loss_sum += kernels::cross_entropy_backward(logits, targets.data(), n, V, grad_scale);
    if (!backward) continue;
    matmul_f32(true, false, V, H, n, logits, V, x, H, grad(head_), H, true);
    float* dx = sized(dx_, n * H).data();
    matmul_f32(false, false, n, H, V, logits, V, head, H, dx, H, false);
    for (std::int64_t i = 0; i < n; ++i) {
      std::memcpy(dnormed_.data() + chosen[static_cast<std::size_t>(c0 + i)] * H, dx + i * H, H * sizeof(float));
    }
  }
  if (!backward || !std::isfinite(result.loss_sum)) return result;  // the caller names the step of a NaN or Inf loss

  std::vector<float>& dhidden = dhidden_;
  dhidden.assign(static_cast<std::size_t>(rows * H), 0.0f);
  kernels::rmsnorm_backward(hidden.data(), value(final_norm_), rstd.data(), dnormed_.data(), rows, H, dhidden.data(), grad(final_norm_));
  if (recompute_) sized(recomputed_out_, rows * H);
  for (std::int64_t l = L - 1; l >= 0; --l) {
    if (recompute_) {
      model::decoder_layer_forward_saving(c, inv_freq_, layer_params(l), inputs_[static_cast<std::size_t>(l)].data(), rows, batch.bounds,
                                          saved_[0], recomputed_out_.data());
    }
    model::decoder_layer_backward(c, inv_freq_, layer_params(l), saved_[keep_all ? static_cast<std::size_t>(l) : 0], rows, batch.bounds,
                                  dhidden.data(), layer_grads(l), scratch_);
  }
  kernels::embedding_backward(batch.tokens.data(), rows, dhidden.data(), H, grad(embed_));
  return result;
}

LossResult TrainableModel::forward_backward(const Batch& batch, float grad_scale) { return run(batch, grad_scale, true); }

LossResult TrainableModel::loss(const Batch& batch) { return run(batch, 0.0f, false); }

}  // namespace mopt::train
