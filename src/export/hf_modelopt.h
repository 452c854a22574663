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
#include "kernels/qlinear.h"
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

// One quantized Linear of a stored checkpoint, in the modelopt layout
// (quant/qtensor.h) whatever the file's own format.
struct StoredLinear {
  std::string name;  // "model.layers.3.self_attn.q_proj"
  quant::LinearScheme scheme;
  quant::QuantizedWeight weight;
  std::int64_t out = 0, in = 0;
  std::vector<float> pre_quant_scale;  // empty: none
  std::optional<float> input_scale;    // the static activation scale (amax / bound), when the scheme has one
};

// How a quantized checkpoint format is read: its Linears (nothing for one
// stored plain) and its KV-cache scales.
struct QuantizedReader {
  std::function<std::optional<StoredLinear>(const io::Checkpoint&, std::int64_t layer, model::LinearKind)> linear;
  // The lm_head when it is stored quantized (empty function or nothing: a 16-bit head).
  std::function<std::optional<StoredLinear>(const io::Checkpoint&)> head;
  std::string kv_algo;  // "", "FP8", "NVFP4"
  std::function<std::pair<float, float>(const io::Checkpoint&, std::int64_t layer)> kv_scales;  // k_scale, v_scale
  // An unquantized Linear's weight stored in another form (compressed-tensors' sparse-24-bitmask),
  // dense; nothing (or no function): module.weight as stored.
  std::function<std::optional<Tensor>(const io::Checkpoint&, const std::string& module)> dense_weight;
};

// The modelopt format's reader (hf_quant_config.json or config.json's quantization_config).
QuantizedReader modelopt_reader(const std::string& dir);
// [out, in] of Linear `kind` under `config`.
std::pair<std::int64_t, std::int64_t> linear_shape(const io::ModelConfig& config, model::LinearKind kind);
// How a quantized checkpoint's Linears run.
enum class QuantizedRun {
  kernels,     // weights stay quantized and run by the quantized kernels (kernels/qlinear.h)
  fake_quant,  // weights dequantized to f32 (the definition the kernels are held to)
};
// The weight of a stored Linear in the kernels' terms (codes, scales, W8A8's input amax).
kernels::QuantizedWeightSource kernel_source(const StoredLinear& stored);

// A model whose quantized Linears fake-quantize their inputs (and keys/values) as the
// checkpoint's scales say, with weights run as `run` says (W8A8 with the kernels quantizes
// its input to int8 inside the kernel).
model::Model load_quantized(const std::string& dir, const QuantizedReader& reader, QuantizedRun run = QuantizedRun::kernels);

// Opens a quantized checkpoint and checks every quantized Linear's codes and
// scales against its format (dtypes, shapes, finite positive scales) without
// dequantizing anything; throws Error naming the file and tensor.
void validate_quantized_checkpoint(const std::string& dir);

// True when `dir` holds a quantized checkpoint (hf_quant_config.json, or a
// config.json "quantization_config" with quant_method "modelopt").
bool is_quantized_checkpoint(const std::string& dir);

// Loads a checkpoint: plain, modelopt, compressed-tensors, or a .gguf file.
model::Model load_model(const std::string& dir, QuantizedRun run = QuantizedRun::kernels);

}  // namespace mopt::exporter
