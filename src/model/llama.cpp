#include "model/llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <numbers>

#include "core/convert.h"
#include "core/cpu_features.h"
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
    if (store.contains(base + ".weight")) l.weight = store.tensor(base + ".weight");
    if (store.contains(base + ".bias")) l.bias = store.tensor(base + ".bias").to(DType::F32);
  }
  return w;
}

KvCache::KvCache(const io::ModelConfig& c, std::int64_t slots, std::int64_t max_tokens, kernels::KvElement element,
                 std::vector<std::pair<float, float>> e4m3_amax)
    : layers_(c.num_layers), slots_(slots), max_tokens_(max_tokens), kv_dim_(c.num_kv_heads * c.head_dim), element_(element) {
  if (slots <= 0 || max_tokens <= 0) fail("KV cache needs at least one slot and one token");
  if (element == kernels::KvElement::e4m3) {
    if (static_cast<std::int64_t>(e4m3_amax.size()) != layers_) fail("an FP8 KV cache needs the amax of all {} layers, got {}", layers_, e4m3_amax.size());
    for (const auto& [k, v] : e4m3_amax) {
      for (float amax : {k, v}) {
        if (!(amax > kTinyAmax)) amax = 1.0f;  // as the FP8 fake quantization takes a zero amax
        const float scale = (1.0f / amax) * kE4M3Max;
        scale_.push_back(scale);
        inv_scale_.push_back(1.0f / scale);
      }
    }
  }
  data_.assign(static_cast<std::size_t>(2 * layers_ * slots_ * max_tokens_ * kv_dim_) * kernels::kv_element_bytes(element), 0);
}

std::size_t KvCache::offset(std::int64_t layer, std::int64_t slot, int which) const {
  return static_cast<std::size_t>(((layer * slots_ + slot) * 2 + which) * max_tokens_ * kv_dim_) * kernels::kv_element_bytes(element_);
}

void KvCache::store(std::int64_t layer, std::int64_t slot, std::int64_t pos, const float* k, const float* v, std::int64_t n) {
  const auto count = static_cast<std::size_t>(n * kv_dim_);
  for (int which = 0; which < 2; ++which) {
    const float* src = which == 0 ? k : v;
    std::uint8_t* base = data_.data() + offset(layer, slot, which);
    const auto first = static_cast<std::size_t>(pos * kv_dim_);
    switch (element_) {
      case kernels::KvElement::f32: std::memcpy(reinterpret_cast<float*>(base) + first, src, count * sizeof(float)); break;
      case kernels::KvElement::bf16: convert_f32_to_bf16(src, reinterpret_cast<std::uint16_t*>(base) + first, count); break;
      case kernels::KvElement::e4m3: {
        const float scale = scale_[static_cast<std::size_t>(layer * 2 + which)];
        std::uint8_t* dst = base + first;
        for (std::size_t i = 0; i < count; ++i) dst[i] = f32_to_e4m3(std::clamp(src[i] * scale, -kE4M3Max, kE4M3Max));
        break;
      }
    }
  }
}

kernels::KvRows KvCache::keys(std::int64_t layer, std::int64_t slot) const {
  return {data_.data() + offset(layer, slot, 0), element_, element_ == kernels::KvElement::e4m3 ? inv_scale_[static_cast<std::size_t>(layer * 2)] : 1.0f};
}

