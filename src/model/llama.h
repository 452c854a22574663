// The Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) as a list of
// plain steps over f32 activations. Weights stay in their checkpoint dtype
// (memory-mapped) and are widened on use.
//
// Two levels of API:
//  - decoder_layer_forward(): one decoder layer on a packed batch of hidden
//    states, with an observer that sees the input of every Linear and the keys
//    and values after RoPE. The quantization pipeline runs layer by layer on it.
//  - Model::forward(): embeddings, every layer, final norm and lm_head, with a
//    KV cache for prefill and decode.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/tensor.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "io/tokenizer.h"
#include "kernels/ops.h"
#include "kernels/qlinear.h"
#include "kernels/sparse24.h"
#include "quant/act_quant.h"

namespace mopt::model {

enum class LinearKind { q, k, v, o, gate, up, down };
inline constexpr LinearKind kAllLinears[] = {LinearKind::q, LinearKind::k, LinearKind::v, LinearKind::o,
                                             LinearKind::gate, LinearKind::up, LinearKind::down};
// "self_attn.q_proj", ..., "mlp.down_proj": the module path inside a layer.
std::string_view linear_name(LinearKind kind);

struct Linear {
  Tensor weight;              // [out, in], f32, f16 or bf16; empty when `quantized` holds the weight
  std::optional<Tensor> bias;  // [out]
  // Applied to a copy of the input when set: data (the format's input quantizer, its amax, the
  // pre-quantization scale) that quant::ActivationQuantizer::apply runs, not a function.
  std::optional<quant::ActivationQuantizer> input_transform;
  // The weight kept quantized and run by the quantized kernels (shared: layers are copied cheaply).
  std::shared_ptr<const kernels::PackedLinear> quantized;
  // A 2:4 sparse weight kept compressed and run by the sparse kernels (kernels/sparse24.h); `weight`
  // then stays only as a view of the file (its pages released) or empty.
  std::shared_ptr<const kernels::Sparse24Linear> sparse;
  std::int64_t in_features() const;
  std::int64_t out_features() const;
  // The weight [out, in] in f32, from whichever form holds it (plain, quantized codes, 2:4 compressed).
  std::vector<float> weight_f32() const;
  // Bytes the forward pass reads for the weight (codes and scales when quantized).
  std::uint64_t weight_bytes() const;
  // "int4 g32", "bf16", ...: the weight as the kernels hold it.
  std::string describe() const;
  // Why its product runs the plain loops rather than a vectorized kernel; empty when it does not.
  std::string plain_loop_reason() const;
};

struct LayerWeights {
  Tensor input_norm;           // f32 [hidden]
  Tensor post_attention_norm;  // f32 [hidden]
  std::optional<Tensor> q_norm, k_norm;  // f32 [head_dim] (Qwen3)
  Linear q, k, v, o, gate, up, down;
  // Applied to the keys (after RoPE) and to the values before attention uses or caches them (the KV
  // scheme's quantizer and amax, as data).
  std::optional<quant::ActivationQuantizer> key_transform, value_transform;
  // FP8 KV cache: the static amax of keys and values; an E4M3 KvCache stores codes under it
  // (and the transforms, which compute the same values, are then skipped).
  std::optional<std::pair<float, float>> kv_e4m3_amax;
  Linear& linear(LinearKind kind);
  const Linear& linear(LinearKind kind) const;
};

// Reads layer `index` from a checkpoint (views, norms widened to f32). A Linear whose weight is not
// stored under its .weight name (a quantized format's packed codes) is left empty for the format's
// reader to fill in.
LayerWeights load_layer(const io::Checkpoint& checkpoint, std::int64_t index);

// Sees what flows through a layer. Default: nothing.
class LayerObserver {
 public:
  virtual ~LayerObserver() = default;
  // The input of Linear `kind` of layer `layer`: [rows, cols].
  virtual void linear_input(std::int64_t /*layer*/, LinearKind /*kind*/, const float* /*x*/, std::int64_t /*rows*/,
                            std::int64_t /*cols*/) {}
  // Keys (after RoPE) and values of the new rows: [rows, kv_heads * head_dim] each.
  virtual void key_value(std::int64_t /*layer*/, const float* /*k*/, const float* /*v*/, std::int64_t /*rows*/,
                         std::int64_t /*kv_dim*/) {}
};

// One sequence of a packed batch: its rows [offset, offset + length) hold
// tokens at positions start_position ... start_position + length - 1.
struct SequenceSpan {
  std::int64_t offset = 0;
  std::int64_t length = 0;
  std::int64_t start_position = 0;
  std::int64_t cache_slot = 0;  // which KV-cache slot holds its earlier tokens
};

// Keys and values of every layer for `slots` sequences of up to `max_tokens`,
// stored as f32, bf16 (rounded to nearest even) or E4M3 codes under a
// per-layer static amax (the FP8 KV cache: code = e4m3(clamp(x * 448/amax)),
// value = e4m3 * (1 / (448/amax)), exactly what its fake quantization computes).
class KvCache {
 public:
  KvCache(const io::ModelConfig& config, std::int64_t slots, std::int64_t max_tokens,
          kernels::KvElement element = kernels::KvElement::f32, std::vector<std::pair<float, float>> e4m3_amax = {});
  // Stores keys and values [n, kv_dim] (f32) of `slot` at positions [pos, pos + n).
  void store(std::int64_t layer, std::int64_t slot, std::int64_t pos, const float* k, const float* v, std::int64_t n);
  kernels::KvRows keys(std::int64_t layer, std::int64_t slot) const;
  kernels::KvRows values(std::int64_t layer, std::int64_t slot) const;
  kernels::KvElement element() const { return element_; }
  std::int64_t max_tokens() const { return max_tokens_; }
  std::int64_t slots() const { return slots_; }
  std::size_t bytes() const { return data_.size(); }

