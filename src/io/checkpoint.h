// A Hugging Face checkpoint directory: config.json plus the weights as one
// model.safetensors or as shards listed in model.safetensors.index.json.
// Everything is memory-mapped and read lazily; open() validates the files and
// checks that the tensors are exactly the ones config.json calls for.
#pragma once

#include <cstdint>
#include <functional>
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

// What a checkpoint format stores besides (or instead of) the tensors config.json calls for.
// The default is the plain layout: every tensor exactly as config.json calls for, in f32/f16/bf16.
// A quantized format's reader (load/) gives its own: the decoder layers' Linear weights (and a
// quantized lm_head) are then left for the reader to check, and the format's own tensors (its
// scales, packed codes) are allowed. io/ knows no quantized format's names.
struct TensorLayout {
  // Decoder Linear weights may have any dtype and shape.
  bool reader_checks_linears = false;
  // True when lm_head.weight is stored quantized (any dtype and shape); nothing when empty.
  std::function<bool(const TensorStore& store)> quantized_head;
  // A tensor the format adds (full name); nothing when empty.
  std::function<bool(std::string_view name)> is_format_tensor;
  // A decoder Linear weight ("model.layers.3.mlp.up_proj.weight") the format stores under other
  // names (packed codes); nothing when empty.
  std::function<bool(const TensorStore& store, std::string_view weight)> stored_elsewhere;
};

class Checkpoint {
 public:
  // Opens and validates a model directory.
  static Checkpoint open(const std::string& dir, const TensorLayout& layout = {});

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
                                  const TensorLayout& layout = {});

// True for "model.layers.N.self_attn.q_proj.weight" and the other six Linear weights of a layer.
bool is_layer_linear_weight(std::string_view name);

}  // namespace mopt::io
