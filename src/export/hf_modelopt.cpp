#include "export/hf_modelopt.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <optional>
#include <set>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/gguf_convert.h"
#include "io/json_util.h"
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

}  // namespace

nlohmann::json make_hf_quant_config(const std::vector<std::pair<std::string, quant::LinearScheme>>& modules,
                                    const std::string& kv_quant_algo) {
  std::set<std::string> algos;
  std::vector<std::string> excluded;
  for (const auto& [name, s] : modules) {
    if (s.quantized()) algos.insert(s.quant_algo);
    else excluded.push_back(name);
  }
  excluded.insert(excluded.begin(), {"lm_head", "model.embed_tokens"});
  json q = json::object();
  if (algos.size() <= 1) {
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
    : source_(source), out_dir_(std::move(out_dir)), recipe_(recipe), shard_bytes_(shard_bytes) {
  if (fs::exists(out_dir_)) fail("{}: already exists (choose a new output directory)", out_dir_);
  temp_dir_ = io::make_temp_dir_beside(out_dir_);
}

HfModeloptWriter::~HfModeloptWriter() {
  if (!finished_) {
    std::error_code ec;
    fs::remove_all(temp_dir_, ec);
  }
}

void HfModeloptWriter::add(const std::string& name, const Tensor& tensor) {
  shard_.add(name, tensor);
  tensor.release_pages();  // a view of the source: copied, done with those pages
}

void HfModeloptWriter::flush_shard() {
  if (shard_.empty()) return;
  const std::string name = fmt::format("shard-{:05}.safetensors", shard_names_.size() + 1);
  total_bytes_ += shard_.bytes();
  shard_names_.push_back(shard_.names());
  shard_.write((temp_dir_ / name).string());
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
    modules_.emplace_back(l.name, l.scheme);
    if (!l.scheme.quantized()) continue;
    const auto& q = *l.weight;
    add(l.name + ".weight", q.weight);
    add(l.name + ".weight_scale", q.weight_scale);
    if (q.weight_scale_2) add(l.name + ".weight_scale_2", *q.weight_scale_2);
    if (!l.input_amax.empty()) add(l.name + ".input_scale", scalar_f32(quant::activation_scale(*l.scheme.input, l.input_amax[0])));
    if (!l.pre_quant_scale.empty()) add(l.name + ".pre_quant_scale", vector_as(l.pre_quant_scale, source_.config().dtype));
    written.insert(l.name + ".weight");
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
    add(name, source_.tensor(name));
  }
  if (shard_.bytes() >= shard_bytes_) flush_shard();
}

void HfModeloptWriter::finish() {
  const auto& c = source_.config();
  if (next_layer_ != c.num_layers) fail("the exporter got {} of {} layers", next_layer_, c.num_layers);
  for (const auto& loc : source_.tensors().all()) {
    const std::string& name = loc.entry->name;
    if (name.rfind("model.layers.", 0) == 0 || io::is_ignorable_tensor(name)) continue;
    add(name, source_.tensor(name));
  }
  flush_shard();
  // Final shard names and the index.
  const std::size_t n = shard_names_.size();
  json weight_map = json::object();
  for (std::size_t i = 0; i < n; ++i) {
    const std::string from = fmt::format("shard-{:05}.safetensors", i + 1);
    const std::string to = n == 1 ? "model.safetensors" : fmt::format("model-{:05}-of-{:05}.safetensors", i + 1, n);
    fs::rename(temp_dir_ / from, temp_dir_ / to);
    for (const auto& t : shard_names_[i]) weight_map[t] = to;
  }
  if (n > 1) {
    json index = {{"metadata", {{"total_size", total_bytes_}}}, {"weight_map", weight_map}};
    io::write_file_atomically((temp_dir_ / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  }
  const std::string kv_algo = has_kv_ ? quant::kv_scheme(*recipe_.kv_cache).quant_algo : "";
  const json hf_quant = make_hf_quant_config(modules_, kv_algo);
  io::write_file_atomically((temp_dir_ / "hf_quant_config.json").string(), hf_quant.dump(4) + "\n");
  json config = c.raw;
  config["quantization_config"] = make_quantization_config(hf_quant);
  io::write_file_atomically((temp_dir_ / "config.json").string(), config.dump(2) + "\n");
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"}) {
    const fs::path from = fs::path(source_.dir()) / f;
    if (fs::exists(from)) io::write_file_atomically((temp_dir_ / f).string(), io::read_text_file(from.string()));
  }
  // Read it back as any quantized checkpoint is read: it must validate.
  validate_quantized_checkpoint(temp_dir_.string());
  fs::rename(temp_dir_, out_dir_);
  finished_ = true;
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
      }
    }
  } catch (const json::exception& e) {
    fail("{}: malformed quantization config: {}", label, e.what());
  }
  if (!r.kv_algo.empty() && r.kv_algo != "FP8" && r.kv_algo != "NVFP4") fail("{}: kv_cache_quant_algo '{}' is not one mopt reads", label, r.kv_algo);
  return r;
}


