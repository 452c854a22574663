#include "export/hf_modelopt.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <set>

#include "core/cpu_features.h"
#include "core/error.h"
#include "io/atomic_file.h"
#include "io/ggml_grid.h"
#include "io/gguf.h"
#include "io/gguf_convert.h"
#include "io/json_util.h"
#include "core/convert.h"
#include "load/modelopt.h"
#include "quant/act_quant.h"

#ifndef MOPT_VERSION_STRING
#define MOPT_VERSION_STRING "0.1.0"
#endif

namespace mopt::exporter {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

Tensor scalar_f32(float v) {
  Tensor t = Tensor::zeros(DType::F32, {});
  t.mutable_data<float>()[0] = v;
  return t;
}

Tensor vector_as(const std::vector<float>& v, DType dtype) {
  return Tensor::from_f32(v, {static_cast<std::int64_t>(v.size())}).to(dtype);
}

// Group size the config files report for a scheme (0: none).
std::int64_t reported_group_size(const quant::LinearScheme& s) {
  if (!s.weight) return 0;
  if (s.weight->scaling == quant::Scaling::block && s.weight->block_rows == 0) return s.weight->block;
  if (s.weight->scaling == quant::Scaling::nvfp4 || s.weight->scaling == quant::Scaling::mx) return s.weight->block;
  return 0;
}

// One quant_algo's entry, as the reference writes it: group_size for the
// block formats, and has_zero_point/pre_quant_scale for the AWQ-family names
// (the reference states pre_quant_scale true for them whatever the algorithm).
json layer_quant_entry(const quant::LinearScheme& s) {
  json e = {{"quant_algo", s.quant_algo}};
  if (const auto g = reported_group_size(s); g > 0) e["group_size"] = g;
  if (s.quant_algo == "W4A16_AWQ" || s.quant_algo == "W4A8_AWQ" || s.quant_algo == "NVFP4_AWQ") {
    e["has_zero_point"] = false;
    e["pre_quant_scale"] = true;
  }
  // mopt's own key, never in a checkpoint handed to users: INT4 on Q4_0's grid (signed f16 scales)
  // is written only as the staging checkpoint of a GGUF Q4_0 export.
  if (s.weight && s.weight->grid == quant::IntGrid::q4_0) e["int4_grid"] = "q4_0";
  // Likewise a weight stored as a GGUF file's blocks of that type ("q4_k", ...), no weight_scale.
  if (s.weight && s.weight->grid == quant::IntGrid::ggml) e["gguf_blocks"] = io::ggml_block_name(s.weight->ggml_type);
  return e;
}

// A compressed-tensors style description of one quant_algo (config.json's config_groups).
json group_config(const std::string& algo, std::int64_t group_size) {
  auto f = [](int bits, const char* type, std::int64_t g) {
    json j = {{"dynamic", false}, {"num_bits", bits}, {"type", type}};
    if (g > 0) j["group_size"] = g;
    return j;
  };
  if (algo == "FP8") return {{"input_activations", f(8, "float", 0)}, {"weights", f(8, "float", 0)}};
  if (algo == "FP8_PER_CHANNEL_PER_TOKEN") {
    json w = f(8, "float", 0);
    w["strategy"] = "channel";
    return {{"input_activations", f(8, "float", 0)}, {"weights", w}};
  }
  if (algo == "NVFP4") {
    const std::int64_t g = group_size > 0 ? group_size : 16;
    return {{"input_activations", f(4, "float", g)}, {"weights", f(4, "float", g)}};
  }
  if (algo == "W4A16_AWQ") return {{"weights", f(4, "int", group_size > 0 ? group_size : 128)}};
  if (algo == "NVFP4_AWQ" || algo == "W4A8_AWQ") {
    const std::int64_t g = group_size > 0 ? group_size : 128;
    return {{"input_activations", f(8, "float", g)}, {"weights", f(4, "float", g)}};
  }
  if (algo == "W8A16") return {{"weights", f(8, "int", 0)}};
  if (algo == "W8A8_SQ_PER_CHANNEL") {
    json w = f(8, "int", 0);
    w["strategy"] = "channel";
    return {{"input_activations", f(8, "int", 0)}, {"weights", w}};
  }
  if (algo == "MXFP8") {
    const std::int64_t g = group_size > 0 ? group_size : 32;
    return {{"input_activations", f(8, "float", g)}, {"weights", f(8, "float", g)}};
  }
  return {{"quant_algo", algo}};
}

bool needs_pre_quant_scale(const quant::QuantizedLinear& l) {
  const auto ends_with = [&](std::string_view suffix) {
    return l.name.size() >= suffix.size() && std::string_view(l.name).substr(l.name.size() - suffix.size()) == suffix;
  };
  return (l.scheme.quant_algo == "W4A16_AWQ" || l.scheme.quant_algo == "W4A8_AWQ") && (ends_with(".o_proj") || ends_with(".down_proj"));
}

}  // namespace

