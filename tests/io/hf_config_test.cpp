#include "io/hf_config.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

using nlohmann::json;

// A transformers v4 style Llama-3.1 config (rope_theta and rope_scaling at the top).
json llama31_v4() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009]})");
}

std::string error_of(const json& j) {
  try {
    parse_model_config(j.dump(), "config.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(HfConfig, Llama31TransformersV4Keys) {
  const ModelConfig c = parse_model_config(llama31_v4().dump(), "x");
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.num_layers, 32);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::llama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.dtype, DType::BF16);
  EXPECT_EQ(c.eos_token_ids, (std::vector<std::int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c.bos_token_ids, (std::vector<std::int64_t>{128000}));
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_FALSE(c.qk_norm);
  EXPECT_EQ(parameter_count(c), 8030261248ULL);  // Llama-3.1-8B's published count
}

TEST(HfConfig, TransformersV5FixtureWithRopeParameters) {
  const ModelConfig c = load_model_config(testing::data_path("hf/llama/config.json"));
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::llama3);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_EQ(c.head_dim, 16);
}

TEST(HfConfig, FamiliesFromTransformersFixtures) {
  const ModelConfig mistral = load_model_config(testing::data_path("hf/mistral/config.json"));
  EXPECT_EQ(mistral.architecture, "MistralForCausalLM");
  EXPECT_EQ(mistral.sliding_window, 32);
  EXPECT_EQ(mistral.num_kv_heads, 1);
  const ModelConfig qwen2 = load_model_config(testing::data_path("hf/qwen2/config.json"));
  EXPECT_TRUE(qwen2.qkv_bias);
  EXPECT_FALSE(qwen2.o_bias);
  EXPECT_TRUE(qwen2.tie_word_embeddings);
  const ModelConfig qwen3 = load_model_config(testing::data_path("hf/qwen3/config.json"));
  EXPECT_TRUE(qwen3.qk_norm);
  EXPECT_EQ(qwen3.head_dim, 32);  // explicit, not 64 / 4
  EXPECT_FALSE(qwen3.qkv_bias);
}

TEST(HfConfig, DefaultsAsTransformersApplies) {
  json j = llama31_v4();
  j.erase("num_key_value_heads");
  j.erase("rope_scaling");
  j.erase("torch_dtype");
  j["eos_token_id"] = nullptr;
  const ModelConfig c = parse_model_config(j.dump(), "x");
  EXPECT_EQ(c.num_kv_heads, 32);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::none);
  EXPECT_EQ(c.dtype, DType::F32);
  EXPECT_TRUE(c.eos_token_ids.empty());
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};  // the older key name
  EXPECT_EQ(parse_model_config(j.dump(), "x").rope_scaling.type, RopeScalingType::linear);
  j["attention_bias"] = true;
  const ModelConfig biased = parse_model_config(j.dump(), "x");
  EXPECT_TRUE(biased.qkv_bias);
  EXPECT_TRUE(biased.o_bias);
}

TEST(HfConfig, ErrorsNameTheProblem) {
  auto with = [](const char* key, json value) {
    json j = llama31_v4();
    if (value.is_discarded()) {
      j.erase(key);
    } else {
      j[key] = value;
    }
    return j;
  };
  const json drop = json::value_t::discarded;
  EXPECT_EQ(error_of(with("hidden_size", drop)), "config.json: missing field 'hidden_size'");
  EXPECT_EQ(error_of(with("num_hidden_layers", nullptr)), "config.json: missing field 'num_hidden_layers'");
  EXPECT_EQ(error_of(with("architectures", drop)), "config.json: missing field 'architectures'");
  EXPECT_NE(error_of(with("architectures", {"GPT2LMHeadModel"})).find("unknown architecture 'GPT2LMHeadModel'"), std::string::npos);
  EXPECT_NE(error_of(with("hidden_size", "big")).find("'hidden_size' must be an integer"), std::string::npos);
  EXPECT_NE(error_of(with("hidden_size", -4)).find("must be positive"), std::string::npos);
  EXPECT_NE(error_of(with("num_key_value_heads", 5)).find("not a multiple"), std::string::npos);
  EXPECT_NE(error_of(with("hidden_act", "gelu")).find("hidden_act 'gelu' is not supported"), std::string::npos);
  EXPECT_NE(error_of(with("rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}})).find("'yarn' is not supported"), std::string::npos);
  EXPECT_NE(error_of(with("rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}})).find("missing field 'low_freq_factor'"), std::string::npos);
  EXPECT_NE(error_of(with("torch_dtype", "float8")).find("unsupported dtype 'float8'"), std::string::npos);
  EXPECT_NE(error_of(json::array()).find("expected a JSON object"), std::string::npos);
  json qwen = llama31_v4();
  qwen["architectures"] = {"Qwen2ForCausalLM"};
  qwen["use_sliding_window"] = true;
  EXPECT_NE(error_of(qwen).find("sliding-window"), std::string::npos);
  try {
    parse_model_config("{\"a\": 1, \"a\": 2}", "c.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'a' appears twice"), std::string::npos);
  }
  EXPECT_THROW(load_model_config("/nonexistent/config.json"), Error);
}

TEST(HfConfig, ExpectedTensorsOfEachFamily) {
  const ModelConfig qwen3 = load_model_config(testing::data_path("hf/qwen3/config.json"));
  const auto t = expected_tensors(qwen3);
  auto shape_of = [&](const std::string& name) {
    for (const auto& e : t) {
      if (e.name == name) return e.shape;
    }
    return Shape{-1};
  };
  EXPECT_EQ(shape_of("model.layers.1.self_attn.q_proj.weight"), (Shape{128, 64}));
  EXPECT_EQ(shape_of("model.layers.1.self_attn.k_proj.weight"), (Shape{64, 64}));
  EXPECT_EQ(shape_of("model.layers.1.self_attn.o_proj.weight"), (Shape{64, 128}));
  EXPECT_EQ(shape_of("model.layers.0.self_attn.q_norm.weight"), (Shape{32}));
  EXPECT_EQ(shape_of("lm_head.weight"), (Shape{256, 64}));
  const ModelConfig qwen2 = load_model_config(testing::data_path("hf/qwen2/config.json"));
  const auto t2 = expected_tensors(qwen2);
  bool has_q_bias = false, has_o_bias = false, has_lm_head = false;
  for (const auto& e : t2) {
    has_q_bias |= e.name == "model.layers.0.self_attn.q_proj.bias";
    has_o_bias |= e.name == "model.layers.0.self_attn.o_proj.bias";
    has_lm_head |= e.name == "lm_head.weight";
  }
  EXPECT_TRUE(has_q_bias);
  EXPECT_FALSE(has_o_bias);
  EXPECT_FALSE(has_lm_head);  // tied
}

}  // namespace
}  // namespace mopt::io