kernels::KvRows KvCache::values(std::int64_t layer, std::int64_t slot) const {
  return {data_.data() + offset(layer, slot, 1), element_, element_ == kernels::KvElement::e4m3 ? inv_scale_[static_cast<std::size_t>(layer * 2 + 1)] : 1.0f};
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
    const auto cols = l.in_features();
    const auto n = static_cast<std::size_t>(rows * cols);
    if (ws.transformed.size() < n) ws.transformed.resize(n);
    l.input_transform->forward(x, rows, cols, ws.transformed.data());
    x = ws.transformed.data();
  }
  if (l.sparse) {
    l.sparse->forward(x, rows, y, ws.precision);
    kernels::add_bias(y, rows, l.sparse->out(), l.bias ? &*l.bias : nullptr);
    return;
  }
  if (l.quantized) {
    l.quantized->forward(x, rows, y, ws.precision);
    kernels::add_bias(y, rows, l.quantized->out(), l.bias ? &*l.bias : nullptr);
    return;
  }
  kernels::linear_forward(x, rows, l.weight, l.bias ? &*l.bias : nullptr, y, ws.precision);
}

}  // namespace

void run_linear(const Linear& l, const float* x, std::int64_t rows, float* y, Workspace& ws) { linear(l, x, rows, y, ws); }

std::int64_t Linear::in_features() const {
  if (sparse) return sparse->in();
  if (quantized) return quantized->in();
  return weight.rank() == 2 ? weight.dim(1) : 0;
}

std::int64_t Linear::out_features() const {
  if (sparse) return sparse->out();
  if (quantized) return quantized->out();
  return weight.rank() == 2 ? weight.dim(0) : 0;
}

std::vector<float> Linear::weight_f32() const {
  std::vector<float> w(static_cast<std::size_t>(out_features() * in_features()));
  if (sparse) sparse->dequantize_rows(0, sparse->out(), w.data());
  else if (quantized) quantized->dequantize_rows(0, quantized->out(), w.data());
  else w = weight.to_f32();
  return w;
}

std::uint64_t Linear::weight_bytes() const {
  if (sparse) return sparse->bytes();
  if (quantized) return quantized->bytes();
  return weight.bytes().size();
}

std::string Linear::describe() const {
  if (sparse) return sparse->describe();
  if (quantized) return quantized->describe();
  return std::string(dtype_name(weight.dtype()));
}

std::string Linear::plain_loop_reason() const {
  if (sparse) return sparse->plain_reason();
  if (quantized) return quantized->plain_reason();
  // kernels::linear_forward: an AVX2 GEMV for f32/f16/bf16 weights of any shape when the CPU has AVX2, FMA and F16C
  // (prefill's widening and BLAS GEMM run either way).
  return avx2_kernels_unavailable();
}

std::string PlainLoopLinear::notice() const { return fmt::format("{}: {} runs the plain loop: {}", name, weight, reason); }

