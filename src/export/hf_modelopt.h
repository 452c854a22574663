// The Hugging Face "modelopt" checkpoint: the source model's files with each
// quantized Linear stored as codes and scales under NVIDIA Model Optimizer's
// export names (P.weight, P.weight_scale, P.weight_scale_2, P.input_scale,
// P.pre_quant_scale; self_attn.k_proj.k_scale / v_proj.v_scale),
// hf_quant_config.json, and config.json's "quantization_config".
//
// The writer streams: layers arrive one at a time and are written in shards
// of at most `shard_bytes` as they fill, so memory stays at one shard. The
// whole directory is built as OUT.tmp-XXXXXX and renamed onto OUT only when
// every file is on disk; on failure nothing is left at OUT.
//
// The reader loads such a checkpoint back as a model::Model whose quantized
// Linears hold the dequantized weights and fake-quantize their inputs (and
// the keys/values) as the checkpoint's scales say: what the quantized model
// computes, for evaluation.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "quant/quantized_layer.h"
#include "quant/recipe.h"

namespace mopt::exporter {

class HfModeloptWriter {
 public:
  HfModeloptWriter(const io::Checkpoint& source, std::string out_dir, const quant::Recipe& recipe,
                   std::uint64_t shard_bytes = 4ull << 30);
  ~HfModeloptWriter();  // removes the temporary directory unless finish() completed
  HfModeloptWriter(const HfModeloptWriter&) = delete;
  HfModeloptWriter& operator=(const HfModeloptWriter&) = delete;

  // Layers must arrive in order 0, 1, ...
  void add_layer(const quant::QuantizedLayer& layer);
  // Writes the rest (embeddings, final norm, lm_head, configs, tokenizer) and renames into place.
  void finish();

  std::uint64_t bytes_written() const { return total_bytes_; }
  const std::string& out_dir() const { return out_dir_; }

 private:
  void add(const std::string& name, const Tensor& tensor);
  void flush_shard();

  const io::Checkpoint& source_;
  std::string out_dir_;
  std::filesystem::path temp_dir_;
  quant::Recipe recipe_;
  std::uint64_t shard_bytes_;
  io::StreamingSafetensorsWriter shard_;
  std::uint64_t total_bytes_ = 0;
  std::vector<std::vector<std::string>> shard_names_;  // tensor names per written shard
  std::int64_t next_layer_ = 0;
  // Per-module schemes actually used, for the config files.
  std::vector<std::pair<std::string, quant::LinearScheme>> modules_;
  bool has_kv_ = false;
  bool finished_ = false;
};

// hf_quant_config.json's contents for the modules written (exported for tests).
nlohmann::json make_hf_quant_config(const std::vector<std::pair<std::string, quant::LinearScheme>>& modules,
                                    const std::string& kv_quant_algo);
// config.json's "quantization_config" derived from it, as the reference converts it.
nlohmann::json make_quantization_config(const nlohmann::json& hf_quant_config);

// Opens a quantized checkpoint and checks every quantized Linear's codes and
// scales against its format (dtypes, shapes, finite positive scales) without
// dequantizing anything; throws Error naming the file and tensor.
void validate_quantized_checkpoint(const std::string& dir);

// True when `dir` holds a quantized checkpoint (hf_quant_config.json, or a
// config.json "quantization_config" with quant_method "modelopt").
bool is_quantized_checkpoint(const std::string& dir);

// Loads a checkpoint, quantized or not (plain ones go to model::Model::load).
model::Model load_model(const std::string& dir);

}  // namespace mopt::exporter
