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
#include "export/compressed_tensors.h"
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

// The name a staging checkpoint gives a ggml block type: llama.cpp's, lower case ("q4_k").
std::string ggml_block_name(io::GgmlType type) {
  std::string name(io::ggml_type_info(static_cast<std::uint32_t>(type))->name);
  for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return name;
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
  if (s.weight && s.weight->grid == quant::IntGrid::ggml) e["gguf_blocks"] = ggml_block_name(s.weight->ggml_type);
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
  dir_.commit([](const std::string& dir) { validate_quantized_checkpoint(dir); });
}

bool is_quantized_checkpoint(const std::string& dir) {
  if (fs::exists(fs::path(dir) / "hf_quant_config.json")) return true;
  const fs::path config = fs::path(dir) / "config.json";
  if (!fs::exists(config)) return false;
  const json j = io::parse_json_unique_keys(io::read_text_file(config.string()), config.string());
  return j.is_object() && j.contains("quantization_config") && j["quantization_config"].is_object() &&
         j["quantization_config"].value("quant_method", "") == "modelopt";
}

namespace {

// The format a quant_algo names, as the reader rebuilds it.
quant::LinearScheme scheme_for_algo(const std::string& algo, std::int64_t group_size, const std::string& label) {
  std::string format;
  if (algo == "FP8") format = "fp8";
  else if (algo == "FP8_PER_CHANNEL_PER_TOKEN") format = "fp8_pc_pt";
  else if (algo == "fp8_pb_wo" || algo == "FP8_PB_WO") format = "fp8_block";
  else if (algo == "W8A8_SQ_PER_CHANNEL") format = "int8";
  else if (algo == "W8A16") format = "int8_wo";
  else if (algo == "W4A16_AWQ") format = "int4_rtn";
  else if (algo == "W4A8_AWQ") format = "w4a8_awq";
  else if (algo == "NVFP4") format = "nvfp4";
  else if (algo == "NVFP4_AWQ") format = "nvfp4_awq";
  else if (algo == "MXFP8") format = "mxfp8";
  else if (algo == "mxfp4" || algo == "MXFP4") format = "mxfp4";
  else fail("{}: quant_algo '{}' is not one mopt reads", label, algo);
  const bool int4 = format == "int4_rtn" || format == "w4a8_awq";
  return quant::format_scheme(format, int4 && group_size > 0 ? group_size : 0);
}

struct ReadConfig {
  std::string default_algo;
  std::int64_t group_size = 0;
  bool q4_0_grid = false;               // "int4_grid": "q4_0" at the top
  std::set<std::string> q4_0_layers;    // ... or in a MIXED_PRECISION layer's entry
  std::optional<io::GgmlType> gguf_blocks;                // "gguf_blocks": "q4_k" at the top
  std::map<std::string, io::GgmlType> gguf_block_layers;  // ... or in a layer's entry
  std::map<std::string, std::pair<std::string, std::int64_t>> per_layer;  // MIXED_PRECISION
  std::vector<std::string> exclude;
  std::string kv_algo;
};

ReadConfig read_quant_config(const std::string& dir) {
  json q;
  std::string label;
  const fs::path hf = fs::path(dir) / "hf_quant_config.json";
  if (fs::exists(hf)) {
    label = hf.string();
    const json j = io::parse_json_unique_keys(io::read_text_file(label), label);
    if (!j.is_object() || !j.contains("quantization") || !j["quantization"].is_object()) fail("{}: no \"quantization\" object", label);
    q = j["quantization"];
  } else {
    label = (fs::path(dir) / "config.json").string();
    q = io::parse_json_unique_keys(io::read_text_file(label), label).at("quantization_config");
  }
  ReadConfig r;
  try {
    if (q.contains("quant_algo") && q["quant_algo"].is_string()) r.default_algo = q["quant_algo"].get<std::string>();
    if (q.contains("group_size") && q["group_size"].is_number_integer()) r.group_size = q["group_size"].get<std::int64_t>();
    const auto q4_0_grid = [&](const json& e) {
      if (!e.contains("int4_grid")) return false;
      if (e["int4_grid"] != "q4_0") fail("{}: int4_grid {} is not one mopt reads (q4_0)", label, e["int4_grid"].dump());
      return true;
    };
    r.q4_0_grid = q4_0_grid(q);
    const auto gguf_blocks = [&](const json& e) -> std::optional<io::GgmlType> {
      if (!e.contains("gguf_blocks")) return std::nullopt;
      for (const io::GgmlType t : io::ggml_grid_types()) {
        if (e["gguf_blocks"] == ggml_block_name(t)) return t;
      }
      fail("{}: gguf_blocks {} is not one mopt reads (q4_0, q5_0, q8_0, q4_k, q6_k)", label, e["gguf_blocks"].dump());
    };
    r.gguf_blocks = gguf_blocks(q);
    if (q.contains("exclude_modules") && q["exclude_modules"].is_array()) r.exclude = q["exclude_modules"].get<std::vector<std::string>>();
    if (q.contains("kv_cache_quant_algo") && q["kv_cache_quant_algo"].is_string()) r.kv_algo = q["kv_cache_quant_algo"].get<std::string>();
    if (r.default_algo == "MIXED_PRECISION") {
      for (const auto& item : q.at("quantized_layers").items()) {
        const json& e = item.value();
        std::int64_t group = 0;
        if (e.contains("group_size")) {
          if (!e["group_size"].is_number_integer()) fail("{}: {}: group_size must be an integer", label, item.key());
          group = e["group_size"].get<std::int64_t>();
        }
        r.per_layer[item.key()] = {e.at("quant_algo").get<std::string>(), group};
        if (q4_0_grid(e)) r.q4_0_layers.insert(item.key());
        if (const auto t = gguf_blocks(e)) r.gguf_block_layers[item.key()] = *t;
      }
    }
  } catch (const json::exception& e) {
    fail("{}: malformed quantization config: {}", label, e.what());
  }
  if (!r.kv_algo.empty() && r.kv_algo != "FP8" && r.kv_algo != "NVFP4") fail("{}: kv_cache_quant_algo '{}' is not one mopt reads", label, r.kv_algo);
  return r;
}


}  // namespace