std::vector<PlainLoopLinear> Model::plain_loop_linears() const {
  std::vector<PlainLoopLinear> out;
  const auto add = [&](const Linear& l, std::string name) {
    if (std::string why = l.plain_loop_reason(); !why.empty()) out.push_back({std::move(name), l.describe(), std::move(why)});
  };
  for (std::size_t i = 0; i < layers_.size(); ++i) {
    for (const auto kind : kAllLinears) add(layers_[i].linear(kind), fmt::format("model.layers.{}.{}", i, linear_name(kind)));
  }
  add(lm_head_, "lm_head");
  return out;
}

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
  // An E4M3 cache quantizes as it stores (the same values the transforms would give).
  const bool cache_quantizes = cache != nullptr && cache->element() == kernels::KvElement::e4m3;
  if (w.key_transform && !cache_quantizes) w.key_transform->apply(ws.k.data(), rows, kv_dim);
  if (w.value_transform && !cache_quantizes) w.value_transform->apply(ws.v.data(), rows, kv_dim);

  const std::int64_t window = c.sliding_window.value_or(0);
  for (const auto& s : batch) {
    const float* q = ws.q.data() + s.offset * q_dim;
    const std::int32_t* pos = ws.positions.data() + s.offset;
    float* out = ws.attn.data() + s.offset * q_dim;
    if (cache != nullptr) {
      const std::int64_t end = s.start_position + s.length;
      if (end > cache->max_tokens()) fail("sequence of {} tokens exceeds the KV cache of {}", end, cache->max_tokens());
      if (s.cache_slot < 0 || s.cache_slot >= cache->slots()) fail("KV cache slot {} out of range", s.cache_slot);
      cache->store(layer, s.cache_slot, s.start_position, ws.k.data() + s.offset * kv_dim, ws.v.data() + s.offset * kv_dim, s.length);
      kernels::attention_cached(q, s.length, pos, cache->keys(layer, s.cache_slot), cache->values(layer, s.cache_slot), end, nh, nkv,
                                d, window, out);
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
      io::Checkpoint::open(dir, options.layout));
  const auto& c = m.checkpoint_->config();
  const auto& store = m.checkpoint_->tensors();
  m.embed_tokens_ = store.tensor("model.embed_tokens.weight");
  m.final_norm_ = store.tensor("model.norm.weight").to(DType::F32);
  std::optional<Linear> head = options.head_loader ? options.head_loader(*m.checkpoint_) : std::nullopt;
  if (head) m.lm_head_ = std::move(*head);
  else m.lm_head_.weight = c.tie_word_embeddings ? m.embed_tokens_ : store.tensor("lm_head.weight");
  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    m.layers_.push_back(options.layer_loader ? options.layer_loader(*m.checkpoint_, i) : load_layer(*m.checkpoint_, i));
    for (const auto kind : kAllLinears) {
      const Linear& lin = m.layers_.back().linear(kind);
      if (lin.weight.numel() == 0 && !lin.quantized && !lin.sparse) fail("{}: model.layers.{}.{} has no weight", dir, i, linear_name(kind));
    }
  }
  if (kernels::sparse_kernels_enabled()) {
    // 2:4 sparse bf16 weights run compressed (a dense weight is found out at its first full group).
    for (std::int64_t i = 0; i < c.num_layers; ++i) {
      for (const auto kind : kAllLinears) {
        Linear& lin = m.layers_[static_cast<std::size_t>(i)].linear(kind);
        if (lin.quantized || lin.sparse || lin.weight.dtype() != DType::BF16 || lin.weight.rank() != 2) continue;
        auto s = kernels::Sparse24Linear::compress(kernels::Sparse24Values::bf16, reinterpret_cast<const std::uint8_t*>(lin.weight.bytes().data()),
                                                   lin.weight.dim(0), lin.weight.dim(1), {},
                                                   fmt::format("{}: model.layers.{}.{}", dir, i, linear_name(kind)));
        if (!s) continue;
        lin.sparse = std::make_shared<const kernels::Sparse24Linear>(std::move(*s));
        if (lin.weight.is_view()) lin.weight.release_pages();
        else lin.weight = Tensor();
      }
    }
  }
  m.inv_freq_ = rope_inv_freq(c);
  if (fs::exists(fs::path(dir) / "tokenizer.json")) m.tokenizer_ = io::Tokenizer::load(dir);
  return m;
}

const io::Tokenizer& Model::require_tokenizer() const {
  if (!tokenizer_) fail("{}: no tokenizer.json beside the model", checkpoint_->dir());
  return *tokenizer_;
}

std::uint64_t Model::resident_weight_bytes() const {
  std::uint64_t n = embed_tokens_.bytes().size() + final_norm_.bytes().size();
  if (!head_is_embedding_table()) n += lm_head_.weight_bytes();
  for (const auto& l : layers_) {
    n += l.input_norm.bytes().size() + l.post_attention_norm.bytes().size();
    if (l.q_norm) n += l.q_norm->bytes().size() + l.k_norm->bytes().size();
    for (const auto kind : kAllLinears) {
      const Linear& lin = l.linear(kind);
      n += lin.weight_bytes() + (lin.bias ? lin.bias->bytes().size() : 0);
    }
  }
  return n;
}

