#include "export/compressed_tensors.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <regex>
#include <set>

#include "core/error.h"
#include "export/checkpoint_dir.h"
#include "io/compressed_tensors_packing.h"
#include "load/compressed_tensors.h"
#include "load/modelopt.h"
#include "io/json_util.h"
#include "quant/fake_quant.h"

namespace mopt::exporter {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json quant_args(int bits, const char* type, const char* strategy, std::int64_t group_size, const json& dynamic,
                const json& block_structure = nullptr) {
  return {{"num_bits", bits},
          {"type", type},
          {"symmetric", true},
          {"group_size", group_size > 0 ? json(group_size) : json(nullptr)},
          {"strategy", strategy},
          {"block_structure", block_structure},
          {"dynamic", dynamic},
          {"actorder", nullptr},
          {"observer", dynamic.is_boolean() && dynamic.get<bool>() ? json(nullptr) : json("minmax")},
          {"observer_kwargs", json::object()}};
}

Tensor f32_tensor(const std::vector<float>& v, Shape shape) { return Tensor::from_f32(v, std::move(shape)); }

float only_value(const Tensor& t, const std::string& label) {
  if (t.numel() != 1) fail("{} has {} values, expected 1", label, t.numel());
  return t.to_f32().at(0);
}

std::vector<std::int8_t> int8_codes(const Tensor& w) {
  const auto* p = w.data<std::int8_t>();
  return std::vector<std::int8_t>(p, p + w.numel());
}

// Which of the recognised mopt formats a scheme is, for the tables above.
enum class CtKind { int4_pack, int8_pack, int8_w8a8, fp8_tensor, fp8_channel, fp8_block, nvfp4 };

CtKind ct_kind(const quant::LinearScheme& s) {
  using quant::Element;
  using quant::Scaling;
  const auto& w = *s.weight;
  const auto& in = s.input;
  if (w.element == Element::int4 && w.scaling == Scaling::block && !w.fp8_second_stage && !in) return CtKind::int4_pack;
  if (w.element == Element::int8 && w.scaling == Scaling::per_row && !in) return CtKind::int8_pack;
  if (w.element == Element::int8 && w.scaling == Scaling::per_row && in && in->element == Element::int8 && in->scaling == Scaling::per_tensor) {
    return CtKind::int8_w8a8;
  }
  if (w.element == Element::e4m3 && w.scaling == Scaling::per_tensor && in && in->element == Element::e4m3 && in->scaling == Scaling::per_tensor) {
    return CtKind::fp8_tensor;
  }
  if (w.element == Element::e4m3 && w.scaling == Scaling::per_row && in && in->element == Element::e4m3 && in->scaling == Scaling::per_token) {
    return CtKind::fp8_channel;
  }
  if (w.element == Element::e4m3 && w.scaling == Scaling::block && w.block == 128 && w.block_rows == 128 && !in) return CtKind::fp8_block;
  if (w.element == Element::e2m1 && w.scaling == Scaling::nvfp4 && w.block == 16 && in && in->scaling == Scaling::nvfp4) return CtKind::nvfp4;
  fail("compressed-tensors has no form for {} ({}); export it in the modelopt format (TensorRT-LLM) instead", s.quant_algo,
       s.weight->describe());
}

}  // namespace

json compressed_tensors_group(const quant::LinearScheme& s) {
  switch (ct_kind(s)) {
    case CtKind::int4_pack:
      return {{"weights", quant_args(4, "int", "group", s.weight->block, false)}, {"input_activations", nullptr}, {"format", "pack-quantized"}};
    case CtKind::int8_pack:
      return {{"weights", quant_args(8, "int", "channel", 0, false)}, {"input_activations", nullptr}, {"format", "pack-quantized"}};
    case CtKind::int8_w8a8:
      return {{"weights", quant_args(8, "int", "channel", 0, false)},
              {"input_activations", quant_args(8, "int", "tensor", 0, false)},
              {"format", "int-quantized"}};
    case CtKind::fp8_tensor:
      return {{"weights", quant_args(8, "float", "tensor", 0, false)},
              {"input_activations", quant_args(8, "float", "tensor", 0, false)},
              {"format", "float-quantized"}};
    case CtKind::fp8_channel:
      return {{"weights", quant_args(8, "float", "channel", 0, false)},
              {"input_activations", quant_args(8, "float", "token", 0, true)},
              {"format", "float-quantized"}};
    case CtKind::fp8_block:
      return {{"weights", quant_args(8, "float", "block", 0, false, json::array({128, 128}))},
              {"input_activations", nullptr},
              {"format", "float-quantized"}};
    case CtKind::nvfp4:
      return {{"weights", quant_args(4, "float", "tensor_group", 16, false)},
              {"input_activations", quant_args(4, "float", "tensor_group", 16, "local")},
              {"format", "nvfp4-pack-quantized"}};
  }
  return {};
}

