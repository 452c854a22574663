#include "load/modelopt.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <set>

#include "core/error.h"
#include "io/ggml_grid.h"
#include "io/json_util.h"
#include "quant/formats.h"

namespace mopt::load {

namespace fs = std::filesystem;
using nlohmann::json;

bool is_modelopt_checkpoint(const std::string& dir) {
  return fs::exists(fs::path(dir) / "hf_quant_config.json") || config_quant_method(dir) == "modelopt";
}

io::TensorLayout modelopt_layout() {
  io::TensorLayout layout;
  layout.reader_checks_linears = true;
  layout.quantized_head = [](const io::TensorStore& store) { return store.contains("lm_head.weight_scale"); };
  layout.is_format_tensor = [](std::string_view name) {
    if (name.starts_with("lm_head.")) {
      for (const char* suffix : {".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale"}) {
        if (name.ends_with(suffix)) return true;
      }
      return false;
    }
    if (!name.starts_with("model.layers.")) return false;
    for (const char* suffix : {".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale", ".k_proj.k_scale", ".v_proj.v_scale"}) {
      if (name.ends_with(suffix)) return true;
    }
    return false;
  };
  return layout;
}

namespace {

// The format a quant_algo names, as the reader rebuilds it (the format table's reader row).
quant::LinearScheme scheme_for_algo(const std::string& algo, std::int64_t group_size, const std::string& label) {
  const quant::FormatRow* row = quant::format_for_quant_algo(algo);
  if (row == nullptr) fail("{}: quant_algo '{}' is not one mopt reads", label, algo);
  return quant::format_scheme(row->name, row->group_size_option && group_size > 0 ? group_size : 0);
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
  std::string label;
  const json q = modelopt_quantization(dir, &label);
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
        if (e["gguf_blocks"] == io::ggml_block_name(t)) return t;
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
  if (!r.kv_algo.empty() && quant::kv_scheme_for_quant_algo(r.kv_algo) == nullptr) fail("{}: kv_cache_quant_algo '{}' is not one mopt reads", label, r.kv_algo);
  return r;
}


// A config that states no group size (config.json's quantization_config of an INT4 export: the
// reference's conversion leaves group_size in hf_quant_config.json only) is read by the scales' shape:
// [out, in / block] gives the block when the default's [out, ceil(in / 128)] does not fit it.
void infer_block_from_scales(quant::QuantizerSpec& w, const io::TensorStore& store, const std::string& name, std::int64_t in) {
  if (w.element != quant::Element::int4 || w.scaling != quant::Scaling::block || w.block_rows != 0) return;
  const io::TensorStore::Location* scale = store.find(name + ".weight_scale");
  if (scale == nullptr) return;
  const Shape& shape = scale->entry->shape;
  if (shape.size() != 2 || shape[1] <= 0 || (in + w.block - 1) / w.block == shape[1] || in % shape[1] != 0) return;
  w.block = in / shape[1];
}

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
  if (group == 0 && !gguf_blocks) infer_block_from_scales(*s.scheme.weight, store, s.name, in);
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

json modelopt_quantization(const std::string& dir, std::string* label) {
  const fs::path hf = fs::path(dir) / "hf_quant_config.json";
  const bool own_file = fs::exists(hf);
  const std::string path = own_file ? hf.string() : (fs::path(dir) / "config.json").string();
  if (label != nullptr) *label = path;
  const json j = io::parse_json_unique_keys(io::read_text_file(path), path);
  const char* key = own_file ? "quantization" : "quantization_config";
  if (!j.is_object() || !j.contains(key) || !j[key].is_object()) fail("{}: no \"{}\" object", path, key);
  return j[key];
}

QuantizedReader modelopt_reader(const std::string& dir) {
  const ReadConfig rc = read_quant_config(dir);
  QuantizedReader r;
  r.layout = modelopt_layout();
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

void validate_modelopt_checkpoint(const std::string& dir) {
  const QuantizedReader reader = modelopt_reader(dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir, reader.layout);
  for (std::int64_t l = 0; l < ckpt.config().num_layers; ++l) {
    for (const auto kind : model::kAllLinears) reader.linear(ckpt, l, kind);
    if (!reader.kv_algo.empty()) reader.kv_scales(ckpt, l);
  }
  if (reader.head) reader.head(ckpt);
}

}  // namespace mopt::load
