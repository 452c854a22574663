#include "load/summary.h"

#include <filesystem>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/gguf.h"
#include "io/json_util.h"
#include "load/load_model.h"
#include "load/modelopt.h"

namespace mopt::load {

using namespace mopt::io;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const char* rope_scaling_name(RopeScalingType t) {
  switch (t) {
    case RopeScalingType::none: return "none";
    case RopeScalingType::linear: return "linear";
    case RopeScalingType::llama3: return "llama3";
  }
  return "?";
}

void add_tensors(json& out, const TensorStore& store) {
  std::map<std::string, std::uint64_t> bytes_by_dtype;
  std::uint64_t total = 0;
  std::uint64_t elements = 0;
  json tensors = json::array();
  for (const auto& loc : store.all()) {
    const auto& e = *loc.entry;
    const std::string dtype(dtype_safetensors_name(e.dtype).value_or(dtype_name(e.dtype)));
    const std::uint64_t bytes = e.end - e.begin;
    bytes_by_dtype[dtype] += bytes;
    total += bytes;
    if (!is_ignorable_tensor(e.name)) elements += shape_numel(e.shape);
    tensors.push_back({{"name", e.name},
                       {"dtype", dtype},
                       {"shape", e.shape},
                       {"bytes", bytes},
                       {"file", fs::path(loc.file->path()).filename().string()}});
  }
  json files = json::array();
  for (const auto& f : store.files()) files.push_back(fs::path(f.path()).filename().string());
  out["files"] = files;
  out["tensor_count"] = store.size();
  out["parameters"] = elements;
  out["bytes_by_dtype"] = bytes_by_dtype;
  out["total_bytes"] = total;
  out["tensors"] = tensors;
}

void add_gguf(json& out, const std::string& path) {
  const GgufFile g = GgufFile::open(path);
  out["kind"] = "gguf";
  out["gguf_version"] = g.header().version;
  if (const auto arch = g.find_string("general.architecture")) {
    out["architecture"] = *arch;
    if (const auto n = g.find_uint(*arch + ".block_count")) out["num_layers"] = *n;
    if (const auto n = g.find_uint(*arch + ".embedding_length")) out["hidden_size"] = *n;
  }
  out["metadata_count"] = g.header().metadata.size();
  std::map<std::string, std::uint64_t> bytes_by_type;
  std::uint64_t total = 0, elements = 0;
  json tensors = json::array();
  for (const auto& t : g.header().tensors) {
    bytes_by_type[std::string(t.type.name)] += t.bytes;
    total += t.bytes;
    elements += t.elements();
    tensors.push_back({{"name", t.name}, {"dtype", t.type.name}, {"shape", t.shape()}, {"bytes", t.bytes}, {"file", fs::path(path).filename().string()}});
  }
  out["files"] = json::array({fs::path(path).filename().string()});
  out["tensor_count"] = g.header().tensors.size();
  out["parameters"] = elements;
  out["bytes_by_dtype"] = bytes_by_type;
  out["total_bytes"] = total;
  out["tensors"] = tensors;
}

bool is_gguf_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  char magic[4] = {};
  const bool gguf = std::fread(magic, 1, 4, f) == 4 && std::memcmp(magic, "GGUF", 4) == 0;
  std::fclose(f);
  return gguf || fs::path(path).extension() == ".gguf";
}

}  // namespace

json summarize(const std::string& path) {
  json out;
  out["path"] = path;
  if (fs::is_directory(path)) {
    const CheckpointFormat format = checkpoint_format(path);
    const Checkpoint ckpt = open_checkpoint(path);
    const ModelConfig& c = ckpt.config();
    out["kind"] = "model";
    if (format == CheckpointFormat::compressed_tensors) {
      const std::string config_path = (fs::path(path) / "config.json").string();
      const json q = parse_json_unique_keys(read_text_file(config_path), config_path).at("quantization_config");
      out["quantization"] = {{"quant_algo", "compressed-tensors " + q.value("format", std::string("?"))},
                             {"kv_cache_quant_algo", q.contains("kv_cache_scheme") && q["kv_cache_scheme"].is_object() ? json("FP8") : json(nullptr)}};
    } else if (format == CheckpointFormat::modelopt) {
      out["quantization"] = modelopt_quantization(path);
    }
    out["architecture"] = c.architecture;
    out["model_type"] = c.model_type;
    out["num_layers"] = c.num_layers;
    out["hidden_size"] = c.hidden_size;
    out["intermediate_size"] = c.intermediate_size;
    out["num_heads"] = c.num_heads;
    out["num_kv_heads"] = c.num_kv_heads;
    out["head_dim"] = c.head_dim;
    out["vocab_size"] = c.vocab_size;
    out["max_position_embeddings"] = c.max_position_embeddings;
    out["rope_theta"] = c.rope_theta;
    out["rope_scaling"] = rope_scaling_name(c.rope_scaling.type);
    out["tie_word_embeddings"] = c.tie_word_embeddings;
    out["dtype"] = dtype_name(c.dtype);
    add_tensors(out, ckpt.tensors());
    // The model's parameter count (a tied lm_head once), as transformers counts it.
    out["parameters"] = parameter_count(c);
    return out;
  }
  if (!fs::exists(path)) fail("{}: no such file or directory", path);
  if (is_gguf_file(path)) {
    add_gguf(out, path);
    return out;
  }
  out["kind"] = "file";
  add_tensors(out, TensorStore::open_file(path));
  return out;
}

}  // namespace mopt::load