namespace {

// compressed-tensors' form of a modelopt export, Linear by Linear, with what its config needs.
class CtWriter {
 public:
  CtWriter(const std::string& quantized_dir, const std::string& out_dir, std::uint64_t shard_bytes, bool sparse_24)
      : source_(quantized_dir), dir_(out_dir, shard_bytes), sparse_24_(sparse_24) {}

  CheckpointDirWriter& dir() { return dir_; }
  CompressedTensorsReport& report() { return report_; }

  // A Linear the source keeps unquantized: ignored by the quantization config, and stored 2:4 when asked.
  void plain_linear(const io::Checkpoint& ckpt, const std::string& name, std::set<std::string>& consumed) {
    ignore_.push_back(name);
    if (!sparse_24_) return;
    add_weight(name, ckpt.tensor(name + ".weight"));
    consumed.insert(name + ".weight");
  }

  // A quantized Linear: its codes and scales under compressed-tensors' names.
  void quantized_linear(load::StoredLinear st, std::set<std::string>& consumed) {
    const std::string& name = st.name;
    if (st.scheme.weight->grid == quant::IntGrid::ggml) fail("{}: {} is stored as GGUF blocks, which compressed-tensors has no form for", source_, name);
    const json group = compressed_tensors_group(st.scheme);
    if (!st.pre_quant_scale.empty()) fold_pre_quant_scale(st);
    const auto& spec = *st.scheme.weight;
    const std::int64_t out = st.out, in = st.in;
    const quant::QuantizedWeight& q = st.weight;
    const CtKind kind = ct_kind(st.scheme);
    switch (kind) {
      case CtKind::int4_pack:
      case CtKind::int8_pack: {
        const bool int4 = kind == CtKind::int4_pack;
        const std::vector<std::int8_t> codes = int4 ? quant::unpack_int4_rows(q.weight, out, in) : int8_codes(q.weight);
        dir_.add(name + ".weight_packed", io::pack_int32_rows(codes, out, in, int4 ? 4 : 8));
        Tensor scale = q.weight_scale.to(DType::F32);
        dir_.add(name + ".weight_scale", int4 ? scale : f32_tensor(scale.to_f32(), {out, 1}));
        Tensor shape = Tensor::zeros(DType::I64, {2});
        shape.mutable_data<std::int64_t>()[0] = out;
        shape.mutable_data<std::int64_t>()[1] = in;
        dir_.add(name + ".weight_shape", shape);
        note_packed(name, spec, q, out, in);
        break;
      }
      case CtKind::int8_w8a8:
      case CtKind::fp8_channel:
        add_weight(name, q.weight);
        dir_.add(name + ".weight_scale", f32_tensor(q.weight_scale.to_f32(), {out, 1}));
        break;
      case CtKind::fp8_tensor:
        add_weight(name, q.weight);
        dir_.add(name + ".weight_scale", scalar1(only_value(q.weight_scale, name + ".weight_scale")));
        break;
      case CtKind::fp8_block:
        add_weight(name, q.weight);
        dir_.add(name + ".weight_scale", q.weight_scale.to(DType::F32));
        break;
      case CtKind::nvfp4:
        note_packed(name, spec, q, out, in);
        dir_.add(name + ".weight_packed", q.weight);
        dir_.add(name + ".weight_scale", q.weight_scale);
        dir_.add(name + ".weight_global_scale", scalar1(1.0f / only_value(*q.weight_scale_2, name + ".weight_scale_2")));
        break;
    }
    if (st.input_scale) {
      const bool nvfp4 = kind == CtKind::nvfp4;
      dir_.add(name + (nvfp4 ? ".input_global_scale" : ".input_scale"), scalar1(nvfp4 ? 1.0f / *st.input_scale : *st.input_scale));
    }
    for (const char* suffix : {".weight", ".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale"}) consumed.insert(name + suffix);
    modules_.emplace_back(name, group);
    ++report_.quantized_linears;
  }

