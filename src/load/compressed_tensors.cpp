#include "load/compressed_tensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <regex>
#include <tuple>

#include "core/error.h"
#include "io/compressed_tensors_packing.h"
#include "io/json_util.h"

namespace mopt::load {

namespace fs = std::filesystem;
using nlohmann::json;

bool is_compressed_tensors_checkpoint(const std::string& dir) {
  return config_quant_method(dir) == "compressed-tensors";
}

io::TensorLayout compressed_tensors_layout() {
  io::TensorLayout layout;
  layout.reader_checks_linears = true;
  layout.is_format_tensor = [](std::string_view name) {
    if (!name.starts_with("model.layers.")) return false;
    for (const char* suffix : {".weight_scale", ".input_scale", ".weight_packed", ".weight_shape", ".weight_global_scale",
                               ".input_global_scale", ".self_attn.k_scale", ".self_attn.v_scale",
                               // sparse-24-bitmask weights
                               "_proj.compressed", "_proj.bitmask", "_proj.shape"}) {
      if (name.ends_with(suffix)) return true;
    }
    return false;
  };
  layout.stored_elsewhere = [](const io::TensorStore& store, std::string_view weight) {
    const std::string module(weight.substr(0, weight.size() - std::string_view(".weight").size()));
    return store.contains(module + ".weight_packed") || store.contains(module + ".compressed");
  };
  return layout;
}

bool compressed_tensors_target_matches(const std::string& target, const std::string& module) {
  if (target.rfind("re:", 0) == 0) {
    try {
      return std::regex_search(module, std::regex(target.substr(3)), std::regex_constants::match_continuous);
    } catch (const std::regex_error&) {
      fail("compressed-tensors target '{}' is not a valid regular expression", target);
    }
  }
  return target == module || target == "Linear";
}

namespace {

struct CtGroup {
  json weights, input;
  std::vector<std::string> targets;
};

struct CtConfig {
  std::vector<CtGroup> groups;
  std::vector<std::string> ignore;
  bool kv = false;
  std::string sparsity_format;  // "", "sparse-24-bitmask" or "dense"
};

// The mopt scheme a compressed-tensors group describes.
quant::LinearScheme scheme_of_group(const CtGroup& g, const std::string& label) {
  auto field = [&](const json& a, const char* key) -> json { return a.is_object() && a.contains(key) ? a[key] : json(nullptr); };
  const json& w = g.weights;
  if (!w.is_object()) fail("{}: a config group without weights", label);
  if (field(w, "symmetric") == json(false)) fail("{}: asymmetric (zero-point) weights are not supported", label);
  if (!field(w, "actorder").is_null() && field(w, "actorder") != json(false)) fail("{}: activation-ordered groups (actorder) are not supported", label);
  const json bits = field(w, "num_bits"), type = field(w, "type"), strategy = field(w, "strategy");
  const std::int64_t group = field(w, "group_size").is_number_integer() ? field(w, "group_size").get<std::int64_t>() : 0;
  const json& in = g.input;
  const bool has_in = in.is_object();
  const json in_bits = field(in, "num_bits"), in_type = field(in, "type"), in_strategy = field(in, "strategy"), in_dynamic = field(in, "dynamic");
  if (type == "int" && bits == 4 && strategy == "group" && !has_in && group > 0) return quant::format_scheme("int4_rtn", group);
  if (type == "int" && bits == 8 && strategy == "channel" && !has_in) return quant::format_scheme("int8_wo");
  if (type == "int" && bits == 8 && strategy == "channel" && has_in && in_type == "int" && in_bits == 8 && in_strategy == "tensor" &&
      in_dynamic == json(false)) {
    return quant::format_scheme("int8");
  }
  if (type == "float" && bits == 8 && strategy == "tensor" && has_in && in_type == "float" && in_bits == 8 && in_strategy == "tensor" &&
      in_dynamic == json(false)) {
    return quant::format_scheme("fp8");
  }
  if (type == "float" && bits == 8 && strategy == "channel" && has_in && in_type == "float" && in_bits == 8 && in_strategy == "token" &&
      in_dynamic == json(true)) {
    return quant::format_scheme("fp8_pc_pt");
  }
  if (type == "float" && bits == 8 && strategy == "block" && !has_in && field(w, "block_structure") == json::array({128, 128})) {
    return quant::format_scheme("fp8_block");
  }
  if (type == "float" && bits == 4 && strategy == "tensor_group" && group == 16 && has_in && in_type == "float" && in_bits == 4) {
    return quant::format_scheme("nvfp4");
  }
  fail("{}: the quantization scheme {} / {} is not one mopt reads", label, w.dump(), in.dump());
}

CtConfig read_ct_config(const std::string& dir) {
  const std::string label = (fs::path(dir) / "config.json").string();
  const json j = io::parse_json_unique_keys(io::read_text_file(label), label);
  CtConfig r;
  try {
    const json& q = j.at("quantization_config");
    if (q.value("quantization_status", "compressed") != "compressed") {
      fail("{}: quantization_status '{}' (only compressed checkpoints hold codes)", label, q["quantization_status"].dump());
    }
    if (q.contains("sparsity_config") && q["sparsity_config"].is_object() && !q["sparsity_config"].empty()) {
      const json& sc = q["sparsity_config"];
      r.sparsity_format = sc.value("format", "");
      if (r.sparsity_format != "sparse-24-bitmask" && r.sparsity_format != "dense") {
        fail("{}: sparsity_config format '{}' is not one mopt reads (sparse-24-bitmask, dense)", label, r.sparsity_format);
      }
      if (sc.contains("sparsity_structure") && sc["sparsity_structure"] != "2:4") fail("{}: sparsity_structure {} is not 2:4", label, sc["sparsity_structure"].dump());
    }
    const json groups = q.contains("config_groups") ? q["config_groups"] : json::object();
    if (!groups.is_object()) fail("{}: config_groups is not an object", label);
    for (const auto& item : groups.items()) {
      CtGroup g;
      g.weights = item.value().value("weights", json(nullptr));
      g.input = item.value().value("input_activations", json(nullptr));
      g.targets = item.value().at("targets").get<std::vector<std::string>>();
      r.groups.push_back(std::move(g));
    }
    if (q.contains("ignore") && q["ignore"].is_array()) r.ignore = q["ignore"].get<std::vector<std::string>>();
    if (q.contains("kv_cache_scheme") && !q["kv_cache_scheme"].is_null()) {
      const json& kv = q["kv_cache_scheme"];
      if (kv.value("type", "") != "float" || kv.value("num_bits", 0) != 8) fail("{}: kv_cache_scheme {} is not one mopt reads", label, kv.dump());
      r.kv = true;
    }
  } catch (const json::exception& e) {
    fail("{}: malformed quantization_config: {}", label, e.what());
  }
  return r;
}

}  // namespace

QuantizedReader compressed_tensors_reader(const std::string& dir) {
  const CtConfig cfg = read_ct_config(dir);
  QuantizedReader r;
  r.layout = compressed_tensors_layout();
  r.kv_algo = cfg.kv ? "FP8" : "";
  // A weight stored as sparse-24-bitmask (module.compressed / .bitmask / .shape), dense again.
  const auto sparse_weight = [dir](const io::Checkpoint& ckpt, const std::string& module) -> std::optional<Tensor> {
    const auto& store = ckpt.tensors();
    if (!store.contains(module + ".compressed")) return std::nullopt;
    for (const char* part : {".bitmask", ".shape"}) {
      if (!store.contains(module + part)) fail("{}: {}{} is missing (its .compressed is there)", dir, module, part);
    }
    return io::sparse24_bitmask_decompress(store.tensor(module + ".compressed"), store.tensor(module + ".bitmask"), store.tensor(module + ".shape"),
                                       dir + ": " + module);
  };
  r.dense_weight = [sparse_weight](const io::Checkpoint& ckpt, const std::string& module) { return sparse_weight(ckpt, module); };
  r.linear = [cfg, dir, sparse_weight](const io::Checkpoint& ckpt, std::int64_t index, model::LinearKind kind) -> std::optional<StoredLinear> {
    const auto& store = ckpt.tensors();
    StoredLinear s;
    s.name = fmt::format("model.layers.{}.{}", index, model::linear_name(kind));
    for (const auto& ig : cfg.ignore) {
      if (ig != "Linear" && compressed_tensors_target_matches(ig, s.name)) return std::nullopt;
    }
    const CtGroup* group = nullptr;
    for (const auto& g : cfg.groups) {
      for (const auto& t : g.targets) {
        if (compressed_tensors_target_matches(t, s.name)) group = &g;
      }
      if (group) break;
    }
    if (!group) return std::nullopt;
    const std::string label = fmt::format("{}: {}", dir, s.name);
    s.scheme = scheme_of_group(*group, label);
    std::tie(s.out, s.in) = linear_shape(ckpt.config(), kind);
    const std::int64_t out = s.out, in = s.in;
    auto need = [&](const std::string& suffix) {
      if (!store.contains(s.name + suffix)) fail("{}{} is missing", label, suffix);
      return store.tensor(s.name + suffix);
    };
    auto f32_of = [&](const std::string& suffix, std::uint64_t count) {
      const Tensor t = need(suffix);
      if (t.numel() != count) fail("{}{} has {} values, expected {}", label, suffix, t.numel(), count);
      return t.to_f32();
    };
    const auto& spec = *s.scheme.weight;
    quant::QuantizedWeight& q = s.weight;
    if (spec.element == quant::Element::int4 || (spec.element == quant::Element::int8 && !s.scheme.input)) {
      const int bits = spec.element == quant::Element::int4 ? 4 : 8;
      if (store.contains(s.name + ".weight_shape")) {
        const Tensor shape = store.tensor(s.name + ".weight_shape").to(DType::F64);
        if (shape.numel() != 2 || shape.data<double>()[0] != static_cast<double>(out) || shape.data<double>()[1] != static_cast<double>(in)) {
          fail("{}.weight_shape does not say [{}, {}]", label, out, in);
        }
      }
      std::vector<std::int8_t> codes = with_context(label, [&] { return io::unpack_int32_rows(need(".weight_packed"), out, in, bits); });
      if (bits == 4) {
        if (out % 2 != 0) fail("{}: {} output rows cannot be stored in mopt's INT4 layout", label, out);
        q.weight = quant::pack_int4_rows(codes, out, in);
        const std::int64_t groups = (in + spec.block - 1) / spec.block;
        q.weight_scale = Tensor::from_f32(f32_of(".weight_scale", static_cast<std::uint64_t>(out * groups)), {out, groups});
      } else {
        q.weight = Tensor::zeros(DType::I8, {out, in});
        std::copy(codes.begin(), codes.end(), q.weight.mutable_data<std::int8_t>());
        q.weight_scale = Tensor::from_f32(f32_of(".weight_scale", static_cast<std::uint64_t>(out)), {out});
      }
    } else if (spec.scaling == quant::Scaling::nvfp4) {
      q.weight = need(".weight_packed");
      q.weight_scale = need(".weight_scale");
      const float global = f32_of(".weight_global_scale", 1)[0];
      if (!(global > 0.0f) || !std::isfinite(global)) fail("{}.weight_global_scale is {}", label, global);
      q.weight_scale_2 = Tensor::from_f32(std::vector<float>{1.0f / global}, {});
      const float in_global = f32_of(".input_global_scale", 1)[0];
      if (!(in_global > 0.0f) || !std::isfinite(in_global)) fail("{}.input_global_scale is {}", label, in_global);
      s.input_scale = 1.0f / in_global;
    } else {
      if (auto w = sparse_weight(ckpt, s.name)) q.weight = std::move(*w);
      else q.weight = need(".weight");
      if (spec.scaling == quant::Scaling::per_tensor) q.weight_scale = Tensor::from_f32(f32_of(".weight_scale", 1), {});
      else if (spec.scaling == quant::Scaling::per_row) q.weight_scale = Tensor::from_f32(f32_of(".weight_scale", static_cast<std::uint64_t>(out)), {out});
      else q.weight_scale = need(".weight_scale").to(DType::F32);
    }
    quant::check_quantized_weight(spec, q, out, in, label);
    if (s.scheme.input && s.scheme.input->needs_amax() && !s.input_scale) s.input_scale = f32_of(".input_scale", 1)[0];
    return s;
  };
  r.kv_scales = [dir](const io::Checkpoint& ckpt, std::int64_t index) {
    std::array<float, 2> v{};
    for (int i = 0; i < 2; ++i) {
      const std::string name = fmt::format("model.layers.{}.self_attn.{}_scale", index, i == 0 ? "k" : "v");
      if (!ckpt.tensors().contains(name)) fail("{}: {} is missing (kv_cache_scheme is set)", dir, name);
      const Tensor t = ckpt.tensor(name);
      if (t.numel() != 1) fail("{}: {} has {} values, expected 1", dir, name, t.numel());
      v[static_cast<std::size_t>(i)] = t.to_f32().at(0);
    }
    return std::pair<float, float>{v[0], v[1]};
  };
  return r;
}

}  // namespace mopt::load
