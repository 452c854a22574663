#include "train/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <unordered_map>

#include "core/error.h"
#include "kernels/backward.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "model/llama.h"

namespace mopt::train {

namespace {

using kernels::matmul_f32;

// y [rows, out] = x [rows, in] · wᵀ (+ bias).
void linear(const float* x, std::int64_t rows, std::int64_t in, const float* w, const float* bias, std::int64_t out, float* y) {
  kernels::gemm_f32(x, rows, in, w, out, y);
  if (bias != nullptr) {
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < out; ++j) y[r * out + j] += bias[j];
    }
  }
}

// The gradients of y = x · wᵀ + b: dx (written, or added to when `accumulate`) = dy · w,
// dw += dyᵀ · x, dbias += column sums of dy.
void linear_backward(const float* x, std::int64_t rows, std::int64_t in, const float* w, std::int64_t out, const float* dy,
                     float* dx, bool accumulate, float* dw, float* dbias) {
  matmul_f32(false, false, rows, in, out, dy, out, w, in, dx, in, accumulate);
  matmul_f32(true, false, out, in, rows, dy, out, x, in, dw, in, true);
  if (dbias != nullptr) kernels::bias_backward(dy, rows, out, dbias);
}

std::vector<float>& sized(std::vector<float>& v, std::int64_t n) {
  v.resize(static_cast<std::size_t>(n));
  return v;
}

