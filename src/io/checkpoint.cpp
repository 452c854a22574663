#include "io/checkpoint.h"

#include <filesystem>
#include <set>

#include "core/error.h"
#include "io/json_util.h"

namespace mopt::io {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find('\0') == std::string::npos;
}

// "a, b, c and 4 more"
std::string list_some(const std::vector<std::string>& items, std::size_t limit = 8) {
  std::string s;
  for (std::size_t i = 0; i < items.size() && i < limit; ++i) {
    if (i) s += ", ";
    s += items[i];
  }
  if (items.size() > limit) s += fmt::format(" and {} more", items.size() - limit);
  return s;
}

}  // namespace

TensorStore TensorStore::open_file(const std::string& path) {
  TensorStore store;
  store.files_.push_back(SafetensorsFile::open(path));
  for (const auto& e : store.files_.back().entries()) {
    store.by_name_.emplace(e.name, Location{&store.files_.back(), &e});
  }
  return store;
}

TensorStore TensorStore::open_dir(const std::string& dir) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir);
  const fs::path index_path = fs::path(dir) / kIndexName;
  TensorStore store;
  if (fs::exists(index_path)) {
    const std::string label = index_path.string();
    const json index = with_context(label, [&] { return parse_json_unique_keys(read_text_file(label), "index"); });
    const auto map_it = index.is_object() ? index.find("weight_map") : index.end();
    if (map_it == index.end() || !map_it->is_object()) fail("{}: missing object 'weight_map'", label);
    // Shards in order of first mention, each opened once.
    std::vector<std::string> shard_names;
    std::set<std::string> seen;
    for (const auto& [tensor, shard] : map_it->items()) {
      if (!shard.is_string()) fail("{}: weight_map entry '{}' must name a file", label, printable(tensor));
      const auto name = shard.get<std::string>();
      if (!is_plain_file_name(name)) fail("{}: weight_map entry '{}' names '{}', not a file in this directory", label, printable(tensor), printable(name));
      if (seen.insert(name).second) shard_names.push_back(name);
    }
    if (shard_names.empty()) fail("{}: weight_map is empty", label);
    store.files_.reserve(shard_names.size());
    for (const auto& name : shard_names) store.files_.push_back(SafetensorsFile::open((fs::path(dir) / name).string()));
    for (const auto& file : store.files_) {
      for (const auto& e : file.entries()) {
        const auto [it, inserted] = store.by_name_.emplace(e.name, Location{&file, &e});
        if (!inserted) fail("tensor '{}' is in both {} and {}", e.name, it->second.file->path(), file.path());
      }
    }
    for (const auto& [tensor, shard] : map_it->items()) {
      const auto it = store.by_name_.find(tensor);
      const std::string shard_path = (fs::path(dir) / shard.get<std::string>()).string();
      if (it == store.by_name_.end() || it->second.file->path() != shard_path) {
        fail("{}: tensor '{}' is listed in {} but not found there", label, printable(tensor), shard.get<std::string>());
      }
    }
    if (store.by_name_.size() != map_it->size()) {
      for (const auto& [name, loc] : store.by_name_) {
        if (!map_it->contains(name)) fail("{}: tensor '{}' in {} is missing from the index", label, name, loc.file->path());
      }
    }
    return store;
  }
  const fs::path single = fs::path(dir) / kSingleName;
  if (!fs::exists(single)) fail("{}: no {} or {} found", dir, kSingleName, kIndexName);
  return open_file(single.string());
}

std::vector<TensorStore::Location> TensorStore::all() const {
  std::vector<Location> out;
  out.reserve(by_name_.size());
  for (const auto& file : files_) {
    for (const auto& e : file.entries()) out.push_back({&file, &e});
  }
  return out;
}

const TensorStore::Location* TensorStore::find(std::string_view name) const {
  const auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &it->second;
}

