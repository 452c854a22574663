#include "model/llama.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numbers>

#include "core/convert.h"
#include "core/error.h"
#include "kernels/linear.h"
#include "kernels/ops.h"

namespace mopt::model {

namespace fs = std::filesystem;

std::string_view linear_name(LinearKind kind) {
  switch (kind) {
    case LinearKind::q: return "self_attn.q_proj";
    case LinearKind::k: return "self_attn.k_proj";
    case LinearKind::v: return "self_attn.v_proj";
    case LinearKind::o: return "self_attn.o_proj";
    case LinearKind::gate: return "mlp.gate_proj";
    case LinearKind::up: return "mlp.up_proj";
    case LinearKind::down: return "mlp.down_proj";
  }
  return "?";
}

Linear& LayerWeights::linear(LinearKind kind) {
  return const_cast<Linear&>(static_cast<const LayerWeights*>(this)->linear(kind));
}

const Linear& LayerWeights::linear(LinearKind kind) const {
  switch (kind) {
    case LinearKind::q: return q;
    case LinearKind::k: return k;
    case LinearKind::v: return v;
    case LinearKind::o: return o;
    case LinearKind::gate: return gate;
    case LinearKind::up: return up;
    case LinearKind::down: return down;
  }
  fail("unknown linear kind");
}

LayerWeights load_layer(const io::Checkpoint& ckpt, std::int64_t index) {
  const std::string p = "model.layers." + std::to_string(index) + ".";
  const auto& store = ckpt.tensors();
  auto f32 = [&](const std::string& name) { return store.tensor(p + name).to(DType::F32); };
  LayerWeights w;
  w.input_norm = f32("input_layernorm.weight");
  w.post_attention_norm = f32("post_attention_layernorm.weight");
  if (ckpt.config().qk_norm) {
    w.q_norm = f32("self_attn.q_norm.weight");
    w.k_norm = f32("self_attn.k_norm.weight");
  }
  for (const LinearKind kind : kAllLinears) {
    const std::string base = p + std::string(linear_name(kind));
    Linear& l = w.linear(kind);
    // A compressed-tensors checkpoint has weight_packed instead; its reader fills the weight in.
    if (store.contains(base + ".weight") || !store.contains(base + ".weight_packed")) l.weight = store.tensor(base + ".weight");
    if (store.contains(base + ".bias")) l.bias = store.tensor(base + ".bias").to(DType::F32);
  }
  return w;
}

KvCache::KvCache(const io::ModelConfig& c, std::int64_t slots, std::int64_t max_tokens)
    : layers_(c.num_layers), slots_(slots), max_tokens_(max_tokens), kv_dim_(c.num_kv_heads * c.head_dim) {
  if (slots <= 0 || max_tokens <= 0) fail("KV cache needs at least one slot and one token");
  data_.assign(static_cast<std::size_t>(2 * layers_ * slots_ * max_tokens_ * kv_dim_), 0.0f);
}

float* KvCache::keys(std::int64_t layer, std::int64_t slot) {
  return data_.data() + ((layer * slots_ + slot) * 2) * max_tokens_ * kv_dim_;
}

float* KvCache::values(std::int64_t layer, std::int64_t slot) {
  return data_.data() + ((layer * slots_ + slot) * 2 + 1) * max_tokens_ * kv_dim_;
}

void Workspace::reserve(const io::ModelConfig& c, std::int64_t rows) {
  auto grow = [](std::vector<float>& buffer, std::int64_t n) {
    if (buffer.size() < static_cast<std::size_t>(n)) buffer.resize(static_cast<std::size_t>(n));
  };
  grow(normed, rows * c.hidden_size);
  grow(q, rows * c.num_heads * c.head_dim);
  grow(k, rows * c.num_kv_heads * c.head_dim);
  grow(v, rows * c.num_kv_heads * c.head_dim);
  grow(attn, rows * c.num_heads * c.head_dim);
  grow(proj, rows * c.hidden_size);
  grow(gate, rows * c.intermediate_size);
  grow(up, rows * c.intermediate_size);
  if (positions.size() < static_cast<std::size_t>(rows)) positions.resize(static_cast<std::size_t>(rows));
}

std::vector<float> rope_inv_freq(const io::ModelConfig& config) {
  const std::int64_t rotary_dim = config.head_dim;
  const auto& scaling = config.rope_scaling;
  std::vector<float> inv(static_cast<std::size_t>(rotary_dim / 2));
  const auto base = static_cast<float>(config.rope_theta);
  for (std::size_t i = 0; i < inv.size(); ++i) {
    // transformers: 1 / base ** (arange(0, dim, 2).float() / dim), all in f32.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(rotary_dim);
    inv[i] = 1.0f / std::pow(base, exponent);
  }
  switch (scaling.type) {
    case io::RopeScalingType::none:
      break;
    case io::RopeScalingType::linear:
      for (auto& f : inv) f /= static_cast<float>(scaling.factor);
      break;
    case io::RopeScalingType::llama3: {
      const auto factor = static_cast<float>(scaling.factor);
      const auto low = static_cast<float>(scaling.low_freq_factor);
      const auto high = static_cast<float>(scaling.high_freq_factor);
      const auto old_ctx = static_cast<float>(scaling.original_max_position_embeddings);
      const float low_wavelen = old_ctx / low;
      const float high_wavelen = old_ctx / high;
      for (auto& f : inv) {
        const float wavelen = 2.0f * std::numbers::pi_v<float> / f;
        float scaled = wavelen > low_wavelen ? f / factor : f;
        if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
          const float smooth = (old_ctx / wavelen - low) / (high - low);
          scaled = (1 - smooth) * scaled / factor + smooth * scaled;
        }
        f = scaled;
      }
      break;
    }
  }
  return inv;
}