 private:
  std::size_t offset(std::int64_t layer, std::int64_t slot, int which) const;
  std::int64_t layers_, slots_, max_tokens_, kv_dim_;
  kernels::KvElement element_;
  std::vector<float> scale_, inv_scale_;  // e4m3: per layer, keys then values
  std::vector<std::uint8_t> data_;
};

// Scratch buffers reused from call to call, so decoding allocates nothing per token.
struct Workspace {
  // How the Linears' products run (kernels::Precision); calibration keeps f32.
  kernels::Precision precision = kernels::Precision::f32;
  std::vector<float> normed, q, k, v, attn, proj, gate, up, head, transformed;
  std::vector<std::int32_t> positions;
  std::vector<std::int64_t> chosen_rows;
  void reserve(const io::ModelConfig& config, std::int64_t rows);
};

// y [rows, out] = the Linear applied to x [rows, in] as a layer runs it: its input transform (on a
// copy), then its quantized, sparse or plain product, then its bias.
void run_linear(const Linear& linear, const float* x, std::int64_t rows, float* y, Workspace& ws);

// RoPE inverse frequencies for the config (theta, linear or llama3 scaling),
// computed in f32 as transformers does.
std::vector<float> rope_inv_freq(const io::ModelConfig& config);

// Runs decoder layer `layer` on hidden [rows, hidden_size] in place. With a
// cache, the new keys and values are stored in each sequence's slot and
// attention covers its earlier tokens too; without, each sequence attends
// within the batch only (its start_position must be 0).
void decoder_layer_forward(const io::ModelConfig& config, const std::vector<float>& inv_freq, std::int64_t layer,
                           const LayerWeights& weights, float* hidden, std::int64_t rows,
                           std::span<const SequenceSpan> batch, KvCache* cache, Workspace& ws,
                           LayerObserver* observer = nullptr);

enum class LogitsFor { all_rows, last_row_of_each_sequence };

struct LoadOptions {
  // What the checkpoint stores besides config.json's tensors (a quantized format's; load/ gives it).
  io::TensorLayout layout;
  // Builds layer i; load_layer() when empty.
  std::function<LayerWeights(const io::Checkpoint&, std::int64_t)> layer_loader;
  // Builds the lm_head when it is stored quantized; nothing: lm_head.weight (or the tied embeddings) as stored.
  std::function<std::optional<Linear>(const io::Checkpoint&)> head_loader;
};

// A Linear of a model that runs the plain loops, and why (Linear::plain_loop_reason).
struct PlainLoopLinear {
  std::string name;    // "model.layers.3.mlp.down_proj", "lm_head"
  std::string weight;  // Linear::describe()
  std::string reason;
  // "model.layers.3.mlp.down_proj: int4 g48 runs the plain loop: no AVX2 kernel for groups of 48 ..."
  std::string notice() const;
};

class Model {
 public:
  // A Hugging Face checkpoint directory; its tokenizer.json is loaded when present.
  static Model load(const std::string& dir);
  static Model load(const std::string& dir, const LoadOptions& options);