// splitmix64: the seeded stream of the initialization.
struct Random {
  std::uint64_t state;
  std::uint64_t next() {
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>((next() >> 11) + 1) * 0x1.0p-53; }  // (0, 1]
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

std::uint64_t TrainableModel::Saved::bytes() const {
  std::uint64_t n = 0;
  for (const auto* b : {&x_in, &rstd1, &n1, &q_lin, &k_lin, &rstd_q, &rstd_k, &q, &k, &v, &attn, &lse, &x_mid, &rstd2, &n2, &gate, &up, &h}) {
    n += b->size() * sizeof(float);
  }
  return n;
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
    const std::pair<int*, int*> linears[] = {{&x.q, &x.q_bias}, {&x.k, &x.k_bias}, {&x.v, &x.v_bias}, {&x.o, &x.o_bias},
                                             {&x.gate, &x.gate_bias}, {&x.up, &x.up_bias}, {&x.down, &x.down_bias}};
    const char* names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"};
    for (std::size_t i = 0; i < 7; ++i) {
      *linears[i].first = find(p + names[i] + ".weight", true);
      *linears[i].second = find(p + names[i] + ".bias", false);
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

const Parameter& TrainableModel::parameter(std::string_view name) const {
  for (const auto& p : params_) {
    if (p.name == name) return p;
  }
  fail("training: the model has no parameter {}", name);
}

void TrainableModel::zero_grad() {
  for (auto& p : params_) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
}

void TrainableModel::layer_forward(std::int64_t layer, const float* x, std::int64_t rows, std::span<const std::int64_t> bounds,
                                   Saved& s, float* out) const {
  const auto& c = config_;
  const LayerIndex& w = layers_[static_cast<std::size_t>(layer)];
  const std::int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const std::int64_t qd = nh * d, kvd = nkv * d, ff = c.intermediate_size;
  const auto eps = static_cast<float>(c.rms_norm_eps);
  auto bias = [&](int i) { return i >= 0 ? value(i) : nullptr; };

  std::vector<std::int32_t> positions(static_cast<std::size_t>(rows));
  for (std::size_t q = 0; q + 1 < bounds.size(); ++q) {
    for (std::int64_t r = bounds[q]; r < bounds[q + 1]; ++r) positions[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r - bounds[q]);
  }
  s.x_in.assign(x, x + rows * H);
  kernels::rmsnorm_saving(x, value(w.input_norm), rows, H, eps, sized(s.n1, rows * H).data(), sized(s.rstd1, rows).data());
  linear(s.n1.data(), rows, H, value(w.q), bias(w.q_bias), qd, sized(s.q, rows * qd).data());
  linear(s.n1.data(), rows, H, value(w.k), bias(w.k_bias), kvd, sized(s.k, rows * kvd).data());
  linear(s.n1.data(), rows, H, value(w.v), bias(w.v_bias), kvd, sized(s.v, rows * kvd).data());
  if (w.q_norm >= 0) {
    s.q_lin = s.q;
    s.k_lin = s.k;
    kernels::rmsnorm_saving(s.q_lin.data(), value(w.q_norm), rows * nh, d, eps, s.q.data(), sized(s.rstd_q, rows * nh).data());
    kernels::rmsnorm_saving(s.k_lin.data(), value(w.k_norm), rows * nkv, d, eps, s.k.data(), sized(s.rstd_k, rows * nkv).data());
  }
  kernels::apply_rope(s.q.data(), rows, nh, d, positions.data(), inv_freq_);
  kernels::apply_rope(s.k.data(), rows, nkv, d, positions.data(), inv_freq_);
  kernels::attention_saving(s.q.data(), s.k.data(), s.v.data(), bounds, nh, nkv, d, c.sliding_window.value_or(0),
                            sized(s.attn, rows * qd).data(), sized(s.lse, rows * nh).data());
  linear(s.attn.data(), rows, qd, value(w.o), bias(w.o_bias), H, sized(s.x_mid, rows * H).data());
  for (std::int64_t i = 0; i < rows * H; ++i) s.x_mid[static_cast<std::size_t>(i)] += x[i];
  kernels::rmsnorm_saving(s.x_mid.data(), value(w.post_norm), rows, H, eps, sized(s.n2, rows * H).data(), sized(s.rstd2, rows).data());
  linear(s.n2.data(), rows, H, value(w.gate), bias(w.gate_bias), ff, sized(s.gate, rows * ff).data());
  linear(s.n2.data(), rows, H, value(w.up), bias(w.up_bias), ff, sized(s.up, rows * ff).data());
  s.h = s.gate;
  kernels::silu_mul(s.h.data(), s.up.data(), rows * ff);
  linear(s.h.data(), rows, ff, value(w.down), bias(w.down_bias), H, out);
  for (std::int64_t i = 0; i < rows * H; ++i) out[i] += s.x_mid[static_cast<std::size_t>(i)];
}

void TrainableModel::layer_backward(std::int64_t layer, std::int64_t rows, std::span<const std::int64_t> bounds, const Saved& s,
                                    float* dhidden, Scratch& t) {
  const auto& c = config_;
  const LayerIndex& w = layers_[static_cast<std::size_t>(layer)];
  const std::int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const std::int64_t qd = nh * d, kvd = nkv * d, ff = c.intermediate_size;
  auto dbias = [&](int i) { return i >= 0 ? grad(i) : nullptr; };

  t.positions.resize(static_cast<std::size_t>(rows));
  for (std::size_t q = 0; q + 1 < bounds.size(); ++q) {
    for (std::int64_t r = bounds[q]; r < bounds[q + 1]; ++r) t.positions[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r - bounds[q]);
  }
  // MLP block: out = x_mid + down(silu(gate(n2)) * up(n2)); dhidden is d out, and d x_mid gathers into it.
  linear_backward(s.h.data(), rows, ff, value(w.down), H, dhidden, sized(t.dh, rows * ff).data(), false, grad(w.down), dbias(w.down_bias));
  kernels::silu_mul_backward(s.gate.data(), s.up.data(), t.dh.data(), rows * ff, sized(t.dgate, rows * ff).data(),
                             sized(t.dup, rows * ff).data());
  linear_backward(s.n2.data(), rows, H, value(w.gate), ff, t.dgate.data(), sized(t.dn, rows * H).data(), false, grad(w.gate),
                  dbias(w.gate_bias));
  linear_backward(s.n2.data(), rows, H, value(w.up), ff, t.dup.data(), t.dn.data(), true, grad(w.up), dbias(w.up_bias));
  kernels::rmsnorm_backward(s.x_mid.data(), value(w.post_norm), s.rstd2.data(), t.dn.data(), rows, H, dhidden, grad(w.post_norm));

  // Attention block: x_mid = x + o(attention(rope(q), rope(k), v)); dhidden is now d x_mid.
  linear_backward(s.attn.data(), rows, qd, value(w.o), H, dhidden, sized(t.dattn, rows * qd).data(), false, grad(w.o), dbias(w.o_bias));
  kernels::attention_backward(s.q.data(), s.k.data(), s.v.data(), s.attn.data(), s.lse.data(), t.dattn.data(), bounds, nh, nkv, d,
                              c.sliding_window.value_or(0), sized(t.dq, rows * qd).data(), sized(t.dk, rows * kvd).data(),
                              sized(t.dv, rows * kvd).data());
  kernels::apply_rope_inverse(t.dq.data(), rows, nh, d, t.positions.data(), inv_freq_);
  kernels::apply_rope_inverse(t.dk.data(), rows, nkv, d, t.positions.data(), inv_freq_);
  if (w.q_norm >= 0) {
    sized(t.dlin, rows * qd).assign(static_cast<std::size_t>(rows * qd), 0.0f);
    kernels::rmsnorm_backward(s.q_lin.data(), value(w.q_norm), s.rstd_q.data(), t.dq.data(), rows * nh, d, t.dlin.data(), grad(w.q_norm));
    std::swap(t.dq, t.dlin);
    t.dlin.assign(static_cast<std::size_t>(rows * kvd), 0.0f);
    kernels::rmsnorm_backward(s.k_lin.data(), value(w.k_norm), s.rstd_k.data(), t.dk.data(), rows * nkv, d, t.dlin.data(), grad(w.k_norm));
    std::swap(t.dk, t.dlin);
  }
  linear_backward(s.n1.data(), rows, H, value(w.q), qd, t.dq.data(), sized(t.dn, rows * H).data(), false, grad(w.q), dbias(w.q_bias));
  linear_backward(s.n1.data(), rows, H, value(w.k), kvd, t.dk.data(), t.dn.data(), true, grad(w.k), dbias(w.k_bias));
  linear_backward(s.n1.data(), rows, H, value(w.v), kvd, t.dv.data(), t.dn.data(), true, grad(w.v), dbias(w.v_bias));
  kernels::rmsnorm_backward(s.x_in.data(), value(w.input_norm), s.rstd1.data(), t.dn.data(), rows, H, dhidden, grad(w.input_norm));
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
    layer_forward(l, hidden.data(), rows, batch.bounds, saved_[keep_all ? static_cast<std::size_t>(l) : 0], hidden.data());
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
  if (recompute_) sized(unused_, rows * H);
  for (std::int64_t l = L - 1; l >= 0; --l) {
    if (recompute_) layer_forward(l, inputs_[static_cast<std::size_t>(l)].data(), rows, batch.bounds, saved_[0], unused_.data());
    layer_backward(l, rows, batch.bounds, saved_[keep_all ? static_cast<std::size_t>(l) : 0], dhidden.data(), scratch_);
  }
  kernels::embedding_backward(batch.tokens.data(), rows, dhidden.data(), H, grad(embed_));
  return result;
}

LossResult TrainableModel::forward_backward(const Batch& batch, float grad_scale) { return run(batch, grad_scale, true); }

LossResult TrainableModel::loss(const Batch& batch) { return run(batch, 0.0f, false); }

}  // namespace mopt::train
