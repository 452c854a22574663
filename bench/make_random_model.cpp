// Writes a Llama checkpoint with random bf16 weights (N(0, 0.02), unit norms)
// and the bundled model's tokenizer: the same layer shape at any depth, for
// showing that quantization memory does not grow with the number of layers.
//
//   build/bench/make_random_model OUT_DIR --layers 8 [--hidden 1024] [--intermediate 2816]
//                                 [--heads 16] [--kv-heads 8] [--tokenizer models/tiny-kjv]
#include <fmt/format.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <string>

#include "core/convert.h"
#include "io/atomic_file.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: make_random_model OUT_DIR --layers N [--hidden H] [--intermediate I] [--heads A] [--kv-heads K] [--tokenizer DIR]\n");
    return 2;
  }
  const std::string out = argv[1];
  std::int64_t layers = 8, hidden = 1024, inter = 2816, heads = 16, kv_heads = 8;
  std::string tokenizer_dir = "models/tiny-kjv";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--layers") layers = std::atoll(argv[i + 1]);
    else if (k == "--hidden") hidden = std::atoll(argv[i + 1]);
    else if (k == "--intermediate") inter = std::atoll(argv[i + 1]);
    else if (k == "--heads") heads = std::atoll(argv[i + 1]);
    else if (k == "--kv-heads") kv_heads = std::atoll(argv[i + 1]);
    else if (k == "--tokenizer") tokenizer_dir = argv[i + 1];
  }
  try {
    const auto tok = mopt::io::Tokenizer::load(tokenizer_dir);
    const std::int64_t vocab = tok.vocab_size(), head_dim = hidden / heads;
    std::filesystem::create_directories(out);
    std::mt19937 rng(42);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<mopt::io::NamedTensor> tensors;
    auto random = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
      mopt::Tensor t = mopt::Tensor::zeros(mopt::DType::BF16, {rows, cols});
      auto* d = t.mutable_data<std::uint16_t>();
      for (std::int64_t i = 0; i < rows * cols; ++i) d[i] = mopt::f32_to_bf16(normal(rng));
      tensors.push_back({name, t});
    };
    auto ones = [&](const std::string& name, std::int64_t n) {
      mopt::Tensor t = mopt::Tensor::zeros(mopt::DType::BF16, {n});
      auto* d = t.mutable_data<std::uint16_t>();
      for (std::int64_t i = 0; i < n; ++i) d[i] = mopt::f32_to_bf16(1.0f);
      tensors.push_back({name, t});
    };
    random("model.embed_tokens.weight", vocab, hidden);
    random("lm_head.weight", vocab, hidden);
    ones("model.norm.weight", hidden);
    for (std::int64_t l = 0; l < layers; ++l) {
      const std::string p = fmt::format("model.layers.{}.", l);
      ones(p + "input_layernorm.weight", hidden);
      ones(p + "post_attention_layernorm.weight", hidden);
      random(p + "self_attn.q_proj.weight", heads * head_dim, hidden);
      random(p + "self_attn.k_proj.weight", kv_heads * head_dim, hidden);
      random(p + "self_attn.v_proj.weight", kv_heads * head_dim, hidden);
      random(p + "self_attn.o_proj.weight", hidden, heads * head_dim);
      random(p + "mlp.gate_proj.weight", inter, hidden);
      random(p + "mlp.up_proj.weight", inter, hidden);
      random(p + "mlp.down_proj.weight", hidden, inter);
    }
    mopt::io::write_safetensors_sharded(out, tensors, 2ull << 30);
    const nlohmann::json config = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", hidden},
                                   {"intermediate_size", inter}, {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                                   {"num_key_value_heads", kv_heads}, {"head_dim", head_dim}, {"vocab_size", vocab},
                                   {"max_position_embeddings", 4096}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                                   {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}, {"hidden_act", "silu"}};
    mopt::io::write_file_atomically(out + "/config.json", config.dump(2) + "\n");
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
      const auto from = std::filesystem::path(tokenizer_dir) / f;
      if (std::filesystem::exists(from)) mopt::io::write_file_atomically(out + "/" + f, mopt::io::read_text_file(from.string()));
    }
    fmt::print("{}: {} layers, hidden {}, intermediate {}\n", out, layers, hidden, inter);
  } catch (const std::exception& e) {
    fmt::print(stderr, "make_random_model: {}\n", e.what());
    return 1;
  }
  return 0;
}
