// Checkpoints of a real model's shape with random weights, for speed and
// memory work where the values do not matter: `mopt create-random --like
// llama-3.2-1b OUT`. Weights are bf16 drawn from N(0, 0.02) (the Llama
// initializer's range), norms are ones; config.json is the real model's
// (sizes, RoPE, tied embeddings), so every kernel sees the real shapes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mopt::exporter {

struct ModelShape {
  std::string name;
  nlohmann::json config;  // config.json
};

// A Llama checkpoint's config of the given sizes (head_dim = hidden / heads, RoPE theta 10000, untied head).
ModelShape llama_shape(const std::string& name, std::int64_t hidden, std::int64_t intermediate, std::int64_t layers,
                       std::int64_t heads, std::int64_t kv_heads, std::int64_t vocab);

// The shapes create-random knows: llama-3.2-1b, llama-3.2-3b, llama-3-8b, mistral-7b, tiny-kjv.
const std::vector<ModelShape>& known_shapes();
const ModelShape& shape_named(const std::string& name);

struct RandomCheckpointOptions {
  std::uint64_t seed = 0;
  std::string tokenizer_dir;  // tokenizer files copied from here ("" : none)
};

// Writes the checkpoint to `out` (built beside it and renamed when complete; an existing `out` is refused).
void write_random_checkpoint(const ModelShape& shape, const std::string& out, const RandomCheckpointOptions& options);

}  // namespace mopt::exporter