namespace {

void linear(const Linear& l, const float* x, std::int64_t rows, float* y, Workspace& ws) {
  if (l.input_transform) {
    const auto cols = l.weight.rank() == 2 ? l.weight.dim(1) : 0;
    const auto n = static_cast<std::size_t>(rows * cols);
    if (ws.transformed.size() < n) ws.transformed.resize(n);
    std::copy(x, x + n, ws.transformed.data());
    l.input_transform(ws.transformed.data(), rows, cols);
    x = ws.transformed.data();
  }
  kernels::linear_forward(x, rows, l.weight, l.bias ? &*l.bias : nullptr, y);
}

}  // namespace

void decoder_layer_forward(const io::ModelConfig& c, const std::vector<float>& inv_freq, std::int64_t layer,
                           const LayerWeights& w, float* hidden, std::int64_t rows, std::span<const SequenceSpan> batch,
                           KvCache* cache, Workspace& ws, LayerObserver* observer) {
  ws.reserve(c, rows);
  const std::int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const std::int64_t q_dim = nh * d, kv_dim = nkv * d, ff = c.intermediate_size;
  const auto eps = static_cast<float>(c.rms_norm_eps);

  for (const auto& s : batch) {
    for (std::int64_t t = 0; t < s.length; ++t) ws.positions[static_cast<std::size_t>(s.offset + t)] = static_cast<std::int32_t>(s.start_position + t);
  }

  // Attention block.
  kernels::rmsnorm(hidden, w.input_norm.data<float>(), rows, H, eps, ws.normed.data());
  if (observer) {
    for (const auto kind : {LinearKind::q, LinearKind::k, LinearKind::v}) observer->linear_input(layer, kind, ws.normed.data(), rows, H);
  }
  linear(w.q, ws.normed.data(), rows, ws.q.data(), ws);
  linear(w.k, ws.normed.data(), rows, ws.k.data(), ws);
  linear(w.v, ws.normed.data(), rows, ws.v.data(), ws);
  if (w.q_norm) {
    kernels::rmsnorm(ws.q.data(), w.q_norm->data<float>(), rows * nh, d, eps, ws.q.data());
    kernels::rmsnorm(ws.k.data(), w.k_norm->data<float>(), rows * nkv, d, eps, ws.k.data());
  }
  kernels::apply_rope(ws.q.data(), rows, nh, d, ws.positions.data(), inv_freq);
  kernels::apply_rope(ws.k.data(), rows, nkv, d, ws.positions.data(), inv_freq);
  if (observer) observer->key_value(layer, ws.k.data(), ws.v.data(), rows, kv_dim);
  if (w.key_transform) w.key_transform(ws.k.data(), rows, kv_dim);
  if (w.value_transform) w.value_transform(ws.v.data(), rows, kv_dim);

  const std::int64_t window = c.sliding_window.value_or(0);
  for (const auto& s : batch) {
    const float* q = ws.q.data() + s.offset * q_dim;
    const std::int32_t* pos = ws.positions.data() + s.offset;
    float* out = ws.attn.data() + s.offset * q_dim;
    if (cache != nullptr) {
      const std::int64_t end = s.start_position + s.length;
      if (end > cache->max_tokens()) fail("sequence of {} tokens exceeds the KV cache of {}", end, cache->max_tokens());
      if (s.cache_slot < 0 || s.cache_slot >= cache->slots()) fail("KV cache slot {} out of range", s.cache_slot);
      float* kc = cache->keys(layer, s.cache_slot);
      float* vc = cache->values(layer, s.cache_slot);
      std::memcpy(kc + s.start_position * kv_dim, ws.k.data() + s.offset * kv_dim, static_cast<std::size_t>(s.length * kv_dim) * sizeof(float));
      std::memcpy(vc + s.start_position * kv_dim, ws.v.data() + s.offset * kv_dim, static_cast<std::size_t>(s.length * kv_dim) * sizeof(float));
      kernels::attention(q, s.length, pos, kc, vc, end, nh, nkv, d, window, out);
    } else {
      if (s.start_position != 0) fail("without a KV cache every sequence must start at position 0");
      kernels::attention(q, s.length, pos, ws.k.data() + s.offset * kv_dim, ws.v.data() + s.offset * kv_dim, s.length, nh,
                         nkv, d, window, out);
    }
  }
  if (observer) observer->linear_input(layer, LinearKind::o, ws.attn.data(), rows, q_dim);
  linear(w.o, ws.attn.data(), rows, ws.proj.data(), ws);
  for (std::int64_t i = 0; i < rows * H; ++i) hidden[i] += ws.proj[static_cast<std::size_t>(i)];

  // MLP block.
  kernels::rmsnorm(hidden, w.post_attention_norm.data<float>(), rows, H, eps, ws.normed.data());
  if (observer) {
    observer->linear_input(layer, LinearKind::gate, ws.normed.data(), rows, H);
    observer->linear_input(layer, LinearKind::up, ws.normed.data(), rows, H);
  }
  linear(w.gate, ws.normed.data(), rows, ws.gate.data(), ws);
  linear(w.up, ws.normed.data(), rows, ws.up.data(), ws);
  kernels::silu_mul(ws.gate.data(), ws.up.data(), rows * ff);
  if (observer) observer->linear_input(layer, LinearKind::down, ws.gate.data(), rows, ff);
  linear(w.down, ws.gate.data(), rows, ws.proj.data(), ws);
  for (std::int64_t i = 0; i < rows * H; ++i) hidden[i] += ws.proj[static_cast<std::size_t>(i)];
}