nlohmann::json make_hf_quant_config(const std::vector<std::pair<std::string, quant::LinearScheme>>& modules,
                                    const std::string& kv_quant_algo) {
  std::vector<std::string> excluded;
  for (const auto& [name, s] : modules) {
    if (!s.quantized()) excluded.push_back(name);
  }
  const bool head_quantized = std::any_of(modules.begin(), modules.end(), [](const auto& m) { return m.first == "lm_head" && m.second.quantized(); });
  excluded.insert(excluded.begin(), "model.embed_tokens");
  if (!head_quantized) excluded.insert(excluded.begin(), "lm_head");
  json q = json::object();
  // One entry for all when every quantized Linear's entry is the same (one format, one kind of blocks).
  std::set<std::string> entries;
  for (const auto& [name, s] : modules) {
    if (s.quantized()) entries.insert(layer_quant_entry(s).dump());
  }
  if (entries.size() <= 1) {
    quant::LinearScheme first;
    for (const auto& [name, s] : modules) {
      if (s.quantized()) {
        first = s;
        break;
      }
    }
    if (first.quantized()) q = layer_quant_entry(first);
    else q["quant_algo"] = nullptr;
  } else {
    q["quant_algo"] = "MIXED_PRECISION";
    json layers = json::object();
    for (const auto& [name, s] : modules) {
      if (s.quantized()) layers[name] = layer_quant_entry(s);
    }
    q["quantized_layers"] = layers;
  }
  q["kv_cache_quant_algo"] = kv_quant_algo.empty() ? json(nullptr) : json(kv_quant_algo);
  q["exclude_modules"] = excluded;
  return {{"producer", {{"name", "mopt"}, {"version", MOPT_VERSION_STRING}}}, {"quantization", q}};
}

nlohmann::json make_quantization_config(const nlohmann::json& hf_quant_config) {
  // The reference's conversion of hf_quant_config.json into config.json's quantization_config.
  const json& q = hf_quant_config.at("quantization");
  json c = json::object();
  const std::string algo = q.contains("quant_algo") && q["quant_algo"].is_string() ? q["quant_algo"].get<std::string>() : "";
  const std::int64_t group = q.contains("group_size") && q["group_size"].is_number_integer() ? q["group_size"].get<std::int64_t>() : 0;
  if (algo == "FP8" || algo == "NVFP4") {
    json g = group_config(algo, group);
    g["targets"] = {"Linear"};
    c["config_groups"] = {{"group_0", g}};
  } else if (algo == "MIXED_PRECISION") {
    // One group per distinct layer entry, in order of first appearance, targets sorted.
    std::vector<std::pair<json, std::vector<std::string>>> groups;
    for (const auto& item : q.at("quantized_layers").items()) {
      const json& entry = item.value();
      auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == entry; });
      if (it == groups.end()) groups.push_back({entry, {item.key()}});
      else it->second.push_back(item.key());
    }
    json config_groups = json::object();
    for (std::size_t i = 0; i < groups.size(); ++i) {
      const json& entry = groups[i].first;
      json g = group_config(entry.at("quant_algo").get<std::string>(), entry.value("group_size", std::int64_t{0}));
      std::sort(groups[i].second.begin(), groups[i].second.end());
      g["targets"] = groups[i].second;
      config_groups[fmt::format("group_{}", i)] = g;
    }
    c["config_groups"] = config_groups;
    c["quantized_layers"] = q.at("quantized_layers");
  }
  c["ignore"] = q.contains("exclude_modules") ? q["exclude_modules"] : json::array();
  if (!algo.empty()) c["quant_algo"] = algo;
  if (q.contains("kv_cache_quant_algo") && q["kv_cache_quant_algo"].is_string()) {
    const std::string kv = q["kv_cache_quant_algo"].get<std::string>();
    c["kv_cache_scheme"] = kv == "FP8" ? json{{"dynamic", false}, {"num_bits", 8}, {"type", "float"}} : json(kv);
  }
  c["producer"] = hf_quant_config.at("producer");
  c["quant_method"] = "modelopt";
  return c;
}

HfModeloptWriter::HfModeloptWriter(const io::Checkpoint& source, std::string out_dir, const quant::Recipe& recipe,
                                   std::uint64_t shard_bytes)
    : source_(source), recipe_(recipe), dir_(std::move(out_dir), shard_bytes) {}

Tensor HfModeloptWriter::source_tensor(const std::string& name) const {
  if (override_) {
    if (std::optional<Tensor> t = override_(name)) return std::move(*t);
  }
  return source_.tensor(name);
}