  const io::ModelConfig& config() const { return checkpoint_->config(); }
  const io::Tokenizer* tokenizer() const { return tokenizer_ ? &*tokenizer_ : nullptr; }
  const io::Tokenizer& require_tokenizer() const;
  std::int64_t num_layers() const { return static_cast<std::int64_t>(layers_.size()); }
  const LayerWeights& layer(std::int64_t i) const { return layers_.at(static_cast<std::size_t>(i)); }
  LayerWeights& mutable_layer(std::int64_t i) { return layers_.at(static_cast<std::size_t>(i)); }
  const std::vector<float>& inv_freq() const { return inv_freq_; }
  // Bytes of all weights as stored.
  std::uint64_t weight_bytes() const;
  // Bytes the forward pass keeps for weights: Linears as the kernels hold them, embeddings,
  // lm_head (when not tied) and norms.
  std::uint64_t resident_weight_bytes() const;
  std::uint64_t embedding_bytes() const { return embed_tokens_.bytes().size(); }
  // The lm_head: the embeddings when tied, else lm_head.weight, plain or quantized.
  const Linear& lm_head() const { return lm_head_; }
  // Every Linear (the layers' in order, then the lm_head) that runs the plain loops; empty when all are vectorized.
  std::vector<PlainLoopLinear> plain_loop_linears() const;
  // True when the lm_head reads the embedding table itself (tied and not quantized separately).
  bool head_is_embedding_table() const;
  // Widens or narrows every float weight kept as a plain tensor (embeddings, lm_head, unquantized
  // Linears) to `dtype` (bf16 or f16 for a 16-bit baseline).
  void convert_float_weights(DType dtype);

  // A KV cache for this model: E4M3 when every layer has an FP8 KV amax, else `other` (f32 unless set).
  KvCache new_cache(std::int64_t slots, std::int64_t max_tokens) const;
  void set_kv_element(kernels::KvElement other) { kv_element_ = other; }
  // How forward() computes the Linears' products (kernels::Precision::f32 unless set).
  void set_precision(kernels::Precision precision) { workspace_.precision = precision; }
  kernels::Precision precision() const { return workspace_.precision; }

  // Seconds spent in the decoder layers and in the head (final norm + lm_head) since the last reset.
  struct Profile {
    double layers_seconds = 0, head_seconds = 0;
  };
  const Profile& profile() const { return profile_; }
  void reset_profile() { profile_ = {}; }

  // Embeddings of `tokens` into out [tokens.size(), hidden].
  void embed(std::span<const std::int32_t> tokens, float* out) const;
  // Final norm and lm_head over the chosen rows of hidden; logits [n, vocab].
  void head(const float* hidden, std::span<const std::int64_t> rows, float* logits);

  // The whole model on a packed batch. Logits of the chosen rows go to
  // `logits` (resized): [rows or sequences, vocab]. Not const: it runs in the
  // model's own buffers and adds to its profile, so one Model runs one forward
  // at a time.
  void forward(std::span<const std::int32_t> tokens, std::span<const SequenceSpan> batch, KvCache* cache,
               LogitsFor which, std::vector<float>& logits, LayerObserver* observer = nullptr);

 private:
  std::shared_ptr<io::Checkpoint> checkpoint_;
  std::optional<io::Tokenizer> tokenizer_;
  Tensor embed_tokens_;
  Tensor final_norm_;  // f32
  Linear lm_head_;     // weight: the embeddings when tied
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;
  Workspace workspace_;  // forward()'s buffers, reused from call to call
  std::vector<float> hidden_;
  Profile profile_;
  kernels::KvElement kv_element_ = kernels::KvElement::f32;
};

}  // namespace mopt::model