  // config.json's quantization_config for what was written.
  json quantization_config(const io::ModelConfig& c, bool kv) {
    const json sparsity = sparsity_config(c);
    if (modules_.empty() && !kv) {
      // Sparsity alone, as compressed-tensors writes it: no quantization groups.
      return {{"quant_method", "compressed-tensors"}, {"sparsity_config", sparsity}, {"transform_config", json::object()}};
    }
    // One config group per distinct scheme; a single one targets every Linear.
    std::vector<std::pair<json, std::vector<std::string>>> groups;
    for (const auto& module : modules_) {
      const json& g = module.second;
      auto it = std::find_if(groups.begin(), groups.end(), [&g](const auto& e) { return e.first == g; });
      if (it == groups.end()) groups.push_back({g, {module.first}});
      else it->second.push_back(module.first);
    }
    json config_groups = json::object();
    std::set<std::string> formats;
    for (std::size_t i = 0; i < groups.size(); ++i) {
      json g = groups[i].first;
      formats.insert(g["format"].get<std::string>());
      g["targets"] = groups.size() == 1 ? json::array({"Linear"}) : json(groups[i].second);
      config_groups[fmt::format("group_{}", i)] = g;
    }
    return {{"quant_method", "compressed-tensors"},
            {"format", formats.size() == 1 ? *formats.begin() : std::string("mixed-precision")},
            {"quantization_status", "compressed"},
            {"config_groups", config_groups},
            {"ignore", ignore_},
            {"kv_cache_scheme", kv ? quant_args(8, "float", "tensor", 0, false) : json(nullptr)},
            {"global_compression_ratio", nullptr},
            {"sparsity_config", sparsity}};
  }


 private:
  static Tensor scalar1(float v) { return f32_tensor({v}, {1}); }

  // compressed-tensors has no pre-quantization scale: a weight-only Linear's is multiplied into its
  // columns and the weight quantized again (reported); one with quantized inputs cannot be written.
  void fold_pre_quant_scale(load::StoredLinear& st) {
    if (st.scheme.input) {
      fail("{}: {} keeps a pre_quant_scale on its quantized inputs, which compressed-tensors cannot hold; quantize with "
           "`mopt quantize ... --export compressed-tensors`, which folds every scale",
           source_, st.name);
    }
    const auto& spec = *st.scheme.weight;
    const std::int64_t out = st.out, in = st.in;
    std::vector<float> w = quant::dequantize_weight(spec, st.weight, out, in);
    for (std::int64_t r = 0; r < out; ++r) {
      for (std::int64_t j = 0; j < in; ++j) w[static_cast<std::size_t>(r * in + j)] *= st.pre_quant_scale[static_cast<std::size_t>(j)];
    }
    const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
    st.weight = quant::quantize_weight(spec, w.data(), out, in, amax);
    report_.requantized.push_back(st.name);
  }

  // 2:4 weights: sparse-24-bitmask where the weight is stored whole (16-bit, FP8, INT8 codes).
  void add_weight(const std::string& module, const Tensor& w) {
    if (sparse_24_ && io::is_sparse24(w)) {
      const io::Sparse24Bitmask b = io::sparse24_bitmask_compress(w, module + ".weight");
      dir_.add(module + ".compressed", b.compressed);
      dir_.add(module + ".bitmask", b.bitmask);
      dir_.add(module + ".shape", b.shape);
      sparse_modules_.push_back(module);
      pruned_ += w.numel() / 2;
    } else {
      dir_.add(module + ".weight", w);
      dense_modules_.push_back(module);
    }
  }

  // Packed codes keep their zeros in place: a 2:4 one is only noted (sparsity_config "dense").
  void note_packed(const std::string& module, const quant::QuantizerSpec& spec, const quant::QuantizedWeight& q, std::int64_t out, std::int64_t in) {
    if (!sparse_24_) return;
    const std::vector<float> w = quant::dequantize_weight(spec, q, out, in);
    if (io::is_sparse24(Tensor::from_f32(w, {out, in}))) {
      packed_sparse_ = true;
      sparse_modules_.push_back(module);
      pruned_ += static_cast<std::uint64_t>(out * in / 2);
    } else {
      dense_modules_.push_back(module);
    }
  }

  // compressed-tensors' Sparse24BitMaskConfig ("dense" when a packed format keeps the zeros in place).
  json sparsity_config(const io::ModelConfig& c) {
    if (sparse_modules_.empty()) {
      if (sparse_24_) fail("{}: no decoder Linear is 2:4 sparse; nothing for sparse-24-bitmask to hold", source_);
      return json::object();
    }
    std::uint64_t parameters = static_cast<std::uint64_t>(c.vocab_size * c.hidden_size) * (c.tie_word_embeddings ? 1u : 2u);
    for (std::int64_t l = 0; l < c.num_layers; ++l) {
      for (const auto kind : model::kAllLinears) {
        const auto [o, i] = load::linear_shape(c, kind);
        parameters += static_cast<std::uint64_t>(o * i);
      }
      parameters += static_cast<std::uint64_t>(2 * c.hidden_size);
    }
    json sparse_ignore = json::array({"lm_head"});
    for (const auto& m : dense_modules_) sparse_ignore.push_back(m);
    const bool all = dense_modules_.empty();
    report_.sparse_linears = static_cast<std::int64_t>(sparse_modules_.size());
    report_.sparsity_format = packed_sparse_ ? "dense" : "sparse-24-bitmask";
    return {{"format", report_.sparsity_format},
            {"global_sparsity", static_cast<double>(pruned_) / static_cast<double>(parameters)},
            {"ignore", sparse_ignore},
            {"registry_requires_subclass", false},
            {"sparsity_structure", "2:4"},
            {"targets", all ? json::array({"Linear"}) : json(sparse_modules_)}};
  }