void HfModeloptWriter::write_linear(const quant::QuantizedLinear& l) {
  modules_.emplace_back(l.name, l.scheme);
  if (!l.scheme.quantized()) return;
  const auto& q = *l.weight;
  add(l.name + ".weight", q.weight);
  if (l.scheme.weight->grid != quant::IntGrid::ggml) add(l.name + ".weight_scale", q.weight_scale);
  if (q.weight_scale_2) add(l.name + ".weight_scale_2", *q.weight_scale_2);
  if (!l.input_amax.empty()) add(l.name + ".input_scale", scalar_f32(quant::activation_scale(*l.scheme.input, l.input_amax[0])));
  if (!l.pre_quant_scale.empty()) {
    add(l.name + ".pre_quant_scale", vector_as(l.pre_quant_scale, source_.config().dtype));
  } else if (needs_pre_quant_scale(l) && l.scheme.weight->grid != quant::IntGrid::ggml) {
    // TensorRT-LLM's AWQ loaders read pre_quant_scale on every unfused Linear (o_proj, down_proj) and
    // fail without one; the reference writes none when no AWQ scale was searched. A scale of ones.
    add(l.name + ".pre_quant_scale", vector_as(std::vector<float>(static_cast<std::size_t>(q.weight.dim(1)), 1.0f), source_.config().dtype));
  }
}

void HfModeloptWriter::add_layer(const quant::QuantizedLayer& layer) {
  if (layer.index != next_layer_) fail("layer {} handed to the exporter out of order (expected {})", layer.index, next_layer_);
  ++next_layer_;
  const std::string prefix = fmt::format("model.layers.{}.", layer.index);
  std::set<std::string> written;
  for (const auto& [name, tensor] : layer.replaced) {
    add(name, tensor);
    written.insert(name);
  }
  for (const auto& l : layer.linears) {
    write_linear(l);
    if (l.scheme.quantized()) written.insert(l.name + ".weight");
  }
  if (layer.key_amax && layer.value_amax && recipe_.kv_cache) {
    const quant::KvScheme kv = quant::kv_scheme(*recipe_.kv_cache);
    add(prefix + "self_attn.k_proj.k_scale", scalar_f32(quant::activation_scale(kv.spec, *layer.key_amax)));
    add(prefix + "self_attn.v_proj.v_scale", scalar_f32(quant::activation_scale(kv.spec, *layer.value_amax)));
    has_kv_ = true;
  }
  // Everything else of the layer (norms, biases, unquantized weights) as stored.
  for (const auto& loc : source_.tensors().all()) {
    const std::string& name = loc.entry->name;
    if (name.rfind(prefix, 0) != 0 || written.count(name) || io::is_ignorable_tensor(name)) continue;
    add(name, source_tensor(name));
  }
  dir_.maybe_flush();
}

void HfModeloptWriter::add_head(const quant::QuantizedLayer& head) {
  const auto& c = source_.config();
  if (next_layer_ != c.num_layers) fail("lm_head handed to the exporter before the last layer ({} of {} written)", next_layer_, c.num_layers);
  if (head_written_) fail("lm_head handed to the exporter twice");
  if (head.linears.size() != 1 || head.linears[0].name != "lm_head" || !head.linears[0].scheme.quantized()) {
    fail("the exporter's head must be the one quantized Linear lm_head");
  }
  for (const auto& [name, tensor] : head.replaced) {
    if (name != "model.norm.weight") fail("the head may replace only model.norm.weight, not {}", name);
    add(name, tensor);
    head_tensors_.insert(name);
  }
  write_linear(head.linears[0]);
  head_tensors_.insert("lm_head.weight");
  head_written_ = true;
  dir_.maybe_flush();
}

void HfModeloptWriter::finish() {
  const auto& c = source_.config();
  if (next_layer_ != c.num_layers) fail("the exporter got {} of {} layers", next_layer_, c.num_layers);
  for (const auto& loc : source_.tensors().all()) {
    const std::string& name = loc.entry->name;
    if (name.rfind("model.layers.", 0) == 0 || io::is_ignorable_tensor(name) || head_tensors_.count(name)) continue;
    add(name, source_tensor(name));
  }
  const bool quantized = has_kv_ || std::any_of(modules_.begin(), modules_.end(), [](const auto& m) { return m.second.quantized(); });
  if (!quantized) {
    // Nothing quantized (pruning alone): a plain checkpoint in the source's dtypes, which every
    // engine loads as the model it is (the pruned weights are zeros in it).
    dir_.write_json("config.json", c.raw, 2);
    dir_.copy_model_files(source_.dir());
    dir_.commit([](const std::string& dir) { io::Checkpoint::open(dir); });
    return;
  }
  const std::string kv_algo = has_kv_ ? quant::kv_scheme(*recipe_.kv_cache).quant_algo : "";
  const json hf_quant = make_hf_quant_config(modules_, kv_algo);
  dir_.write_json("hf_quant_config.json", hf_quant, 4);
  json config = c.raw;
  // A quantized lm_head of a tied model is its own tensor now: engines must not tie it back to the embeddings.
  if (head_written_ && c.tie_word_embeddings) config["tie_word_embeddings"] = false;
  config["quantization_config"] = make_quantization_config(hf_quant);
  dir_.write_json("config.json", config, 2);
  dir_.copy_model_files(source_.dir());
  // Read it back as any quantized checkpoint is read: it must validate.
  dir_.commit([](const std::string& dir) { load::validate_modelopt_checkpoint(dir); });
}

}  // namespace mopt::exporter
