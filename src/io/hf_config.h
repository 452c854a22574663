// A Hugging Face config.json of the Llama family, read into what mopt needs to
// build the model: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
// Qwen3ForCausalLM. Both the transformers v4 keys (rope_theta, rope_scaling)
// and the v5 ones (rope_parameters) are understood.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"

namespace mopt::io {

enum class RopeScalingType { none, linear, llama3 };

struct RopeScaling {
  RopeScalingType type = RopeScalingType::none;
  double factor = 1.0;
  // llama3 only
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  std::int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture;  // "LlamaForCausalLM", ...
  std::string model_type;    // "llama", "mistral", "qwen2", "qwen3"
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;
  std::int64_t head_dim = 0;
  std::int64_t max_position_embeddings = 0;
  double rms_norm_eps = 0;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;    // bias on q_proj, k_proj, v_proj
  bool o_bias = false;      // bias on o_proj
  bool mlp_bias = false;    // bias on gate_proj, up_proj, down_proj
  bool qk_norm = false;     // per-head RMSNorm of q and k before RoPE (Qwen3)
  std::optional<std::int64_t> sliding_window;
  DType dtype = DType::BF16;  // the checkpoint's declared dtype
  std::vector<std::int64_t> bos_token_ids;
  std::vector<std::int64_t> eos_token_ids;
  nlohmann::json raw;  // the file as read, for exporters that copy it verbatim
};

// Parses config.json text. `label` (the path) starts every error message.
ModelConfig parse_model_config(std::string_view text, const std::string& label);
// Reads and parses a config.json file.
ModelConfig load_model_config(const std::string& path);

struct ExpectedTensor {
  std::string name;
  Shape shape;
};

// The tensors a checkpoint of this config holds, in the model's order
// (embeddings, then each layer, then the final norm and lm_head).
std::vector<ExpectedTensor> expected_tensors(const ModelConfig& config);

// Parameters of the model: the sum of the expected tensors' elements (a tied
// lm_head counts once, as transformers' num_parameters() does).
std::uint64_t parameter_count(const ModelConfig& config);

}  // namespace mopt::io
