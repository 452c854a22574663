#include "export/conformance.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <optional>
#include <set>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "io/json_util.h"
#include "load/compressed_tensors.h"
#include "load/quantized.h"
#include "model/llama.h"
#include "quant/recipe.h"

namespace mopt::exporter {

namespace fs = std::filesystem;
using nlohmann::json;

const char* engine_name(Engine engine) { return engine == Engine::vllm ? "vLLM" : "TensorRT-LLM"; }

namespace {

struct Ctx {
  const io::TensorStore& store;
  std::vector<std::string>& errors;
  Engine engine;

  template <typename... Args>
  void error(fmt::format_string<Args...> f, Args&&... args) {
    errors.push_back(fmt::format("{}: {}", engine_name(engine), fmt::format(f, std::forward<Args>(args)...)));
  }
  const io::SafetensorsEntry* find(const std::string& name) {
    const auto* loc = store.find(name);
    return loc ? loc->entry : nullptr;
  }
  // A tensor that must exist with one of `dtypes` and `shape` (an empty shape list: any shape of `numel` elements).
  void expect(const std::string& name, std::initializer_list<DType> dtypes, std::optional<Shape> shape, std::int64_t numel = -1) {
    const auto* e = find(name);
    if (!e) {
      error("{} is missing", name);
      return;
    }
    if (std::find(dtypes.begin(), dtypes.end(), e->dtype) == dtypes.end()) error("{} is {}, which the loader does not take", name, dtype_name(e->dtype));
    if (shape && e->shape != *shape) error("{} has shape {}, expected {}", name, shape_string(e->shape), shape_string(*shape));
    if (numel >= 0 && static_cast<std::int64_t>(shape_numel(e->shape)) != numel) {
      error("{} has {} elements, expected {}", name, shape_numel(e->shape), numel);
    }
  }
  void expect_absent_or_float(const std::string& name) {
    const auto* e = find(name);
    if (e && e->dtype != DType::F32 && e->dtype != DType::F16 && e->dtype != DType::BF16) error("{} is {} in an unquantized module", name, dtype_name(e->dtype));
  }
};

constexpr std::initializer_list<DType> kFloat = {DType::F32, DType::F16, DType::BF16};

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// vLLM's exclusion test: exact, then fnmatch; "foo*" also covers "foo" and "foo.*".
bool excluded(const std::vector<std::string>& patterns, const std::string& module) {
  for (const auto& p : patterns) {
    if (p == module || quant::glob_match(p, module)) return true;
    if (!p.empty() && p.back() == '*' && p.substr(0, p.size() - 1) == module) return true;
  }
  return false;
}

constexpr std::array<std::array<model::LinearKind, 3>, 2> kFused = {
    {{model::LinearKind::q, model::LinearKind::k, model::LinearKind::v}, {model::LinearKind::gate, model::LinearKind::up, model::LinearKind::up}}};

// The modelopt tensors of one quantized Linear.
void check_modelopt_linear(Ctx& x, const std::string& algo, std::int64_t group, const std::string& m, std::int64_t out, std::int64_t in,
                           model::LinearKind kind, DType model_dtype) {
  const std::string w = m + ".weight", s = m + ".weight_scale", s2 = m + ".weight_scale_2", is = m + ".input_scale";
  if (algo == "FP8") {
    x.expect(w, {DType::F8_E4M3}, Shape{out, in});
    x.expect(s, {DType::F32}, std::nullopt, 1);
    x.expect(is, {DType::F32}, std::nullopt, 1);
  } else if (algo == "FP8_PER_CHANNEL_PER_TOKEN") {
    x.expect(w, {DType::F8_E4M3}, Shape{out, in});
    x.expect(s, {DType::F32}, std::nullopt, out);
  } else if (algo == "FP8_PB_WO") {
    if (out % 128 != 0 || in % 128 != 0) x.error("{}: [{}, {}] is not a multiple of the 128x128 blocks", m, out, in);
    x.expect(w, {DType::F8_E4M3}, Shape{out, in});
    x.expect(s, {DType::F32}, std::nullopt, (out / 128) * (in / 128));
  } else if (algo == "NVFP4" || algo == "NVFP4_AWQ") {
    if (in % 16 != 0) x.error("{}: {} inputs is not a multiple of 16", m, in);
    x.expect(w, {DType::U8}, Shape{out, in / 2});
    x.expect(s, {DType::F8_E4M3}, Shape{out, in / 16});
    x.expect(s2, {DType::F32}, std::nullopt, 1);
    x.expect(is, {DType::F32}, std::nullopt, 1);
  } else if (algo == "MXFP8") {
    if (in % 32 != 0) x.error("{}: {} inputs is not a multiple of 32", m, in);
    x.expect(w, {DType::F8_E4M3}, Shape{out, in});
    x.expect(s, {DType::U8}, Shape{out, in / 32});
  } else if (algo == "MXFP4") {
    x.expect(w, {DType::U8}, Shape{out, in / 2});
    x.expect(s, {DType::U8}, Shape{out, in / 32});
  } else if (algo == "W4A16_AWQ" || algo == "W4A8_AWQ") {
    const std::int64_t g = group > 0 ? group : 128;
    if (in % g != 0 || out % 2 != 0) x.error("{}: [{}, {}] does not fit INT4 groups of {} packed in row pairs", m, out, in, g);
    x.expect(w, {DType::U8, DType::I8}, Shape{out / 2, in});
    x.expect(s, kFloat, Shape{out, in / g});
    const bool fused = kind != model::LinearKind::o && kind != model::LinearKind::down;
    const std::string pqs = m + ".pre_quant_scale";
    if (x.find(pqs)) {
      x.expect(pqs, {model_dtype}, Shape{in});
    } else if (!fused && x.engine == Engine::trtllm) {
      x.error("{} is missing (TensorRT-LLM's AWQ loader reads it on every unfused Linear)", pqs);
    }
    if (algo == "W4A8_AWQ") {
      x.expect(s2, {DType::F32}, std::nullopt, 1);
      x.expect(is, {DType::F32}, std::nullopt, 1);
    }
  } else if (algo == "W8A8_SQ_PER_CHANNEL" || algo == "W8A16") {
    x.expect(w, {DType::I8}, Shape{out, in});
    x.expect(s, {DType::F32}, std::nullopt, out);
    if (algo == "W8A8_SQ_PER_CHANNEL") x.expect(is, {DType::F32}, std::nullopt, 1);
  } else {
    x.error("{}: no tensor rules for quant_algo {}", m, algo);
  }
}

void check_modelopt(Ctx& x, const json& config, const io::ModelConfig& c, const std::string& dir) {
  json q;
  const fs::path hf = fs::path(dir) / "hf_quant_config.json";
  if (x.engine == Engine::trtllm) {
    if (!fs::exists(hf)) return x.error("hf_quant_config.json is missing (TensorRT-LLM reads the modelopt config from it)");
    const json h = io::parse_json_unique_keys(io::read_text_file(hf.string()), hf.string());
    if (!h.contains("quantization") || !h["quantization"].is_object()) return x.error("hf_quant_config.json has no \"quantization\" object");
    q = h["quantization"];
    if (q.contains("exclude_modules") && !q["exclude_modules"].is_array()) x.error("exclude_modules is not a list");
  } else {
    if (!config.contains("quantization_config")) return x.error("config.json has no quantization_config");
    q = config["quantization_config"];
    if (q.value("quant_method", "") != "modelopt") x.error("quant_method is {}, not modelopt", q.value("quant_method", json(nullptr)).dump());
    if (q.contains("ignore") && !q["ignore"].is_array()) x.error("ignore is not a list");
  }
  const std::string algo = q.contains("quant_algo") && q["quant_algo"].is_string() ? upper(q["quant_algo"].get<std::string>()) : "";
  std::int64_t group = 0;
  if (q.contains("group_size") && !q["group_size"].is_null()) {
    if (!q["group_size"].is_number_integer()) x.error("group_size {} is not an integer", q["group_size"].dump());
    else group = q["group_size"].get<std::int64_t>();
  }
  const std::set<std::string> vllm_algos = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8"};
  const std::set<std::string> trt_algos = {"FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "MXFP8",
                                           "MXFP4", "W4A16_AWQ", "W4A8_AWQ", "W8A8_SQ_PER_CHANNEL", "W8A16"};
  const auto& allowed = x.engine == Engine::vllm ? vllm_algos : trt_algos;
  std::map<std::string, std::pair<std::string, std::int64_t>> per_layer;
  if (algo == "MIXED_PRECISION") {
    if (!q.contains("quantized_layers") || !q["quantized_layers"].is_object()) return x.error("MIXED_PRECISION without quantized_layers");
    for (const auto& item : q["quantized_layers"].items()) {
      const std::string a = upper(item.value().value("quant_algo", ""));
      if (!allowed.count(a)) x.error("{} is {}, which its modelopt loader rejects", item.key(), a);
      per_layer[item.key()] = {a, item.value().value("group_size", std::int64_t{0})};
    }
  } else if (!allowed.count(algo)) {
    return x.error("quant_algo {} is rejected by its modelopt loader{}", algo.empty() ? "(none)" : algo,
                   x.engine == Engine::vllm ? " (vLLM takes INT4/INT8 as compressed-tensors)" : "");
  }
  // KV cache.
  std::string kv;
  if (x.engine == Engine::trtllm) {
    if (q.contains("kv_cache_quant_algo") && q["kv_cache_quant_algo"].is_string()) kv = q["kv_cache_quant_algo"].get<std::string>();
  } else if (q.contains("kv_cache_scheme") && !q["kv_cache_scheme"].is_null()) {
    const json& s = q["kv_cache_scheme"];
    if (s.is_string()) kv = s.get<std::string>();
    else if (s.is_object() && s.value("type", "") == "float" && s.value("num_bits", 0) == 8) kv = "FP8";
    else x.error("kv_cache_scheme {} is not one it reads", s.dump());
  }
  if (!kv.empty() && kv != "FP8" && kv != "NVFP4" && !(x.engine == Engine::trtllm && kv == "INT8")) x.error("KV-cache algorithm {} is not one it reads", kv);
  std::vector<std::string> exclude;
  const char* ex_key = x.engine == Engine::trtllm ? "exclude_modules" : "ignore";
  if (q.contains(ex_key) && q[ex_key].is_array()) exclude = q[ex_key].get<std::vector<std::string>>();

  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    std::map<model::LinearKind, std::set<std::string>> suffixes;
    std::map<model::LinearKind, std::string> algos;
    for (const auto kind : model::kAllLinears) {
      const std::string m = fmt::format("model.layers.{}.{}", l, model::linear_name(kind));
      const auto [out, in] = load::linear_shape(c, kind);
      std::string a = algo;
      std::int64_t g = group;
      if (algo == "MIXED_PRECISION") {
        const auto it = per_layer.find(m);
        if (it == per_layer.end()) a.clear();
        else std::tie(a, g) = it->second;
      } else if (excluded(exclude, m)) {
        a.clear();
      }
      if (a.empty()) {
        x.expect(m + ".weight", kFloat, Shape{out, in});
        if (x.find(m + ".weight_scale")) x.error("{} is excluded but has a weight_scale", m);
      } else {
        check_modelopt_linear(x, a, g, m, out, in, kind, c.dtype);
      }
      algos[kind] = a;
      for (const char* s : {".weight_scale", ".weight_scale_2", ".input_scale"}) {
        if (x.find(m + s)) suffixes[kind].insert(s);
      }
    }
    for (const auto& group_kinds : kFused) {
      for (const auto kind : group_kinds) {
        if (algos[kind] != algos[group_kinds[0]]) x.error("layer {}: {} and {} share an input but are quantized differently", l, model::linear_name(kind), model::linear_name(group_kinds[0]));
        if (suffixes[kind] != suffixes[group_kinds[0]]) x.error("layer {}: {} and {} do not have the same scale tensors", l, model::linear_name(kind), model::linear_name(group_kinds[0]));
      }
      // TensorRT-LLM's W4A8 and NVFP4 loaders assert one input_scale and weight_scale_2 per fused group.
      const std::string& ga = algos[group_kinds[0]];
      if (x.engine == Engine::trtllm && (ga == "W4A8_AWQ" || ga == "NVFP4" || ga == "NVFP4_AWQ")) {
        for (const char* s : {".input_scale", ".weight_scale_2"}) {
          std::optional<float> first;
          for (const auto kind : group_kinds) {
            const std::string n = fmt::format("model.layers.{}.{}{}", l, model::linear_name(kind), s);
            if (!x.find(n)) continue;
            const float v = x.store.tensor(n).to_f32().at(0);
            if (first && *first != v) x.error("{} differs within its fused group", n);
            first = v;
          }
        }
      }
    }
    if (!kv.empty()) {
      for (const char* s : {"self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"}) x.expect(fmt::format("model.layers.{}.{}", l, s), {DType::F32}, std::nullopt, 1);
    }
  }  // The lm_head: 16-bit, or quantized as a Linear (vLLM's ModelOpt configs and TensorRT-LLM take one when
  // lm_head.weight_scale is there and the embeddings are not tied; tied, they use the embeddings and ignore it).
  if (x.find("lm_head.weight_scale")) {
    if (c.tie_word_embeddings) x.error("lm_head is quantized but tie_word_embeddings is true: the engine ties lm_head to the 16-bit embeddings");
    std::string a = algo;
    std::int64_t g = group;
    if (algo == "MIXED_PRECISION") {
      const auto it = per_layer.find("lm_head");
      if (it == per_layer.end()) a.clear();
      else std::tie(a, g) = it->second;
    } else if (excluded(exclude, "lm_head")) {
      a.clear();
    }
    if (a.empty()) x.error("lm_head has a weight_scale but the quantization config leaves it unquantized");
    else check_modelopt_linear(x, a, g, "lm_head", c.vocab_size, c.hidden_size, model::LinearKind::q, c.dtype);
  } else if (!c.tie_word_embeddings) {
    x.expect("lm_head.weight", kFloat, Shape{c.vocab_size, c.hidden_size});
  }
}

// An invalid "re:" pattern matches nothing here (the engine would fail to load; the reader names it).
bool compressed_tensors_target_matches_safe(const std::string& target, const std::string& module) {
  try {
    return load::compressed_tensors_target_matches(target, module);
  } catch (const Error&) {
    return false;
  }
}

void check_compressed_tensors(Ctx& x, const json& q, const io::ModelConfig& c) {
  if (q.value("quantization_status", "") != "compressed") x.error("quantization_status is not \"compressed\"");
  const std::set<std::string> formats = {"dense", "int-quantized", "float-quantized", "naive-quantized", "pack-quantized", "nvfp4-pack-quantized",
                                         "mixed-precision"};
  const std::string top = q.value("format", "");
  if (!formats.count(top)) x.error("format {} is not one it reads", top);
  if (!q.contains("config_groups") || !q["config_groups"].is_object()) return x.error("config_groups is missing");
  std::vector<std::string> ignore;
  if (q.contains("ignore")) {
    if (!q["ignore"].is_array()) x.error("ignore is not a list");
    else ignore = q["ignore"].get<std::vector<std::string>>();
  }
  struct Group {
    std::string name, kind, format;
    json w, in;
    std::vector<std::string> targets;
  };
  std::vector<Group> groups;
  for (const auto& item : q["config_groups"].items()) {
    Group g;
    g.name = item.key();
    const json& v = item.value();
    g.w = v.value("weights", json(nullptr));
    g.in = v.value("input_activations", json(nullptr));
    g.format = v.value("format", top);
    if (!v.contains("targets") || !v["targets"].is_array()) {
      x.error("{}: targets is not a list", g.name);
      continue;
    }
    g.targets = v["targets"].get<std::vector<std::string>>();
    if (!g.w.is_object()) {
      x.error("{}: no weights arguments", g.name);
      continue;
    }
    const std::string type = g.w.value("type", ""), strategy = g.w.value("strategy", "");
    const int bits = g.w.value("num_bits", 0);
    const bool has_in = g.in.is_object();
    if (!g.w.value("symmetric", true) && type == "float") x.error("{}: asymmetric float weights", g.name);
    if (type == "int" && (bits == 4 || bits == 8) && (strategy == "group" || strategy == "channel") && !has_in) g.kind = "wna16";
    else if (type == "int" && bits == 8 && (strategy == "channel" || strategy == "tensor") && has_in && g.in.value("type", "") == "int") g.kind = "w8a8_int";
    else if (type == "float" && bits == 8 && (strategy == "tensor" || strategy == "channel" || strategy == "block")) g.kind = "fp8";
    else if (type == "float" && bits == 4 && strategy == "tensor_group" && g.w.value("group_size", 0) == 16) g.kind = "nvfp4";
    else x.error("{}: weights {} match none of its compressed-tensors schemes", g.name, g.w.dump());
    const std::map<std::string, std::string> needed = {{"wna16", "pack-quantized"}, {"w8a8_int", "int-quantized"}, {"fp8", "float-quantized"},
                                                       {"nvfp4", "nvfp4-pack-quantized"}};
    if (!g.kind.empty() && g.format != needed.at(g.kind) && !(g.kind == "w8a8_int" && g.format == "naive-quantized")) {
      x.error("{}: format {} cannot hold its {} weights ({} expected)", g.name, g.format, g.kind, needed.at(g.kind));
    }
    if (x.engine == Engine::trtllm && g.kind != "fp8") x.error("{}: TensorRT-LLM reads compressed-tensors 8-bit FP8 checkpoints only", g.name);
    groups.push_back(std::move(g));
  }
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    std::map<model::LinearKind, std::string> chosen;
    for (const auto kind : model::kAllLinears) {
      const std::string m = fmt::format("model.layers.{}.{}", l, model::linear_name(kind));
      const auto [out, in] = load::linear_shape(c, kind);
      const Group* g = nullptr;
      const bool ignored = std::any_of(ignore.begin(), ignore.end(), [&](const std::string& p) { return p != "Linear" && compressed_tensors_target_matches_safe(p, m); });
      if (!ignored) {
        for (const auto& cand : groups) {
          if (std::any_of(cand.targets.begin(), cand.targets.end(), [&](const std::string& t) { return compressed_tensors_target_matches_safe(t, m); })) {
            g = &cand;
            break;
          }
        }
      }
      chosen[kind] = g ? g->name : "";
      if (!g) {
        x.expect(m + ".weight", kFloat, Shape{out, in});
        continue;
      }
      const std::string strategy = g->w.value("strategy", "");
      const bool static_in = g->in.is_object() && !g->in.value("dynamic", json(false)).is_string() && !g->in.value("dynamic", false);
      if (g->kind == "wna16") {
        const int bits = g->w.value("num_bits", 4);
        const std::int64_t per_word = 32 / bits;
        x.expect(m + ".weight_packed", {DType::I32}, Shape{out, (in + per_word - 1) / per_word});
        if (strategy == "group") {
          const std::int64_t gs = g->w.value("group_size", std::int64_t{0});
          if (gs <= 0 || in % gs != 0) x.error("{}: {} inputs is not a multiple of group_size {}", m, in, gs);
          else x.expect(m + ".weight_scale", kFloat, Shape{out, in / gs});
        } else {
          x.expect(m + ".weight_scale", kFloat, Shape{out, 1});
        }
        x.expect(m + ".weight_shape", {DType::I32, DType::I64}, Shape{2});
      } else if (g->kind == "w8a8_int") {
        x.expect(m + ".weight", {DType::I8}, Shape{out, in});
        x.expect(m + ".weight_scale", kFloat, std::nullopt, strategy == "channel" ? out : 1);
        if (static_in) x.expect(m + ".input_scale", kFloat, std::nullopt, 1);
      } else if (g->kind == "fp8") {
        x.expect(m + ".weight", {DType::F8_E4M3}, Shape{out, in});
        const std::int64_t n = strategy == "tensor" ? 1 : strategy == "channel" ? out : ((out + 127) / 128) * ((in + 127) / 128);
        x.expect(m + ".weight_scale", kFloat, std::nullopt, n);
        if (static_in) x.expect(m + ".input_scale", kFloat, std::nullopt, 1);
      } else if (g->kind == "nvfp4") {
        if (in % 16 != 0) x.error("{}: {} inputs is not a multiple of 16", m, in);
        x.expect(m + ".weight_packed", {DType::U8}, Shape{out, in / 2});
        x.expect(m + ".weight_scale", {DType::F8_E4M3}, Shape{out, in / 16});
        x.expect(m + ".weight_global_scale", {DType::F32}, std::nullopt, 1);
        if (g->in.is_object()) x.expect(m + ".input_global_scale", {DType::F32}, std::nullopt, 1);
      }
    }
    for (const auto& group_kinds : kFused) {
      for (const auto kind : group_kinds) {
        if (chosen[kind] != chosen[group_kinds[0]]) {
          x.error("layer {}: {} and {} are fused by the engine but have different schemes", l, model::linear_name(kind), model::linear_name(group_kinds[0]));
        }
      }
    }
    if (q.contains("kv_cache_scheme") && !q["kv_cache_scheme"].is_null()) {
      for (const char* s : {"self_attn.k_scale", "self_attn.v_scale"}) x.expect(fmt::format("model.layers.{}.{}", l, s), kFloat, std::nullopt, 1);
    }
  }
}

}  // namespace

std::vector<std::string> check_engine_rules(const std::string& dir, Engine engine) {
  std::vector<std::string> errors;
  const std::string config_path = (fs::path(dir) / "config.json").string();
  const json config = io::parse_json_unique_keys(io::read_text_file(config_path), config_path);
  const io::ModelConfig c = io::load_model_config(config_path);
  const io::TensorStore store = io::TensorStore::open_dir(dir);
  Ctx x{store, errors, engine};
  const bool ct = config.contains("quantization_config") && config["quantization_config"].is_object() &&
                  config["quantization_config"].value("quant_method", "") == "compressed-tensors";
  if (ct) {
    check_compressed_tensors(x, config["quantization_config"], c);
  } else if (config.contains("quantization_config") || fs::exists(fs::path(dir) / "hf_quant_config.json")) {
    check_modelopt(x, config, c, dir);
  } else {
    x.error("no quantization config: a plain checkpoint");
  }
  // Shared by both: the non-Linear tensors every Llama loader reads.
  for (const char* n : {"model.embed_tokens.weight", "model.norm.weight"}) x.expect(n, kFloat, std::nullopt);
  return errors;
}

}  // namespace mopt::exporter