  std::string source_;
  CheckpointDirWriter dir_;
  bool sparse_24_;
  CompressedTensorsReport report_;
  std::vector<std::pair<std::string, json>> modules_;  // quantized Linear -> its group
  std::vector<std::string> ignore_{"lm_head"};
  std::vector<std::string> sparse_modules_, dense_modules_;
  bool packed_sparse_ = false;
  std::uint64_t pruned_ = 0;
};

// Reads the written checkpoint back as the loader will: every Linear and KV scale must read.
void check_written(const std::string& d) {
  const load::QuantizedReader r = load::compressed_tensors_reader(d);
  const io::Checkpoint back = io::Checkpoint::open(d, r.layout);
  for (std::int64_t l = 0; l < back.config().num_layers; ++l) {
    for (const auto kind : model::kAllLinears) {
      if (!r.linear(back, l, kind)) r.dense_weight(back, fmt::format("model.layers.{}.{}", l, model::linear_name(kind)));
    }
    if (!r.kv_algo.empty()) r.kv_scales(back, l);
  }
}

}  // namespace

CompressedTensorsReport export_compressed_tensors(const std::string& quantized_dir, const std::string& out_dir, std::uint64_t shard_bytes,
                                                  bool sparse_24) {
  if (load::is_compressed_tensors_checkpoint(quantized_dir)) fail("{}: already a compressed-tensors checkpoint", quantized_dir);
  const bool quantized = load::is_modelopt_checkpoint(quantized_dir);
  if (!quantized && !sparse_24) {
    fail("{}: not a quantized checkpoint (mopt quantize writes one; --export compressed-tensors writes this format directly)", quantized_dir);
  }
  load::QuantizedReader reader;
  if (quantized) reader = load::modelopt_reader(quantized_dir);
  else reader.linear = [](const io::Checkpoint&, std::int64_t, model::LinearKind) -> std::optional<load::StoredLinear> { return std::nullopt; };
  const quant::KvScheme* kv = reader.kv_algo.empty() ? nullptr : quant::kv_scheme_for_quant_algo(reader.kv_algo);
  if (!reader.kv_algo.empty() && (kv == nullptr || !kv->compressed_tensors)) {
    fail("{}: compressed-tensors has no form for a {} KV cache", quantized_dir, reader.kv_algo);
  }
  const io::Checkpoint ckpt = io::Checkpoint::open(quantized_dir, load::modelopt_layout());
  if (ckpt.tensors().contains("lm_head.weight_scale")) {
    fail("{}: its lm_head is quantized (--quantize-lm-head); the compressed-tensors export keeps a 16-bit lm_head", quantized_dir);
  }
  const auto& c = ckpt.config();
  CtWriter writer(quantized_dir, out_dir, shard_bytes, sparse_24);
  CheckpointDirWriter& dir = writer.dir();
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string prefix = fmt::format("model.layers.{}.", l);
    std::set<std::string> consumed;
    for (const auto kind : model::kAllLinears) {
      auto st = reader.linear(ckpt, l, kind);
      if (st) writer.quantized_linear(std::move(*st), consumed);
      else writer.plain_linear(ckpt, prefix + std::string(model::linear_name(kind)), consumed);
    }
    if (!reader.kv_algo.empty()) {
      const auto [k, v] = reader.kv_scales(ckpt, l);
      dir.add(prefix + "self_attn.k_scale", f32_tensor({k}, {1}));
      dir.add(prefix + "self_attn.v_scale", f32_tensor({v}, {1}));
      consumed.insert(prefix + "self_attn.k_proj.k_scale");
      consumed.insert(prefix + "self_attn.v_proj.v_scale");
    }
    for (const auto& loc : ckpt.tensors().all()) {
      const std::string& n = loc.entry->name;
      if (n.rfind(prefix, 0) != 0 || consumed.count(n) || io::is_ignorable_tensor(n)) continue;
      dir.add(n, ckpt.tensor(n));
    }
    dir.maybe_flush();
  }
  for (const auto& loc : ckpt.tensors().all()) {
    const std::string& n = loc.entry->name;
    if (n.rfind("model.layers.", 0) == 0 || io::is_ignorable_tensor(n)) continue;
    dir.add(n, ckpt.tensor(n));
  }
  json config = c.raw;
  config["quantization_config"] = writer.quantization_config(c, !reader.kv_algo.empty());
  dir.write_json("config.json", config, 2);
  dir.copy_model_files(quantized_dir);
  dir.commit(check_written);
  CompressedTensorsReport report = writer.report();
  report.bytes = dir.bytes_written();
  return report;
}

}  // namespace mopt::exporter