std::pair<std::int64_t, std::int64_t> linear_shape(const io::ModelConfig& c, model::LinearKind kind) {
  const std::int64_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  switch (kind) {
    case model::LinearKind::q: return {q_dim, c.hidden_size};
    case model::LinearKind::k:
    case model::LinearKind::v: return {kv_dim, c.hidden_size};
    case model::LinearKind::o: return {c.hidden_size, q_dim};
    case model::LinearKind::gate:
    case model::LinearKind::up: return {c.intermediate_size, c.hidden_size};
    case model::LinearKind::down: return {c.hidden_size, c.intermediate_size};
  }
  return {0, 0};
}

namespace {

// A Linear named `name` ([out, in]) as stored: nothing when it is a plain float weight.
std::optional<StoredLinear> read_stored_linear(const ReadConfig& rc, const std::string& dir, const io::Checkpoint& ckpt, const std::string& name,
                                             std::int64_t out, std::int64_t in) {
  const auto& store = ckpt.tensors();
  StoredLinear s;
  s.name = name;
  const Tensor weight = store.tensor(s.name + ".weight");
  std::optional<io::GgmlType> gguf_blocks = rc.gguf_blocks;
  if (rc.default_algo == "MIXED_PRECISION") {
    const auto it = rc.gguf_block_layers.find(s.name);
    gguf_blocks = it == rc.gguf_block_layers.end() ? std::nullopt : std::optional(it->second);
  }
  if (!store.contains(s.name + ".weight_scale") && !(gguf_blocks && weight.dtype() == DType::U8)) {
    const DType dt = weight.dtype();
    if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16) fail("{}: {}.weight is {} without a weight_scale", dir, s.name, dtype_name(dt));
    return std::nullopt;
  }
  std::string algo = rc.default_algo;
  std::int64_t group = rc.group_size;
  bool q4_0_grid = rc.q4_0_grid;
  if (rc.default_algo == "MIXED_PRECISION") {
    const auto it = rc.per_layer.find(s.name);
    if (it == rc.per_layer.end()) fail("{}: {} has a weight_scale but no entry in quantized_layers", dir, s.name);
    algo = it->second.first;
    group = it->second.second;
    q4_0_grid = rc.q4_0_layers.contains(s.name);
  }
  s.scheme = scheme_for_algo(algo, group, dir);
  if (q4_0_grid) {
    auto& w = *s.scheme.weight;
    if (w.element != quant::Element::int4 || w.scaling != quant::Scaling::block || w.fp8_second_stage) {
      fail("{}: {} is {}, which has no Q4_0 grid", dir, s.name, algo);
    }
    w.grid = quant::IntGrid::q4_0;
  }
  if (gguf_blocks) {
    auto& w = *s.scheme.weight;
    const bool int4 = w.element == quant::Element::int4 && w.scaling == quant::Scaling::block && !w.fp8_second_stage;
    const bool int8 = w.element == quant::Element::int8 && w.scaling == quant::Scaling::per_row;
    if (!int4 && !int8) fail("{}: {} is {}, which is not stored in GGUF blocks", dir, s.name, algo);
    w.grid = quant::IntGrid::ggml;
    w.ggml_type = *gguf_blocks;
    w.scaling = quant::Scaling::block;
    w.block = io::ggml_type_info(static_cast<std::uint32_t>(*gguf_blocks))->block_elements;
    w.block_rows = 0;
  }
  s.out = out;
  s.in = in;
  s.weight.weight = weight;
  if (!gguf_blocks) s.weight.weight_scale = store.tensor(s.name + ".weight_scale");
  if (store.contains(s.name + ".weight_scale_2")) s.weight.weight_scale_2 = store.tensor(s.name + ".weight_scale_2");
  quant::check_quantized_weight(*s.scheme.weight, s.weight, s.out, s.in, fmt::format("{}: {}", dir, s.name));
  if (store.contains(s.name + ".pre_quant_scale")) {
    const Tensor pqs = store.tensor(s.name + ".pre_quant_scale");
    if (pqs.numel() != static_cast<std::uint64_t>(s.in)) fail("{}: {}.pre_quant_scale has {} values for {} inputs", dir, s.name, pqs.numel(), s.in);
    s.pre_quant_scale = pqs.to_f32();
    for (const float v : s.pre_quant_scale) {
      if (!(v > 0.0f) || !std::isfinite(v)) fail("{}: {}.pre_quant_scale holds {}", dir, s.name, v);
    }
    // A scale of ones (written for TensorRT-LLM's sake) changes nothing.
    if (std::all_of(s.pre_quant_scale.begin(), s.pre_quant_scale.end(), [](float v) { return v == 1.0f; })) s.pre_quant_scale.clear();
  }
  if (s.scheme.input && s.scheme.input->needs_amax()) {
    if (!store.contains(s.name + ".input_scale")) fail("{}: {}.input_scale is missing ({} quantizes inputs)", dir, s.name, algo);
    const Tensor t = store.tensor(s.name + ".input_scale");
    if (t.numel() != 1) fail("{}: {}.input_scale has {} values, expected 1", dir, s.name, t.numel());
    s.input_scale = t.to_f32().at(0);
  }
  return s;
}

}  // namespace

