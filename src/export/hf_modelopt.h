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
// load/modelopt.h reads it back.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <set>
#include <utility>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "export/checkpoint_dir.h"
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
  // Destroyed before finish() completes, it leaves nothing at out_dir.
  HfModeloptWriter(const HfModeloptWriter&) = delete;
  HfModeloptWriter& operator=(const HfModeloptWriter&) = delete;

  // Layers must arrive in order 0, 1, ...
  void add_layer(const quant::QuantizedLayer& layer);
  // The quantized lm_head (what quantize_checkpoint's head_sink receives), after the last layer. With tied embeddings the
  // export unties them: lm_head.weight holds the head's codes, the embeddings stay as they were.
  void add_head(const quant::QuantizedLayer& head);
  // Where the tensors that are not handed in come from (norms, embeddings, unquantized weights): by
  // default the source checkpoint; `override` may give another value for any name (a trained model's),
  // returning std::nullopt for the source's own. The output's names and order stay the same.
  void set_tensor_override(std::function<std::optional<Tensor>(const std::string& name)> override) { override_ = std::move(override); }
  // Another file of the output (a training log), written before finish().
  void write_text(const std::string& file, const std::string& text) { dir_.write_text(file, text); }
  // Writes the rest (embeddings, final norm, lm_head, configs, tokenizer) and renames into place.
  void finish();

  std::uint64_t bytes_written() const { return dir_.bytes_written(); }
  const std::string& out_dir() const { return dir_.out_dir(); }

 private:
  void add(const std::string& name, const Tensor& tensor) { dir_.add(name, tensor); }
  void write_linear(const quant::QuantizedLinear& l);
  Tensor source_tensor(const std::string& name) const;

  const io::Checkpoint& source_;
  quant::Recipe recipe_;
  CheckpointDirWriter dir_;
  std::int64_t next_layer_ = 0;
  // Per-module schemes actually used, for the config files.
  std::vector<std::pair<std::string, quant::LinearScheme>> modules_;
  bool has_kv_ = false;
  bool head_written_ = false;
  std::set<std::string> head_tensors_;  // written by add_head
  std::function<std::optional<Tensor>(const std::string& name)> override_;
};

// hf_quant_config.json's contents for the modules written (exported for tests).
nlohmann::json make_hf_quant_config(const std::vector<std::pair<std::string, quant::LinearScheme>>& modules,
                                    const std::string& kv_quant_algo);
// config.json's "quantization_config" derived from it, as the reference converts it.
nlohmann::json make_quantization_config(const nlohmann::json& hf_quant_config);

}  // namespace mopt::exporter
