#include "load/load_model.h"

#include <filesystem>

#include "io/atomic_file.h"
#include "io/gguf_convert.h"
#include "load/compressed_tensors.h"
#include "load/modelopt.h"

namespace mopt::load {

namespace fs = std::filesystem;

CheckpointFormat checkpoint_format(const std::string& path) {
  if (fs::is_regular_file(path) && fs::path(path).extension() == ".gguf") return CheckpointFormat::gguf;
  if (is_compressed_tensors_checkpoint(path)) return CheckpointFormat::compressed_tensors;
  if (is_modelopt_checkpoint(path)) return CheckpointFormat::modelopt;
  return CheckpointFormat::plain;
}

bool is_quantized_checkpoint(const std::string& path) {
  const CheckpointFormat format = checkpoint_format(path);
  return format == CheckpointFormat::modelopt || format == CheckpointFormat::compressed_tensors;
}

std::optional<QuantizedReader> quantized_reader(const std::string& dir) {
  switch (checkpoint_format(dir)) {
    case CheckpointFormat::modelopt: return modelopt_reader(dir);
    case CheckpointFormat::compressed_tensors: return compressed_tensors_reader(dir);
    case CheckpointFormat::plain:
    case CheckpointFormat::gguf: break;
  }
  return std::nullopt;
}

io::Checkpoint open_checkpoint(const std::string& dir) {
  switch (checkpoint_format(dir)) {
    case CheckpointFormat::modelopt: return io::Checkpoint::open(dir, modelopt_layout());
    case CheckpointFormat::compressed_tensors: return io::Checkpoint::open(dir, compressed_tensors_layout());
    case CheckpointFormat::plain:
    case CheckpointFormat::gguf: break;
  }
  return io::Checkpoint::open(dir);
}

model::Model load_model(const std::string& path, QuantizedRun run) {
  if (checkpoint_format(path) == CheckpointFormat::gguf) {
    // A llama.cpp file: its tensors dequantized to f32 in a temporary checkpoint, which can go as soon as the
    // model has mapped it (the mappings outlive the names).
    const std::string tmp = io::make_temp_dir_beside((fs::temp_directory_path() / "mopt-gguf").string());
    const std::string conv = tmp + "/model";
    try {
      io::convert_gguf_to_hf(path, conv, {}, DType::F32);
      model::Model m = model::Model::load(conv);
      fs::remove_all(tmp);
      return m;
    } catch (...) {
      std::error_code ec;
      fs::remove_all(tmp, ec);
      throw;
    }
  }
  if (const auto reader = quantized_reader(path)) return load_quantized(path, *reader, run);
  return model::Model::load(path);
}

}  // namespace mopt::load