Model Model::load(const std::string& dir) { return load(dir, LoadOptions{}); }

Model Model::load(const std::string& dir, const LoadOptions& options) {
  Model m;
  m.checkpoint_ = std::make_shared<io::Checkpoint>(
      io::Checkpoint::open(dir, options.quantized ? io::CheckpointLayout::quantized : io::CheckpointLayout::plain));
  const auto& c = m.checkpoint_->config();
  const auto& store = m.checkpoint_->tensors();
  m.embed_tokens_ = store.tensor("model.embed_tokens.weight");
  m.final_norm_ = store.tensor("model.norm.weight").to(DType::F32);
  m.lm_head_ = c.tie_word_embeddings ? m.embed_tokens_ : store.tensor("lm_head.weight");
  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    m.layers_.push_back(options.layer_loader ? options.layer_loader(*m.checkpoint_, i) : load_layer(*m.checkpoint_, i));
  }
  m.inv_freq_ = rope_inv_freq(c);
  if (fs::exists(fs::path(dir) / "tokenizer.json")) m.tokenizer_ = io::Tokenizer::load(dir);
  return m;
}

const io::Tokenizer& Model::require_tokenizer() const {
  if (!tokenizer_) fail("{}: no tokenizer.json beside the model", checkpoint_->dir());
  return *tokenizer_;
}

