// What `mopt inspect` reports about a model directory, one safetensors file,
// or a GGUF file (kind "gguf", with architecture, layers and hidden size
// from its metadata and llama.cpp's type names as dtypes).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace mopt::load {

// A JSON object: "path", "kind" ("model" or "file"), "files", "tensor_count",
// "parameters", "bytes_by_dtype", "total_bytes", "tensors" (name, dtype,
// shape, bytes, file), and for a model "architecture", "model_type",
// "num_layers", "hidden_size", "intermediate_size", "num_heads",
// "num_kv_heads", "head_dim", "vocab_size", "max_position_embeddings",
// "rope_theta", "rope_scaling", "tie_word_embeddings", "dtype".
// A model directory is validated against its config.json first.
nlohmann::json summarize(const std::string& path);

}  // namespace mopt::load