QuantizedReader modelopt_reader(const std::string& dir) {
  const ReadConfig rc = read_quant_config(dir);
  QuantizedReader r;
  r.kv_algo = rc.kv_algo;
  r.linear = [rc, dir](const io::Checkpoint& ckpt, std::int64_t index, model::LinearKind kind) {
    const auto [out, in] = linear_shape(ckpt.config(), kind);
    return read_stored_linear(rc, dir, ckpt, fmt::format("model.layers.{}.{}", index, model::linear_name(kind)), out, in);
  };
  r.head = [rc, dir](const io::Checkpoint& ckpt) -> std::optional<StoredLinear> {
    if (!ckpt.tensors().contains("lm_head.weight_scale")) return std::nullopt;
    const auto& c = ckpt.config();
    if (c.tie_word_embeddings) fail("{}: lm_head is stored quantized but config.json ties it to the embeddings", dir);
    return read_stored_linear(rc, dir, ckpt, "lm_head", c.vocab_size, c.hidden_size);
  };
  r.kv_scales = [dir, kv = rc.kv_algo](const io::Checkpoint& ckpt, std::int64_t index) {
    const std::string p = fmt::format("model.layers.{}.self_attn.", index);
    std::array<float, 2> v{};
    for (int i = 0; i < 2; ++i) {
      const std::string tname = p + (i == 0 ? "k_proj.k_scale" : "v_proj.v_scale");
      if (!ckpt.tensors().contains(tname)) fail("{}: {} is missing (kv_cache_quant_algo {})", dir, tname, kv);
      v[static_cast<std::size_t>(i)] = ckpt.tensor(tname).to_f32().at(0);
    }
    return std::pair<float, float>{v[0], v[1]};
  };
  return r;
}

