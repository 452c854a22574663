// A Hugging Face checkpoint directory written safely: tensors stream into
// safetensors shards of at most `shard_bytes` as they fill (memory stays at
// one shard), the files are built in OUT.tmp-XXXXXX beside the target, and
// commit() renames that onto OUT only when everything is on disk. A writer
// destroyed before commit() removes its temporary directory: a failure midway
// leaves nothing at OUT.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/tensor.h"
#include "io/safetensors.h"

namespace mopt::exporter {

class CheckpointDirWriter {
 public:
  CheckpointDirWriter(std::string out_dir, std::uint64_t shard_bytes);
  ~CheckpointDirWriter();
  CheckpointDirWriter(const CheckpointDirWriter&) = delete;
  CheckpointDirWriter& operator=(const CheckpointDirWriter&) = delete;

  // Adds a tensor to the current shard (its pages are released if it maps a file).
  void add(const std::string& name, const Tensor& tensor);
  // Writes the current shard out if it has reached the limit (call between layers).
  void maybe_flush();
  void write_json(const std::string& file, const nlohmann::json& j, int indent);
  void write_text(const std::string& file, const std::string& text);
  // Copies the tokenizer and generation files of `source_dir` that exist.
  void copy_model_files(const std::string& source_dir);
  // Names the shards (model.safetensors, or model-0000i-of-0000N plus the
  // index), runs `validate` on the finished temporary directory, and renames it onto OUT.
  void commit(const std::function<void(const std::string& dir)>& validate);

  std::uint64_t bytes_written() const { return total_bytes_; }
  const std::string& out_dir() const { return out_dir_; }

 private:
  void flush();

  std::string out_dir_;
  std::filesystem::path temp_dir_;
  std::uint64_t shard_bytes_;
  io::StreamingSafetensorsWriter shard_;
  std::uint64_t total_bytes_ = 0;
  std::vector<std::vector<std::string>> shard_names_;
  bool committed_ = false;
};

}  // namespace mopt::exporter
