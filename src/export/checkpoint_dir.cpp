#include "export/checkpoint_dir.h"

#include <fmt/format.h>

#include "core/error.h"
#include "core/signal_cleanup.h"
#include "io/atomic_file.h"
#include "io/json_util.h"

namespace mopt::exporter {

namespace fs = std::filesystem;
using nlohmann::json;

CheckpointDirWriter::CheckpointDirWriter(std::string out_dir, std::uint64_t shard_bytes)
    : out_dir_(std::move(out_dir)), shard_bytes_(shard_bytes) {
  if (fs::exists(out_dir_)) fail("{}: already exists (choose a new output directory)", out_dir_);
  temp_dir_ = io::make_temp_dir_beside(out_dir_);
}

CheckpointDirWriter::~CheckpointDirWriter() {
  if (!committed_) {
    std::error_code ec;
    fs::remove_all(temp_dir_, ec);
    keep_on_signal(temp_dir_.string());
  }
}

void CheckpointDirWriter::add(const std::string& name, const Tensor& tensor) {
  shard_.add(name, tensor);
  tensor.release_pages();
}

void CheckpointDirWriter::maybe_flush() {
  if (shard_.bytes() >= shard_bytes_) flush();
}

void CheckpointDirWriter::flush() {
  if (shard_.empty()) return;
  const std::string name = fmt::format("shard-{:05}.safetensors", shard_names_.size() + 1);
  total_bytes_ += shard_.bytes();
  shard_names_.push_back(shard_.names());
  shard_.write((temp_dir_ / name).string());
}

void CheckpointDirWriter::write_json(const std::string& file, const json& j, int indent) {
  io::write_file_atomically((temp_dir_ / file).string(), j.dump(indent) + "\n");
}

void CheckpointDirWriter::write_text(const std::string& file, const std::string& text) {
  io::write_file_atomically((temp_dir_ / file).string(), text);
}

void CheckpointDirWriter::copy_model_files(const std::string& source_dir) {
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"}) {
    const fs::path from = fs::path(source_dir) / f;
    if (fs::exists(from)) io::write_file_atomically((temp_dir_ / f).string(), io::read_text_file(from.string()));
  }
}

void CheckpointDirWriter::commit(const std::function<void(const std::string& dir)>& validate) {
  flush();
  const std::size_t n = shard_names_.size();
  json weight_map = json::object();
  for (std::size_t i = 0; i < n; ++i) {
    const std::string from = fmt::format("shard-{:05}.safetensors", i + 1);
    const std::string to = n == 1 ? "model.safetensors" : fmt::format("model-{:05}-of-{:05}.safetensors", i + 1, n);
    fs::rename(temp_dir_ / from, temp_dir_ / to);
    for (const auto& t : shard_names_[i]) weight_map[t] = to;
  }
  if (n > 1) write_json("model.safetensors.index.json", {{"metadata", {{"total_size", total_bytes_}}}, {"weight_map", weight_map}}, 2);
  if (validate) validate(temp_dir_.string());
  fs::rename(temp_dir_, out_dir_);
  keep_on_signal(temp_dir_.string());
  committed_ = true;
}

}  // namespace mopt::exporter
