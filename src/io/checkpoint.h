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

class Checkpoint {
 public:
  // Opens and validates a model directory.
  static Checkpoint open(const std::string& dir);

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
void check_tensors_against_config(const TensorStore& store, const ModelConfig& config, const std::string& label);

}  // namespace mopt::io