Tensor TensorStore::tensor(std::string_view name) const {
  const Location* loc = find(name);
  if (loc == nullptr) fail("no tensor named '{}' in the checkpoint", name);
  return loc->file->tensor(name);
}

bool is_ignorable_tensor(std::string_view name) {
  constexpr std::string_view kRotary = ".rotary_emb.inv_freq";  // a buffer transformers < 4.31 saved
  return name.size() >= kRotary.size() && name.substr(name.size() - kRotary.size()) == kRotary;
}

bool is_layer_linear_weight(std::string_view name) {
  if (name.substr(0, 13) != "model.layers.") return false;
  for (const char* module : {".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
                             ".self_attn.o_proj.weight", ".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight"}) {
    if (name.ends_with(module)) return true;
  }
  return false;
}

void check_tensors_against_config(const TensorStore& store, const ModelConfig& config, const std::string& label,
                                  const TensorLayout& layout) {
  const bool quantized = layout.reader_checks_linears;
  const auto format_tensor = [&](std::string_view name) { return layout.is_format_tensor && layout.is_format_tensor(name); };
  std::vector<std::string> missing, unexpected, wrong;
  std::set<std::string> expected_names;
  for (const auto& t : expected_tensors(config)) {
    expected_names.insert(t.name);
    const auto* loc = store.find(t.name);
    if (loc == nullptr && layout.stored_elsewhere && is_layer_linear_weight(t.name) && layout.stored_elsewhere(store, t.name)) {
      continue;  // the format stores it under other names
    }
    if (loc == nullptr) {
      missing.push_back(t.name);
      continue;
    }
    if (quantized && is_layer_linear_weight(t.name)) continue;
    if (t.name == "lm_head.weight" && layout.quantized_head && layout.quantized_head(store)) {
      continue;  // a quantized head: checked by the reader
    }
    if (loc->entry->shape != t.shape) {
      wrong.push_back(fmt::format("{} has shape {}, expected {}", t.name, shape_string(loc->entry->shape), shape_string(t.shape)));
    } else if (loc->entry->dtype != DType::F32 && loc->entry->dtype != DType::F16 && loc->entry->dtype != DType::BF16) {
      wrong.push_back(fmt::format("{} has dtype {}, expected f32, f16 or bf16", t.name, dtype_name(loc->entry->dtype)));
    }
  }
  for (const auto& loc : store.all()) {
    const std::string& name = loc.entry->name;
    if (expected_names.count(name) || is_ignorable_tensor(name)) continue;
    if (format_tensor(name)) continue;
    // Some savers store the tied lm_head anyway; it must still fit.
    if (name == "lm_head.weight" && config.tie_word_embeddings &&
        loc.entry->shape == Shape{config.vocab_size, config.hidden_size}) {
      continue;
    }
    unexpected.push_back(name);
  }
  if (missing.empty() && unexpected.empty() && wrong.empty()) return;
  std::string msg = fmt::format("{}: tensors do not match config.json ({}, {} layers):", label, config.architecture, config.num_layers);
  if (!missing.empty()) msg += fmt::format(" missing {} [{}];", missing.size(), list_some(missing));
  if (!unexpected.empty()) msg += fmt::format(" unexpected {} [{}];", unexpected.size(), list_some(unexpected));
  if (!wrong.empty()) msg += fmt::format(" wrong {} [{}];", wrong.size(), list_some(wrong));
  msg.pop_back();
  throw Error(msg);
}

Checkpoint Checkpoint::open(const std::string& dir, const TensorLayout& layout) {
  if (!fs::is_directory(dir)) fail("{}: not a directory", dir);
  Checkpoint c;
  c.dir_ = dir;
  c.config_ = load_model_config((fs::path(dir) / "config.json").string());
  c.store_ = TensorStore::open_dir(dir);
  check_tensors_against_config(c.store_, c.config_, dir, layout);
  return c;
}

}  // namespace mopt::io