void validate_quantized_checkpoint(const std::string& dir) {
  const QuantizedReader reader = modelopt_reader(dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir, io::CheckpointLayout::quantized);
  for (std::int64_t l = 0; l < ckpt.config().num_layers; ++l) {
    for (const auto kind : model::kAllLinears) reader.linear(ckpt, l, kind);
    if (!reader.kv_algo.empty()) reader.kv_scales(ckpt, l);
  }
  if (reader.head) reader.head(ckpt);
}

kernels::QuantizedWeightSource kernel_source(const StoredLinear& st) {
  using kernels::QuantizedWeightType;
  const quant::QuantizerSpec& spec = *st.scheme.weight;
  if (spec.grid == quant::IntGrid::ggml) fail("{}: stored as GGUF blocks (a staging form); run the .gguf file instead", st.name);
  kernels::QuantizedWeightSource k;
  k.out = st.out;
  k.in = st.in;
  const std::int64_t nb_in = spec.block > 0 ? (st.in + spec.block - 1) / spec.block : 1;
  auto bytes_of = [](const Tensor& t) {
    const auto b = t.bytes();
    return std::vector<std::uint8_t>(reinterpret_cast<const std::uint8_t*>(b.data()), reinterpret_cast<const std::uint8_t*>(b.data()) + b.size());
  };
  switch (spec.element) {
    case quant::Element::int4: {
      // The export pairs rows in a byte; the kernels want each row's codes together.
      const std::vector<std::int8_t> codes = quant::unpack_int4_rows(st.weight.weight, st.out, st.in);
      const std::int64_t row_bytes = (st.in + 1) / 2;
      k.codes.assign(static_cast<std::size_t>(st.out * row_bytes), 0);
      for (std::int64_t r = 0; r < st.out; ++r) {
        for (std::int64_t c = 0; c < st.in; ++c) {
          const auto n = static_cast<std::uint8_t>(codes[static_cast<std::size_t>(r * st.in + c)] & 0x0F);
          k.codes[static_cast<std::size_t>(r * row_bytes + c / 2)] |= static_cast<std::uint8_t>(c % 2 == 0 ? n : n << 4);
        }
      }
      k.block = spec.block;
      const std::vector<float> scales = st.weight.weight_scale.to_f32();
      if (!spec.fp8_second_stage) {
        k.type = QuantizedWeightType::int4;
        k.scales = scales;
        break;
      }
      // W4A8: each block's 16 INT4 values after the FP8 stage, as E4M3 codes of one scale.
      k.type = QuantizedWeightType::int4_fp8_table;
      float amax2 = st.weight.weight_scale_2->to_f32().at(0) * kE4M3Max;
      if (!(amax2 > 5.9604644775390625e-08f)) amax2 = 1.0f;
      const float scale = (1.0f / amax2) * kE4M3Max;
      k.table_scale = 1.0f / scale;
      k.block_tables.resize(scales.size() * 16);
      for (std::size_t b = 0; b < scales.size(); ++b) {
        for (int u = 0; u < 16; ++u) {
          const float v = static_cast<float>(u - 8) * scales[b];
          k.block_tables[b * 16 + static_cast<std::size_t>(u)] = f32_to_e4m3(std::clamp(v * scale, -kE4M3Max, kE4M3Max));
        }
      }
      break;
    }
    case quant::Element::int8:
      k.type = QuantizedWeightType::int8;
      k.stored_codes = st.weight.weight;  // used where it is mapped (W8A8 pads a copy)
      k.scales = st.weight.weight_scale.to_f32();
      k.block = st.in;
      if (st.scheme.input && st.scheme.input->element == quant::Element::int8) {
        k.int8_activations = true;
        k.input_amax = st.input_scale.value_or(0.0f) * st.scheme.input->max_bound();
      }
      break;
    case quant::Element::e4m3: {
      k.type = QuantizedWeightType::e4m3;
      k.stored_codes = st.weight.weight;  // used where it is mapped
      if (spec.scaling == quant::Scaling::mx) {
        k.block = spec.block;
        for (const auto c : bytes_of(st.weight.weight_scale)) k.scales.push_back(e8m0_to_f32(c));
      } else if (spec.scaling == quant::Scaling::per_tensor) {
        k.block = st.in;
        k.scales.assign(static_cast<std::size_t>(st.out), st.weight.weight_scale.to_f32().at(0));
      } else if (spec.scaling == quant::Scaling::per_row) {
        k.block = st.in;
        k.scales = st.weight.weight_scale.to_f32();
      } else {
        // 2-D tiles: every row of a tile repeats the tile row's scales.
        k.block = spec.block;
        const std::vector<float> tiles = st.weight.weight_scale.to_f32();
        for (std::int64_t r = 0; r < st.out; ++r) {
          for (std::int64_t b = 0; b < nb_in; ++b) k.scales.push_back(tiles[static_cast<std::size_t>((r / spec.block_rows) * nb_in + b)]);
        }
      }
      break;
    }
    case quant::Element::e2m1: {
      k.type = QuantizedWeightType::e2m1;
      k.codes = bytes_of(st.weight.weight);
      k.block = spec.block;
      k.scale_codes = bytes_of(st.weight.weight_scale);
      k.scale_code_values.resize(256);
      const float global = st.weight.weight_scale_2 ? st.weight.weight_scale_2->to_f32().at(0) : 1.0f;
      for (int c = 0; c < 256; ++c) {
        const auto code = static_cast<std::uint8_t>(c);
        k.scale_code_values[static_cast<std::size_t>(c)] = spec.scaling == quant::Scaling::nvfp4 ? e4m3_to_f32(code) * global : e8m0_to_f32(code);
      }
      break;
    }
  }
  return k;
}