struct ResolvedLinear {
  std::string name;
  quant::LinearScheme scheme;
  quant::QuantizedWeight weight;
  std::int64_t out = 0, in = 0;
};

// The quantized form of Linear `kind` of layer `index`, or nothing when it is stored plain.
std::optional<ResolvedLinear> resolve_linear(const io::Checkpoint& ckpt, const ReadConfig& rc, std::int64_t index,
                                             model::LinearKind kind, const std::string& dir) {
  const auto& c = ckpt.config();
  const auto& store = ckpt.tensors();
  ResolvedLinear r;
  r.name = fmt::format("model.layers.{}.{}", index, model::linear_name(kind));
  const Tensor weight = store.tensor(r.name + ".weight");
  if (!store.contains(r.name + ".weight_scale")) {
    const DType dt = weight.dtype();
    if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16) fail("{}: {}.weight is {} without a weight_scale", dir, r.name, dtype_name(dt));
    return std::nullopt;
  }
  std::string algo = rc.default_algo;
  std::int64_t group = rc.group_size;
  if (rc.default_algo == "MIXED_PRECISION") {
    const auto it = rc.per_layer.find(r.name);
    if (it == rc.per_layer.end()) fail("{}: {} has a weight_scale but no entry in quantized_layers", dir, r.name);
    algo = it->second.first;
    group = it->second.second;
  }
  r.scheme = scheme_for_algo(algo, group, dir);
  const std::int64_t q_dim = c.num_heads * c.head_dim, kv_dim = c.num_kv_heads * c.head_dim;
  switch (kind) {
    case model::LinearKind::q: r.out = q_dim, r.in = c.hidden_size; break;
    case model::LinearKind::k:
    case model::LinearKind::v: r.out = kv_dim, r.in = c.hidden_size; break;
    case model::LinearKind::o: r.out = c.hidden_size, r.in = q_dim; break;
    case model::LinearKind::gate:
    case model::LinearKind::up: r.out = c.intermediate_size, r.in = c.hidden_size; break;
    case model::LinearKind::down: r.out = c.hidden_size, r.in = c.intermediate_size; break;
  }
  r.weight.weight = weight;
  r.weight.weight_scale = store.tensor(r.name + ".weight_scale");
  if (store.contains(r.name + ".weight_scale_2")) r.weight.weight_scale_2 = store.tensor(r.name + ".weight_scale_2");
  quant::check_quantized_weight(*r.scheme.weight, r.weight, r.out, r.in, fmt::format("{}: {}", dir, r.name));
  return r;
}

}  // namespace

