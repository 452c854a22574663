// A Hugging Face checkpoint directory: config.json plus the weights as one
// model.safetensors or as shards listed in model.safetensors.index.json.
// Everything is memory-mapped and read lazily; open() validates the files and
// checks that the tensors are exactly the ones config.json calls for.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

namespace mopt::io {

// The tensors of one or more safetensors files, found by name.
class TensorStore {
 public:
  // One .safetensors file.
  static TensorStore open_file(const std::string& path);
  // A directory: model.safetensors.index.json with its shards, else model.safetensors.
  static TensorStore open_dir(const std::string& dir);

  struct Location {
    const SafetensorsFile* file;
    const SafetensorsEntry* entry;
  };

  const std::vector<SafetensorsFile>& files() const { return files_; }
  // Every tensor, file by file, in data order.
  std::vector<Location> all() const;
  const Location* find(std::string_view name) const;
  bool contains(std::string_view name) const { return find(name) != nullptr; }
  // A view of the tensor; throws Error naming it if absent.
  Tensor tensor(std::string_view name) const;
  std::size_t size() const { return by_name_.size(); }

 TensorStore() = default;
  TensorStore(TensorStore&&) = default;
  TensorStore& operator=(TensorStore&&) = default;
  TensorStore(const TensorStore&) = delete;  // locations point into files_
  TensorStore& operator=(const TensorStore&) = delete;

 private:
  std::vector<SafetensorsFile> files_;
  std::unordered_map<std::string, Location> by_name_;
};

// What open() does not treat as a mismatch: buffers older savers wrote.
bool is_ignorable_tensor(std::string_view name);

// plain: every tensor exactly as config.json calls for, in f32/f16/bf16.
// quantized: as plain, except that the decoder layers' Linear weights may have
// any dtype and shape (their reader checks them) and the scale tensors a
// quantized checkpoint adds beside them (weight_scale, weight_scale_2,
// input_scale, pre_quant_scale, k_scale, v_scale; compressed-tensors'
// weight_packed in place of weight, weight_shape, weight_global_scale,
// input_global_scale, self_attn.k_scale/v_scale) are allowed.
enum class CheckpointLayout { plain, quantized };

class Checkpoint {
 public:
  // Opens and validates a model directory.
  static Checkpoint open(const std::string& dir, CheckpointLayout layout = CheckpointLayout::plain);

  const std::string& dir() const { return dir_; }
  const ModelConfig& config() const { return config_; }
  const TensorStore& tensors() const { return store_; }
  Tensor tensor(std::string_view name) const { return store_.tensor(name); }

 private:
  std::string dir_;
  ModelConfig config_;
  TensorStore store_;
};

// Throws one Error listing every missing, unexpected, mis-shaped or non-float
// tensor of `store` against what `config` calls for.
void check_tensors_against_config(const TensorStore& store, const ModelConfig& config, const std::string& label,
                                  CheckpointLayout layout = CheckpointLayout::plain);

// True for "model.layers.N.self_attn.q_proj.weight" and the other six Linear weights of a layer.
bool is_layer_linear_weight(std::string_view name);
// True for the names of the scale tensors a quantized checkpoint adds.
bool is_quantization_scale(std::string_view name);

}  // namespace mopt::io