namespace {

// Sets `lin` up from a stored quantized Linear: the kernels' weight (or the dequantized one) and the
// input's fake quantization and pre-quantization scale; a bias stays as it is.
void set_quantized_linear(StoredLinear& stored, QuantizedRun run, const std::string& dir, model::Linear& lin) {
  const quant::LinearScheme& s = stored.scheme;
  bool input_in_kernel = false;
  std::optional<kernels::Sparse24Linear> sparse;
  kernels::QuantizedWeightSource source;
  if (run == QuantizedRun::kernels) {
    source = kernel_source(stored);
    // A 2:4 weight of int8 (weight-only) or FP8 codes with one scale per row runs the sparse kernels
    // where they pay: with AVX-512 (bench/sparse24_bench: 1.3x the dense kernel's decode; the AVX2
    // variant only matches the dense one, whose one-byte codes it cannot beat by enough to pay for the
    // gather). W8A8 and INT4 (groups of 64 or more) where their byte-permute kernels run (AVX-512 VBMI
    // and VNNI, inputs a multiple of 128; 1.6x and 1.1-1.2x the dense decode).
    const CpuFeatures& cpu = cpu_features();
    const bool w8a8 = source.type == kernels::QuantizedWeightType::int8 && source.int8_activations;
    const bool int4 = source.type == kernels::QuantizedWeightType::int4;
    const bool vbmi = cpu.avx512bw && cpu.avx512_vbmi && cpu.avx512_vnni && source.in % 128 == 0;
    const bool sparse_type =
        w8a8 || int4 ? vbmi
                     : cpu.avx512f && (source.type == kernels::QuantizedWeightType::e4m3 || source.type == kernels::QuantizedWeightType::int8);
    const std::int64_t groups = source.block > 0 ? (source.in + source.block - 1) / source.block : 0;
    const std::size_t code_bytes = static_cast<std::size_t>(int4 ? source.out * ((source.in + 1) / 2) : source.out * source.in);
    if (kernels::sparse_kernels_enabled() && sparse_type && (int4 ? source.block % 64 == 0 : source.block >= source.in) &&
        static_cast<std::int64_t>(source.scales.size()) == source.out * groups) {
      const auto* codes = !source.codes.empty() ? source.codes.data() : reinterpret_cast<const std::uint8_t*>(source.stored_codes.bytes().data());
      const std::string label = fmt::format("{}: {}", dir, stored.name);
      if (source.codes.size() + source.stored_codes.nbytes() == code_bytes) {
        if (int4) {
          sparse = kernels::Sparse24Linear::compress_int4(codes, source.out, source.in, source.block, source.scales, label);
        } else if (w8a8) {
          sparse = kernels::Sparse24Linear::compress_w8a8(codes, source.out, source.in, source.scales, source.input_amax, label);
        } else {
          sparse = kernels::Sparse24Linear::compress(
              source.type == kernels::QuantizedWeightType::e4m3 ? kernels::Sparse24Values::e4m3 : kernels::Sparse24Values::int8, codes,
              source.out, source.in, source.scales, label);
        }
      }
    }
  }
  if (sparse) {
    input_in_kernel = sparse->int8_activations();
    lin.sparse = std::make_shared<const kernels::Sparse24Linear>(std::move(*sparse));
    stored.weight.weight.release_pages();
    lin.weight = Tensor();
  } else if (run == QuantizedRun::kernels) {
    auto q = std::make_shared<const kernels::PackedLinear>(std::move(source), fmt::format("{}: {}", dir, stored.name));
    input_in_kernel = q->int8_activations();
    // What the kernel copied into its own layout need not stay resident from the file.
    if (q->source().stored_codes.nbytes() == 0) stored.weight.weight.release_pages();
    lin.quantized = std::move(q);
    lin.weight = Tensor();
  } else {
    lin.weight = Tensor::from_f32(quant::dequantize_weight(*s.weight, stored.weight, stored.out, stored.in), {stored.out, stored.in});
  }
  std::vector<float> pre_quant_scale = std::move(stored.pre_quant_scale);
  if (s.input && !input_in_kernel) {
    quant::ActivationQuantizer aq{*s.input, {}, pre_quant_scale};
    if (s.input->needs_amax()) {
      const float scale = stored.input_scale.value_or(-1.0f);
      if (!std::isfinite(scale) || scale < 0.0f) fail("{}: {}'s input scale is {}", dir, stored.name, scale);
      const float bound = s.input->scaling == quant::Scaling::nvfp4 ? 6.0f * 448.0f : s.input->max_bound();
      aq.amax = {scale * bound};
    }
    auto shared = std::make_shared<quant::ActivationQuantizer>(std::move(aq));
    lin.input_transform = [shared](float* x, std::int64_t rows, std::int64_t cols) { shared->apply(x, rows, cols); };
  } else if (!pre_quant_scale.empty()) {
    // Weight-only with a pre-quantization scale, or W8A8 whose kernel quantizes the input:
    // only the scale applies to the input here.
    auto pqs = std::make_shared<std::vector<float>>(std::move(pre_quant_scale));
    lin.input_transform = [pqs](float* x, std::int64_t rows, std::int64_t cols) {
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t c = 0; c < cols; ++c) x[r * cols + c] *= (*pqs)[static_cast<std::size_t>(c)];
      }
    };
  }
}

}  // namespace