void Model::convert_float_weights(DType dtype) {
  auto convert = [dtype](Tensor& t) {
    if (t.numel() > 0 && t.dtype() != dtype && (t.dtype() == DType::F32 || t.dtype() == DType::F16 || t.dtype() == DType::BF16)) t = t.to(dtype);
  };
  const bool tied = head_is_embedding_table();
  convert(embed_tokens_);
  if (tied) lm_head_.weight = embed_tokens_;
  else if (!lm_head_.quantized) convert(lm_head_.weight);
  for (auto& l : layers_) {
    for (const auto kind : kAllLinears) {
      Linear& lin = l.linear(kind);
      if (!lin.quantized && !lin.sparse) convert(lin.weight);
    }
  }
}

KvCache Model::new_cache(std::int64_t slots, std::int64_t max_tokens) const {
  const bool fp8 = !layers_.empty() && std::all_of(layers_.begin(), layers_.end(), [](const LayerWeights& l) { return l.kv_e4m3_amax.has_value(); });
  if (!fp8) return KvCache(config(), slots, max_tokens, kv_element_);
  std::vector<std::pair<float, float>> amax;
  for (const auto& l : layers_) amax.push_back(*l.kv_e4m3_amax);
  return KvCache(config(), slots, max_tokens, kernels::KvElement::e4m3, std::move(amax));
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

void Model::head(const float* hidden, std::span<const std::int64_t> rows, float* logits) {
  const auto& c = config();
  const std::int64_t H = c.hidden_size;
  std::vector<float>& normed = workspace_.head;
  if (normed.size() < rows.size() * static_cast<std::size_t>(H)) normed.resize(rows.size() * static_cast<std::size_t>(H));
  for (std::size_t i = 0; i < rows.size(); ++i) {
    kernels::rmsnorm(hidden + rows[i] * H, final_norm_.data<float>(), 1, H, static_cast<float>(c.rms_norm_eps), normed.data() + i * static_cast<std::size_t>(H));
  }
  linear(lm_head_, normed.data(), static_cast<std::int64_t>(rows.size()), logits, workspace_);
}

bool Model::head_is_embedding_table() const {
  return !lm_head_.quantized && lm_head_.weight.numel() > 0 && lm_head_.weight.bytes().data() == embed_tokens_.bytes().data();
}

void Model::forward(std::span<const std::int32_t> tokens, std::span<const SequenceSpan> batch, KvCache* cache, LogitsFor which,
                    std::vector<float>& logits, LayerObserver* observer) {
  const auto& c = config();
  const auto rows = static_cast<std::int64_t>(tokens.size());
  std::int64_t covered = 0;
  for (const auto& s : batch) covered += s.length;
  if (covered != rows) fail("batch spans cover {} rows but {} tokens were given", covered, rows);
  hidden_.resize(static_cast<std::size_t>(rows * c.hidden_size));
  const auto t0 = std::chrono::steady_clock::now();
  embed(tokens, hidden_.data());
  for (std::int64_t l = 0; l < num_layers(); ++l) {
    decoder_layer_forward(c, inv_freq_, l, layers_[static_cast<std::size_t>(l)], hidden_.data(), rows, batch, cache, workspace_, observer);
  }
  const auto t1 = std::chrono::steady_clock::now();
  std::vector<std::int64_t>& chosen = workspace_.chosen_rows;
  chosen.clear();
  if (which == LogitsFor::all_rows) {
    for (std::int64_t r = 0; r < rows; ++r) chosen.push_back(r);
  } else {
    for (const auto& s : batch) chosen.push_back(s.offset + s.length - 1);
  }
  logits.resize(chosen.size() * static_cast<std::size_t>(c.vocab_size));
  head(hidden_.data(), chosen, logits.data());
  const auto t2 = std::chrono::steady_clock::now();
  profile_.layers_seconds += std::chrono::duration<double>(t1 - t0).count();
  profile_.head_seconds += std::chrono::duration<double>(t2 - t1).count();
}

}  // namespace mopt::model
