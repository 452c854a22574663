#include "export/random_checkpoint.h"

#include <fmt/format.h>

#include <cmath>
#include <filesystem>

#include "core/convert.h"
#include "core/error.h"
#include "core/random.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "core/tensor.h"
#include "export/checkpoint_dir.h"
#include "io/checkpoint.h"

namespace mopt::exporter {

namespace {

using nlohmann::json;

json llama_config(std::int64_t hidden, std::int64_t intermediate, std::int64_t layers, std::int64_t heads, std::int64_t kv_heads,
                  std::int64_t vocab, bool tied, double theta, std::int64_t context, const json& rope_scaling, double eps) {
  json c = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", hidden},
            {"intermediate_size", intermediate}, {"num_hidden_layers", layers}, {"num_attention_heads", heads},
            {"num_key_value_heads", kv_heads}, {"head_dim", hidden / heads}, {"vocab_size", vocab},
            {"max_position_embeddings", context}, {"rms_norm_eps", eps}, {"rope_theta", theta}, {"tie_word_embeddings", tied},
            {"torch_dtype", "bfloat16"}, {"hidden_act", "silu"}, {"attention_bias", false}, {"mlp_bias", false},
            {"bos_token_id", 0}, {"eos_token_id", 1}};
  c["rope_scaling"] = rope_scaling;
  return c;
}

Tensor random_bf16(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  Tensor t = Tensor::zeros(DType::BF16, {rows, cols});
  auto* d = t.mutable_data<std::uint16_t>();
  parallel_ranges(rows, 1, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      std::uint64_t s = seed ^ (static_cast<std::uint64_t>(r) * 0xD1B54A32D192ED03ull);
      for (std::int64_t c = 0; c < cols; ++c) {
        // Sum of four uniforms, centred and scaled: mean 0, standard deviation 0.02.
        const std::uint64_t a = splitmix64(s), b = splitmix64(s);
        const double u = static_cast<double>(a & 0xFFFFFFFF) + static_cast<double>(a >> 32) + static_cast<double>(b & 0xFFFFFFFF) +
                         static_cast<double>(b >> 32);
        const double z = (u / 4294967296.0 - 2.0) * std::sqrt(3.0);  // variance of 4 uniforms is 1/3
        d[r * cols + c] = f32_to_bf16(static_cast<float>(0.02 * z));
      }
    }
  });
  return t;
}

Tensor ones_bf16(std::int64_t n) {
  Tensor t = Tensor::zeros(DType::BF16, {n});
  auto* d = t.mutable_data<std::uint16_t>();
  for (std::int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(1.0f);
  return t;
}

}  // namespace

ModelShape llama_shape(const std::string& name, std::int64_t hidden, std::int64_t intermediate, std::int64_t layers,
                       std::int64_t heads, std::int64_t kv_heads, std::int64_t vocab) {
  if (hidden <= 0 || intermediate <= 0 || layers <= 0 || heads <= 0 || kv_heads <= 0 || vocab <= 0 || hidden % heads != 0 || heads % kv_heads != 0) {
    fail("{}: sizes hidden {} intermediate {} layers {} heads {} kv heads {} vocab {} do not make a Llama model", name, hidden,
         intermediate, layers, heads, kv_heads, vocab);
  }
  return {name, llama_config(hidden, intermediate, layers, heads, kv_heads, vocab, false, 10000.0, 4096, nullptr, 1e-5)};
}

const std::vector<ModelShape>& known_shapes() {
  static const std::vector<ModelShape> shapes = [] {
    const json llama3_scaling = {{"rope_type", "llama3"}, {"factor", 32.0}, {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0},
                                 {"original_max_position_embeddings", 8192}};
    std::vector<ModelShape> s;
    s.push_back({"llama-3.2-1b", llama_config(2048, 8192, 16, 32, 8, 128256, true, 500000.0, 131072, llama3_scaling, 1e-5)});
    s.push_back({"llama-3.2-3b", llama_config(3072, 8192, 28, 24, 8, 128256, true, 500000.0, 131072, llama3_scaling, 1e-5)});
    s.push_back({"llama-3-8b", llama_config(4096, 14336, 32, 32, 8, 128256, false, 500000.0, 8192, nullptr, 1e-5)});
    json mistral = llama_config(4096, 14336, 32, 32, 8, 32768, false, 1000000.0, 32768, nullptr, 1e-5);
    mistral["architectures"] = {"MistralForCausalLM"};
    mistral["model_type"] = "mistral";
    mistral["sliding_window"] = nullptr;
    s.push_back({"mistral-7b", mistral});
    ModelShape tiny = llama_shape("tiny-kjv", 256, 704, 6, 8, 4, 4096);
    tiny.config["max_position_embeddings"] = 512;
    s.push_back(tiny);
    return s;
  }();
  return shapes;
}

const ModelShape& shape_named(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& s : known_shapes()) {
    if (s.name == name) return s;
    names.push_back(s.name);
  }
  fail("unknown model shape '{}' (known: {})", name, fmt::join(names, ", "));
}

void write_random_checkpoint(const ModelShape& shape, const std::string& out, const RandomCheckpointOptions& options) {
  if (std::filesystem::exists(out)) fail("{} already exists", out);
  if (!options.tokenizer_dir.empty() && !std::filesystem::exists(std::filesystem::path(options.tokenizer_dir) / "tokenizer.json")) {
    fail("{}: no tokenizer.json to copy", options.tokenizer_dir);  // before minutes of writing, not after
  }
  const json& c = shape.config;
  const auto hidden = c.at("hidden_size").get<std::int64_t>(), inter = c.at("intermediate_size").get<std::int64_t>();
  const auto layers = c.at("num_hidden_layers").get<std::int64_t>(), heads = c.at("num_attention_heads").get<std::int64_t>();
  const auto kv_heads = c.at("num_key_value_heads").get<std::int64_t>(), vocab = c.at("vocab_size").get<std::int64_t>();
  const auto head_dim = c.at("head_dim").get<std::int64_t>();
  const bool tied = c.at("tie_word_embeddings").get<bool>();
  CheckpointDirWriter writer(out, std::uint64_t{1} << 30);
  std::uint64_t tensor_index = 0;
  auto random = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    writer.add(name, random_bf16(rows, cols, options.seed * 0x9E3779B97F4A7C15ull + ++tensor_index));
  };
  Progress progress("create-random", static_cast<std::uint64_t>(layers + 1), "layers");
  random("model.embed_tokens.weight", vocab, hidden);
  if (!tied) random("lm_head.weight", vocab, hidden);
  writer.add("model.norm.weight", ones_bf16(hidden));
  progress.advance();
  for (std::int64_t l = 0; l < layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    writer.add(p + "input_layernorm.weight", ones_bf16(hidden));
    writer.add(p + "post_attention_layernorm.weight", ones_bf16(hidden));
    random(p + "self_attn.q_proj.weight", heads * head_dim, hidden);
    random(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden);
    random(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden);
    random(p + "self_attn.o_proj.weight", hidden, heads * head_dim);
    random(p + "mlp.gate_proj.weight", inter, hidden);
    random(p + "mlp.up_proj.weight", inter, hidden);
    random(p + "mlp.down_proj.weight", hidden, inter);
    writer.maybe_flush();
    progress.advance();
  }
  progress.finish();
  writer.write_json("config.json", c, 2);
  if (!options.tokenizer_dir.empty()) writer.copy_model_files(options.tokenizer_dir);
  writer.commit([](const std::string& dir) { io::Checkpoint::open(dir); });
}

}  // namespace mopt::exporter