model::Model load_quantized(const std::string& dir, const QuantizedReader& reader, QuantizedRun run) {
  if (!reader.kv_algo.empty() && reader.kv_algo != "FP8" && reader.kv_algo != "NVFP4") {
    fail("{}: KV-cache quantization '{}' is not one mopt reads", dir, reader.kv_algo);
  }
  model::LoadOptions options;
  options.quantized = true;
  options.layer_loader = [reader, dir, run](const io::Checkpoint& ckpt, std::int64_t index) {
    model::LayerWeights w = model::load_layer(ckpt, index);
    for (const auto kind : model::kAllLinears) {
      auto stored = reader.linear(ckpt, index, kind);
      if (!stored) {
        if (reader.dense_weight) {
          if (auto t = reader.dense_weight(ckpt, fmt::format("model.layers.{}.{}", index, model::linear_name(kind)))) w.linear(kind).weight = std::move(*t);
        }
        continue;
      }
      set_quantized_linear(*stored, run, dir, w.linear(kind));
    }
    if (!reader.kv_algo.empty()) {
      const quant::KvScheme kv = quant::kv_scheme(reader.kv_algo == "FP8" ? "fp8" : "nvfp4");
      const float bound = kv.spec.scaling == quant::Scaling::nvfp4 ? 6.0f * 448.0f : 448.0f;
      const auto [k_scale, v_scale] = reader.kv_scales(ckpt, index);
      for (const float v : {k_scale, v_scale}) {
        if (!std::isfinite(v) || v < 0.0f) fail("{}: layer {}'s KV-cache scale is {}", dir, index, v);
      }
      auto kq = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv.spec, {k_scale * bound}, {}});
      auto vq = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv.spec, {v_scale * bound}, {}});
      if (reader.kv_algo == "FP8") w.kv_e4m3_amax = std::pair<float, float>{k_scale * bound, v_scale * bound};
      w.key_transform = [kq](float* x, std::int64_t rows, std::int64_t cols) { kq->apply(x, rows, cols); };
      w.value_transform = [vq](float* x, std::int64_t rows, std::int64_t cols) { vq->apply(x, rows, cols); };
    }
    return w;
  };
  if (reader.head) {
    options.head_loader = [reader, dir, run](const io::Checkpoint& ckpt) -> std::optional<model::Linear> {
      auto stored = reader.head(ckpt);
      if (!stored) return std::nullopt;
      model::Linear head;
      set_quantized_linear(*stored, run, dir, head);
      return head;
    };
  }
  return model::Model::load(dir, options);
}

model::Model load_model(const std::string& dir, QuantizedRun run) {
  if (std::filesystem::is_regular_file(dir) && std::filesystem::path(dir).extension() == ".gguf") {
    // A llama.cpp file: its tensors dequantized to f32 in a temporary checkpoint, which can go as soon as the
    // model has mapped it (the mappings outlive the names).
    const std::string tmp = io::make_temp_dir_beside((std::filesystem::temp_directory_path() / "mopt-gguf").string());
    const std::string conv = tmp + "/model";
    try {
      io::convert_gguf_to_hf(dir, conv, {}, DType::F32);
      model::Model m = model::Model::load(conv);
      std::filesystem::remove_all(tmp);
      return m;
    } catch (...) {
      std::error_code ec;
      std::filesystem::remove_all(tmp, ec);
      throw;
    }
  }
  if (is_compressed_tensors_checkpoint(dir)) return load_quantized(dir, compressed_tensors_reader(dir), run);
  if (!is_quantized_checkpoint(dir)) return model::Model::load(dir);
  return load_quantized(dir, modelopt_reader(dir), run);
}

}  // namespace mopt::exporter