void validate_quantized_checkpoint(const std::string& dir) {
  const ReadConfig rc = read_quant_config(dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(dir, io::CheckpointLayout::quantized);
  for (std::int64_t l = 0; l < ckpt.config().num_layers; ++l) {
    for (const auto kind : model::kAllLinears) resolve_linear(ckpt, rc, l, kind, dir);
  }
}

model::Model load_model(const std::string& dir) {
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
  if (!is_quantized_checkpoint(dir)) return model::Model::load(dir);
  const ReadConfig rc = read_quant_config(dir);
  model::LoadOptions options;
  options.quantized = true;
  options.layer_loader = [rc, dir](const io::Checkpoint& ckpt, std::int64_t index) {
    model::LayerWeights w = model::load_layer(ckpt, index);
    const auto& store = ckpt.tensors();
    for (const auto kind : model::kAllLinears) {
      const auto resolved = resolve_linear(ckpt, rc, index, kind, dir);
      if (!resolved) continue;
      const std::string& name = resolved->name;
      const quant::LinearScheme& s = resolved->scheme;
      const std::int64_t out = resolved->out, in = resolved->in;
      model::Linear& lin = w.linear(kind);
      lin.weight = Tensor::from_f32(quant::dequantize_weight(*s.weight, resolved->weight, out, in), {out, in});
      const std::string& algo = s.quant_algo;
      std::vector<float> pre_quant_scale;
      if (store.contains(name + ".pre_quant_scale")) {
        const Tensor pqs = store.tensor(name + ".pre_quant_scale");
        if (pqs.numel() != static_cast<std::uint64_t>(in)) fail("{}: {}.pre_quant_scale has {} values for {} inputs", dir, name, pqs.numel(), in);
        pre_quant_scale = pqs.to_f32();
      }
      if (s.input) {
        quant::ActivationQuantizer aq{*s.input, {}, pre_quant_scale};
        if (s.input->needs_amax()) {
          if (!store.contains(name + ".input_scale")) fail("{}: {}.input_scale is missing ({} quantizes inputs)", dir, name, algo);
          const float scale = store.tensor(name + ".input_scale").to_f32().at(0);
          if (!std::isfinite(scale) || scale < 0.0f) fail("{}: {}.input_scale is {}", dir, name, scale);
          const float bound = s.input->scaling == quant::Scaling::nvfp4 ? 6.0f * 448.0f : s.input->max_bound();
          aq.amax = {scale * bound};
        }
        auto shared = std::make_shared<quant::ActivationQuantizer>(std::move(aq));
        lin.input_transform = [shared](float* x, std::int64_t rows, std::int64_t cols) { shared->apply(x, rows, cols); };
      } else if (!pre_quant_scale.empty()) {
        // Weight-only with a pre-quantization scale: only the scale applies to the input.
        auto pqs = std::make_shared<std::vector<float>>(std::move(pre_quant_scale));
        lin.input_transform = [pqs](float* x, std::int64_t rows, std::int64_t cols) {
          for (std::int64_t r = 0; r < rows; ++r) {
            for (std::int64_t c = 0; c < cols; ++c) x[r * cols + c] *= (*pqs)[static_cast<std::size_t>(c)];
          }
        };
      }
    }
    if (!rc.kv_algo.empty()) {
      const quant::KvScheme kv = quant::kv_scheme(rc.kv_algo == "FP8" ? "fp8" : "nvfp4");
      const float bound = kv.spec.scaling == quant::Scaling::nvfp4 ? 6.0f * 448.0f : 448.0f;
      const std::string p = fmt::format("model.layers.{}.self_attn.", index);
      for (const char* which : {"k", "v"}) {
        const std::string tname = p + which + "_proj." + which + "_scale";
        if (!store.contains(tname)) fail("{}: {} is missing (kv_cache_quant_algo {})", dir, tname, rc.kv_algo);
        auto q = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv.spec, {store.tensor(tname).to_f32().at(0) * bound}, {}});
        model::ActivationTransform t = [q](float* x, std::int64_t rows, std::int64_t cols) { q->apply(x, rows, cols); };
        (std::string(which) == "k" ? w.key_transform : w.value_transform) = t;
      }
    }
    return w;
  };
  return model::Model::load(dir, options);
}

}  // namespace mopt::exporter
