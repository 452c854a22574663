#include "io/hf_config.h"

#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "io/json_util.h"

namespace mopt::io {

using nlohmann::json;

namespace {

const json* find_non_null(const json& object, const char* key) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return nullptr;
  return &*it;
}

std::int64_t positive_int(const json& value, const char* key) {
  if (!value.is_number_integer()) fail("field '{}' must be an integer, got {}", key, json_summary(value));
  const auto v = value.get<std::int64_t>();
  if (v <= 0) fail("field '{}' must be positive, got {}", key, v);
  return v;
}

std::int64_t required_int(const json& object, const char* key) {
  const json* v = find_non_null(object, key);
  if (v == nullptr) fail("missing field '{}'", key);
  return positive_int(*v, key);
}

double number(const json& value, const char* key) {
  if (!value.is_number()) fail("field '{}' must be a number, got {}", key, json_summary(value));
  const double v = value.get<double>();
  if (!std::isfinite(v)) fail("field '{}' is not finite", key);
  return v;
}

double required_number(const json& object, const char* key) {
  const json* v = find_non_null(object, key);
  if (v == nullptr) fail("missing field '{}'", key);
  return number(*v, key);
}

bool optional_bool(const json& object, const char* key, bool fallback) {
  const json* v = find_non_null(object, key);
  if (v == nullptr) return fallback;
  if (!v->is_boolean()) fail("field '{}' must be true or false, got {}", key, json_summary(*v));
  return v->get<bool>();
}

std::vector<std::int64_t> token_ids(const json& object, const char* key) {
  const json* v = find_non_null(object, key);
  std::vector<std::int64_t> ids;
  if (v == nullptr) return ids;
  auto one = [&](const json& x) {
    if (!x.is_number_integer()) fail("field '{}' must hold integer token ids, got {}", key, json_summary(x));
    ids.push_back(x.get<std::int64_t>());
  };
  if (v->is_array()) {
    for (const auto& x : *v) one(x);
  } else {
    one(*v);
  }
  return ids;
}

DType parse_dtype(const json& object) {
  const json* v = find_non_null(object, "dtype");  // transformers v5
  const char* key = "dtype";
  if (v == nullptr) {
    v = find_non_null(object, "torch_dtype");  // transformers v4
    key = "torch_dtype";
  }
  if (v == nullptr) return DType::F32;  // what transformers loads when none is declared
  if (!v->is_string()) fail("field '{}' must be a string, got {}", key, json_summary(*v));
  const auto s = v->get<std::string>();
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  if (s == "float32") return DType::F32;
  fail("field '{}': unsupported dtype '{}' (expected bfloat16, float16 or float32)", key, printable(s));
}

RopeScaling parse_rope_scaling(const json& params, const char* where) {
  if (!params.is_object()) fail("field '{}' must be an object, got {}", where, json_summary(params));
  const json* type_value = find_non_null(params, "rope_type");
  if (type_value == nullptr) type_value = find_non_null(params, "type");  // older spelling
  std::string type = "default";
  if (type_value != nullptr) {
    if (!type_value->is_string()) fail("{}: rope_type must be a string", where);
    type = type_value->get<std::string>();
  }
  RopeScaling r;
  return with_context(where, [&] {
    if (type == "default") return r;
    if (type == "linear") {
      r.type = RopeScalingType::linear;
      r.factor = required_number(params, "factor");
      if (r.factor <= 0) fail("factor must be positive");
      return r;
    }
    if (type == "llama3") {
      r.type = RopeScalingType::llama3;
      r.factor = required_number(params, "factor");
      r.low_freq_factor = required_number(params, "low_freq_factor");
      r.high_freq_factor = required_number(params, "high_freq_factor");
      r.original_max_position_embeddings = required_int(params, "original_max_position_embeddings");
      if (r.factor <= 0) fail("factor must be positive");
      if (!(r.high_freq_factor > r.low_freq_factor) || r.low_freq_factor <= 0) {
        fail("llama3 scaling needs 0 < low_freq_factor < high_freq_factor, got {} and {}", r.low_freq_factor,
             r.high_freq_factor);
      }
      return r;
    }
    fail("rope scaling type '{}' is not supported (supported: default, linear, llama3)", printable(type));
  });
}

struct ArchitectureTraits {
  const char* name;
  bool attention_bias_key;  // reads attention_bias for q/k/v/o bias
  bool always_qkv_bias;     // Qwen2: q/k/v always biased, o never
  bool mlp_bias_key;
  bool qk_norm;
  bool mistral_sliding_window;
  bool qwen_sliding_window;
};

constexpr ArchitectureTraits kArchitectures[] = {
    {"LlamaForCausalLM", true, false, true, false, false, false},
    {"MistralForCausalLM", false, false, false, false, true, false},
    {"Qwen2ForCausalLM", false, true, false, false, false, true},
    {"Qwen3ForCausalLM", true, false, false, true, false, true},
};

}  // namespace