std::uint64_t Model::weight_bytes() const {
  std::uint64_t n = 0;
  for (const auto& loc : checkpoint_->tensors().all()) n += loc.entry->end - loc.entry->begin;
  return n;
}

void Model::embed(std::span<const std::int32_t> tokens, float* out) const {
  const std::int64_t H = config().hidden_size;
  const std::int64_t vocab = embed_tokens_.dim(0);
  const auto* base = reinterpret_cast<const std::uint8_t*>(embed_tokens_.bytes().data());
  const std::int64_t row_bytes = H * dtype_bits(embed_tokens_.dtype()) / 8;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) fail("token id {} is outside the embedding table ({} rows)", tokens[i], vocab);
    convert_to_f32(embed_tokens_.dtype(), base + tokens[i] * row_bytes, out + static_cast<std::int64_t>(i) * H, static_cast<std::size_t>(H));
  }
}

void Model::head(const float* hidden, std::span<const std::int64_t> rows, float* logits) const {
  const auto& c = config();
  const std::int64_t H = c.hidden_size;
  std::vector<float>& normed = workspace_.head;
  if (normed.size() < rows.size() * static_cast<std::size_t>(H)) normed.resize(rows.size() * static_cast<std::size_t>(H));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    kernels::rmsnorm(hidden + rows[i] * H, final_norm_.data<float>(), 1, H, static_cast<float>(c.rms_norm_eps), normed.data() + i * static_cast<std::size_t>(H));
  }
  kernels::linear_forward(normed.data(), static_cast<std::int64_t>(rows.size()), lm_head_, nullptr, logits);
}

void Model::forward(std::span<const std::int32_t> tokens, std::span<const SequenceSpan> batch, KvCache* cache, LogitsFor which,
                    std::vector<float>& logits, LayerObserver* observer) const {
  const auto& c = config();
  const auto rows = static_cast<std::int64_t>(tokens.size());
  std::int64_t covered = 0;
  for (const auto& s : batch) covered += s.length;
  if (covered != rows) fail("batch spans cover {} rows but {} tokens were given", covered, rows);
  hidden_.resize(static_cast<std::size_t>(rows * c.hidden_size));
  embed(tokens, hidden_.data());
  for (std::int64_t l = 0; l < num_layers(); ++l) {
    decoder_layer_forward(c, inv_freq_, l, layers_[static_cast<std::size_t>(l)], hidden_.data(), rows, batch, cache, workspace_, observer);
  }
  std::vector<std::int64_t>& chosen = workspace_.chosen_rows;
  chosen.clear();
  if (which == LogitsFor::all_rows) {
    for (std::int64_t r = 0; r < rows; ++r) chosen.push_back(r);
  } else {
    for (const auto& s : batch) chosen.push_back(s.offset + s.length - 1);
  }
  logits.resize(chosen.size() * static_cast<std::size_t>(c.vocab_size));
  head(hidden_.data(), chosen, logits.data());
}

}  // namespace mopt::model