ModelConfig parse_model_config(std::string_view text, const std::string& label) {
  return with_context(label, [&] {
    const json j = parse_json_unique_keys(text, "config");
    if (!j.is_object()) fail("expected a JSON object, got {}", json_summary(j));
    ModelConfig c;
    c.raw = j;

    const json* archs = find_non_null(j, "architectures");
    if (archs == nullptr) fail("missing field 'architectures'");
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      fail("field 'architectures' must be a non-empty array of strings");
    }
    c.architecture = (*archs)[0].get<std::string>();
    const ArchitectureTraits* traits = nullptr;
    for (const auto& a : kArchitectures) {
      if (c.architecture == a.name) traits = &a;
    }
    if (traits == nullptr) {
      fail("unknown architecture '{}' (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
           "Qwen3ForCausalLM)",
           printable(c.architecture));
    }
    const json* model_type = find_non_null(j, "model_type");
    if (model_type == nullptr) fail("missing field 'model_type'");
    if (!model_type->is_string()) fail("field 'model_type' must be a string");
    c.model_type = model_type->get<std::string>();

    c.vocab_size = required_int(j, "vocab_size");
    c.hidden_size = required_int(j, "hidden_size");
    c.intermediate_size = required_int(j, "intermediate_size");
    c.num_layers = required_int(j, "num_hidden_layers");
    c.num_heads = required_int(j, "num_attention_heads");
    c.max_position_embeddings = required_int(j, "max_position_embeddings");
    c.rms_norm_eps = required_number(j, "rms_norm_eps");
    if (c.rms_norm_eps <= 0) fail("field 'rms_norm_eps' must be positive");

    const json* kv = find_non_null(j, "num_key_value_heads");
    c.num_kv_heads = kv ? positive_int(*kv, "num_key_value_heads") : c.num_heads;
    if (c.num_heads % c.num_kv_heads != 0) {
      fail("num_attention_heads {} is not a multiple of num_key_value_heads {}", c.num_heads, c.num_kv_heads);
    }
    const json* hd = find_non_null(j, "head_dim");
    if (hd != nullptr) {
      c.head_dim = positive_int(*hd, "head_dim");
    } else {
      if (c.hidden_size % c.num_heads != 0) {
        fail("hidden_size {} is not a multiple of num_attention_heads {} and no head_dim is given", c.hidden_size,
             c.num_heads);
      }
      c.head_dim = c.hidden_size / c.num_heads;
    }
    if (c.head_dim % 2 != 0) fail("head_dim {} must be even for rotary embeddings", c.head_dim);

    if (const json* act = find_non_null(j, "hidden_act")) {
      if (!act->is_string() || act->get<std::string>() != "silu") {
        fail("hidden_act {} is not supported (only silu)", act->is_string() ? "'" + printable(act->get<std::string>()) + "'" : json_summary(*act));
      }
    }

    // RoPE: transformers v5 keeps everything in rope_parameters; v4 uses
    // rope_theta and rope_scaling at the top level.
    if (const json* params = find_non_null(j, "rope_parameters")) {
      c.rope_scaling = parse_rope_scaling(*params, "rope_parameters");
      if (const json* theta = find_non_null(*params, "rope_theta")) {
        c.rope_theta = number(*theta, "rope_parameters.rope_theta");
      } else if (const json* top = find_non_null(j, "rope_theta")) {
        c.rope_theta = number(*top, "rope_theta");
      }
    } else {
      if (const json* theta = find_non_null(j, "rope_theta")) c.rope_theta = number(*theta, "rope_theta");
      if (const json* scaling = find_non_null(j, "rope_scaling")) c.rope_scaling = parse_rope_scaling(*scaling, "rope_scaling");
    }
    if (c.rope_theta <= 0) fail("rope_theta must be positive, got {}", c.rope_theta);

    c.tie_word_embeddings = optional_bool(j, "tie_word_embeddings", false);
    if (traits->attention_bias_key) {
      c.qkv_bias = c.o_bias = optional_bool(j, "attention_bias", false);
    }
    if (traits->always_qkv_bias) c.qkv_bias = true;
    if (traits->mlp_bias_key) c.mlp_bias = optional_bool(j, "mlp_bias", false);
    c.qk_norm = traits->qk_norm;
    if (traits->mistral_sliding_window) {
      if (const json* w = find_non_null(j, "sliding_window")) c.sliding_window = positive_int(*w, "sliding_window");
    }
    if (traits->qwen_sliding_window && optional_bool(j, "use_sliding_window", false)) {
      fail("use_sliding_window is true: sliding-window attention of {} is not supported", c.architecture);
    }
    c.dtype = parse_dtype(j);
    c.bos_token_ids = token_ids(j, "bos_token_id");
    c.eos_token_ids = token_ids(j, "eos_token_id");
    return c;
  });
}

ModelConfig load_model_config(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) fail("{}: no such file", path);
  return parse_model_config(read_text_file(path), path);
}

std::vector<ExpectedTensor> expected_tensors(const ModelConfig& c) {
  std::vector<ExpectedTensor> out;
  const std::int64_t h = c.hidden_size;
  const std::int64_t q = c.num_heads * c.head_dim;
  const std::int64_t kv = c.num_kv_heads * c.head_dim;
  const std::int64_t ff = c.intermediate_size;
  auto linear = [&](const std::string& name, std::int64_t out_features, std::int64_t in_features, bool bias) {
    out.push_back({name + ".weight", {out_features, in_features}});
    if (bias) out.push_back({name + ".bias", {out_features}});
  };
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (std::int64_t i = 0; i < c.num_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    linear(p + "self_attn.q_proj", q, h, c.qkv_bias);
    linear(p + "self_attn.k_proj", kv, h, c.qkv_bias);
    linear(p + "self_attn.v_proj", kv, h, c.qkv_bias);
    linear(p + "self_attn.o_proj", h, q, c.o_bias);
    if (c.qk_norm) {
      out.push_back({p + "self_attn.q_norm.weight", {c.head_dim}});
      out.push_back({p + "self_attn.k_norm.weight", {c.head_dim}});
    }
    linear(p + "mlp.gate_proj", ff, h, c.mlp_bias);
    linear(p + "mlp.up_proj", ff, h, c.mlp_bias);
    linear(p + "mlp.down_proj", h, ff, c.mlp_bias);
    out.push_back({p + "input_layernorm.weight", {h}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

std::uint64_t parameter_count(const ModelConfig& config) {
  std::uint64_t n = 0;
  for (const auto& t : expected_tensors(config)) n += shape_numel(t.shape);
  return n;
}

}  // namespace mopt::io
