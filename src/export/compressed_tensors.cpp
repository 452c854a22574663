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
#include "io/json_util.h"
#include "algo/sparsity.h"
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

Tensor pack_int32_rows(const std::vector<std::int8_t>& codes, std::int64_t rows, std::int64_t cols, int bits) {
  const int per_word = 32 / bits;
  const std::int64_t words = (cols + per_word - 1) / per_word;
  const std::uint32_t mask = (1u << bits) - 1u, offset = 1u << (bits - 1);
  Tensor t = Tensor::zeros(DType::I32, {rows, words});
  auto* out = t.mutable_data<std::int32_t>();
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t w = 0; w < words; ++w) {
      std::uint32_t word = 0;
      for (int j = 0; j < per_word; ++j) {
        const std::int64_t c = w * per_word + j;
        // Padding columns hold the code 0 (offset value), as the reference pads with zeros before the offset.
        const std::uint32_t v = c < cols ? static_cast<std::uint32_t>(codes[static_cast<std::size_t>(r * cols + c)] + static_cast<int>(offset))
                                         : offset;
        word |= (v & mask) << (bits * j);
      }
      out[r * words + w] = static_cast<std::int32_t>(word);
    }
  }
  return t;
}

std::vector<std::int8_t> unpack_int32_rows(const Tensor& packed, std::int64_t rows, std::int64_t cols, int bits) {
  const int per_word = 32 / bits;
  const std::int64_t words = (cols + per_word - 1) / per_word;
  if (packed.dtype() != DType::I32 || packed.shape() != Shape{rows, words}) {
    fail("weight_packed is {} {}, expected int32 [{}, {}]", dtype_name(packed.dtype()), shape_string(packed.shape()), rows, words);
  }
  const std::uint32_t mask = (1u << bits) - 1u;
  const int offset = 1 << (bits - 1);
  std::vector<std::int8_t> codes(static_cast<std::size_t>(rows * cols));
  const auto* in = packed.data<std::int32_t>();
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const auto word = static_cast<std::uint32_t>(in[r * words + c / per_word]);
      const int v = static_cast<int>((word >> (bits * (c % per_word))) & mask);
      codes[static_cast<std::size_t>(r * cols + c)] = static_cast<std::int8_t>(v - offset);
    }
  }
  return codes;
}

namespace {

bool is_zero_bits(const std::uint8_t* p, std::size_t bytes) {
  // ±0 of any float type: every bit zero but the sign (the top bit, little-endian); integers: 0.
  for (std::size_t b = 0; b + 1 < bytes; ++b) {
    if (p[b] != 0) return false;
  }
  return (p[bytes - 1] & 0x7F) == 0;
}

std::size_t element_bytes(const Tensor& t, const std::string& label) {
  const auto bits = dtype_bits(t.dtype());
  if (bits != 8 && bits != 16 && bits != 32) fail("{}: a {} tensor has no sparse-24-bitmask form", label, dtype_name(t.dtype()));
  return bits / 8;
}

}  // namespace

bool is_sparse24(const Tensor& dense) {
  if (dense.rank() != 2 || dense.dim(1) % 4 != 0) return false;
  const auto bits = dtype_bits(dense.dtype());
  if (bits != 8 && bits != 16 && bits != 32) return false;
  const std::size_t eb = bits / 8;
  const auto* p = reinterpret_cast<const std::uint8_t*>(dense.bytes().data());
  for (std::uint64_t g = 0; g < dense.numel(); g += 4) {
    int nonzero = 0;
    for (int t = 0; t < 4; ++t) nonzero += !is_zero_bits(p + static_cast<std::size_t>(g + t) * eb, eb);
    if (nonzero > 2) return false;
  }
  return true;
}

Sparse24Bitmask sparse24_bitmask_compress(const Tensor& dense, const std::string& label) {
  if (dense.rank() != 2 || dense.dim(1) % 4 != 0) fail("{}: 2:4 sparsity needs a 2-D tensor with a multiple of 4 columns", label);
  const std::size_t eb = element_bytes(dense, label);
  const std::int64_t rows = dense.dim(0), cols = dense.dim(1), row_bytes = (cols + 7) / 8;
  Sparse24Bitmask r;
  r.compressed = Tensor::zeros(dense.dtype(), {rows, cols / 2});
  r.bitmask = Tensor::zeros(DType::U8, {rows, row_bytes});
  r.shape = Tensor::zeros(DType::I64, {2, 1});
  r.shape.mutable_data<std::int64_t>()[0] = rows;
  r.shape.mutable_data<std::int64_t>()[1] = cols;
  const auto* src = reinterpret_cast<const std::uint8_t*>(dense.bytes().data());
  auto* dst = reinterpret_cast<std::uint8_t*>(r.compressed.mutable_bytes().data());
  auto* bits = r.bitmask.mutable_data<std::uint8_t>();
  std::size_t out = 0;
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t c = 0; c < cols; c += 4) {
      const std::uint8_t* g = src + static_cast<std::size_t>(row * cols + c) * eb;
      bool nonzero[4];
      int n = 0;
      for (int t = 0; t < 4; ++t) n += (nonzero[t] = !is_zero_bits(g + t * eb, eb));
      if (n > 2) fail("{}: row {} columns {}..{} hold {} non-zero values; not 2:4 sparse", label, row, c, c + 3, n);
      bool keep[4] = {nonzero[0], nonzero[1], nonzero[2], nonzero[3]};
      if (n == 0) keep[2] = keep[3] = true;
      else if (n == 1) {
        const int at = nonzero[0] ? 0 : nonzero[1] ? 1 : nonzero[2] ? 2 : 3;
        keep[at == 0 ? 2 : at == 1 ? 3 : at == 2 ? 3 : 2] = true;
      }
      for (int t = 0; t < 4; ++t) {
        if (!keep[t]) continue;
        std::copy(g + t * eb, g + (t + 1) * eb, dst + out * eb);
        ++out;
        const std::int64_t j = c + t;
        bits[row * row_bytes + j / 8] = static_cast<std::uint8_t>(bits[row * row_bytes + j / 8] | (1u << (j % 8)));
      }
    }
  }
  return r;
}

Tensor sparse24_bitmask_decompress(const Tensor& compressed, const Tensor& bitmask, const Tensor& shape, const std::string& label) {
  if (shape.numel() != 2) fail("{}.shape has {} values, expected 2", label, shape.numel());
  const Tensor sh = shape.to(DType::F64);
  const double rd = sh.data<double>()[0], cd = sh.data<double>()[1];
  if (!(rd >= 1 && cd >= 4 && rd < 1e9 && cd < 1e9) || rd != std::floor(rd) || cd != std::floor(cd)) fail("{}.shape [{}, {}] is not a matrix shape", label, rd, cd);
  const auto rows = static_cast<std::int64_t>(rd), cols = static_cast<std::int64_t>(cd);
  if (cols % 4 != 0) fail("{}.shape has {} columns, not a multiple of 4", label, cols);
  const std::int64_t row_bytes = (cols + 7) / 8;
  if (bitmask.dtype() != DType::U8 || bitmask.numel() != static_cast<std::uint64_t>(rows * row_bytes)) {
    fail("{}.bitmask is not U8 [{}, {}]", label, rows, row_bytes);
  }
  if (compressed.numel() != static_cast<std::uint64_t>(rows * cols / 2)) fail("{}.compressed has {} values, expected {}", label, compressed.numel(), rows * cols / 2);
  const std::size_t eb = element_bytes(compressed, label + ".compressed");
  Tensor dense = Tensor::zeros(compressed.dtype(), {rows, cols});
  const auto* bits = bitmask.data<std::uint8_t>();
  const auto* src = reinterpret_cast<const std::uint8_t*>(compressed.bytes().data());
  auto* dst = reinterpret_cast<std::uint8_t*>(dense.mutable_bytes().data());
  std::size_t in = 0;
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t j = 0; j < cols; ++j) {
      if (!((bits[row * row_bytes + j / 8] >> (j % 8)) & 1)) continue;
      if (in >= static_cast<std::size_t>(rows * cols / 2)) fail("{}.bitmask keeps more than half of the values", label);
      std::copy(src + in * eb, src + (in + 1) * eb, dst + static_cast<std::size_t>(row * cols + j) * eb);
      ++in;
    }
  }
  if (in != static_cast<std::size_t>(rows * cols / 2)) fail("{}.bitmask keeps {} values, expected {}", label, in, rows * cols / 2);
  return dense;
}

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

bool is_compressed_tensors_checkpoint(const std::string& dir) {
  const fs::path config = fs::path(dir) / "config.json";
  if (!fs::is_directory(dir) || !fs::exists(config)) return false;
  const json j = io::parse_json_unique_keys(io::read_text_file(config.string()), config.string());
  return j.is_object() && j.contains("quantization_config") && j["quantization_config"].is_object() &&
         j["quantization_config"].value("quant_method", "") == "compressed-tensors";
}

CompressedTensorsReport export_compressed_tensors(const std::string& quantized_dir, const std::string& out_dir, std::uint64_t shard_bytes,
                                                  bool sparse_24) {
  if (is_compressed_tensors_checkpoint(quantized_dir)) fail("{}: already a compressed-tensors checkpoint", quantized_dir);
  const bool quantized = is_quantized_checkpoint(quantized_dir);
  if (!quantized && !sparse_24) {
    fail("{}: not a quantized checkpoint (mopt quantize writes one; --export compressed-tensors writes this format directly)", quantized_dir);
  }
  QuantizedReader reader;
  if (quantized) reader = modelopt_reader(quantized_dir);
  else reader.linear = [](const io::Checkpoint&, std::int64_t, model::LinearKind) -> std::optional<StoredLinear> { return std::nullopt; };
  if (!reader.kv_algo.empty() && reader.kv_algo != "FP8") {
    fail("{}: compressed-tensors has no form for a {} KV cache", quantized_dir, reader.kv_algo);
  }
  const io::Checkpoint ckpt = io::Checkpoint::open(quantized_dir, io::CheckpointLayout::quantized);
  if (ckpt.tensors().contains("lm_head.weight_scale")) {
    fail("{}: its lm_head is quantized (--quantize-lm-head); the compressed-tensors export keeps a 16-bit lm_head", quantized_dir);
  }
  const auto& c = ckpt.config();
  CheckpointDirWriter dir(out_dir, shard_bytes);
  CompressedTensorsReport report;
  std::vector<std::pair<std::string, json>> modules;  // quantized Linear -> its group
  std::vector<std::string> ignore{"lm_head"};
  auto scalar1 = [](float v) { return f32_tensor({v}, {1}); };
  // 2:4 weights: sparse-24-bitmask where the weight is stored whole (16-bit, FP8, INT8 codes).
  std::vector<std::string> sparse_modules, dense_modules;
  bool packed_sparse = false;
  std::uint64_t pruned = 0;
  auto add_weight = [&](const std::string& module, const Tensor& w) {
    if (sparse_24 && is_sparse24(w)) {
      const Sparse24Bitmask b = sparse24_bitmask_compress(w, module + ".weight");
      dir.add(module + ".compressed", b.compressed);
      dir.add(module + ".bitmask", b.bitmask);
      dir.add(module + ".shape", b.shape);
      sparse_modules.push_back(module);
      pruned += w.numel() / 2;
    } else {
      dir.add(module + ".weight", w);
      dense_modules.push_back(module);
    }
  };
  // Packed codes keep their zeros in place: a 2:4 one is only noted (sparsity_config "dense").
  auto note_packed = [&](const std::string& module, const quant::QuantizerSpec& spec, const quant::QuantizedWeight& q, std::int64_t out,
                         std::int64_t in) {
    if (!sparse_24) return;
    const std::vector<float> w = quant::dequantize_weight(spec, q, out, in);
    if (algo::is_24_sparse(w.data(), out, in)) {
      packed_sparse = true;
      sparse_modules.push_back(module);
      pruned += static_cast<std::uint64_t>(out * in / 2);
    } else {
      dense_modules.push_back(module);
    }
  };
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string prefix = fmt::format("model.layers.{}.", l);
    std::set<std::string> consumed;
    for (const auto kind : model::kAllLinears) {
      const std::string name = prefix + std::string(model::linear_name(kind));
      auto st = reader.linear(ckpt, l, kind);
      if (!st) {
        ignore.push_back(name);
        if (sparse_24) {
          add_weight(name, ckpt.tensor(name + ".weight"));
          consumed.insert(name + ".weight");
        }
        continue;
      }
      if (st->scheme.weight->grid == quant::IntGrid::ggml) fail("{}: {} is stored as GGUF blocks, which compressed-tensors has no form for", quantized_dir, name);
      const json group = compressed_tensors_group(st->scheme);
      const auto& spec = *st->scheme.weight;
      const std::int64_t out = st->out, in = st->in;
      if (!st->pre_quant_scale.empty()) {
        if (st->scheme.input) {
          fail("{}: {} keeps a pre_quant_scale on its quantized inputs, which compressed-tensors cannot hold; quantize with "
               "`mopt quantize ... --export compressed-tensors`, which folds every scale",
               quantized_dir, name);
        }
        std::vector<float> w = quant::dequantize_weight(spec, st->weight, out, in);
        for (std::int64_t r = 0; r < out; ++r) {
          for (std::int64_t j = 0; j < in; ++j) w[static_cast<std::size_t>(r * in + j)] *= st->pre_quant_scale[static_cast<std::size_t>(j)];
        }
        const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
        st->weight = quant::quantize_weight(spec, w.data(), out, in, amax);
        report.requantized.push_back(name);
      }
      const quant::QuantizedWeight& q = st->weight;
      switch (ct_kind(st->scheme)) {
        case CtKind::int4_pack:
        case CtKind::int8_pack: {
          const bool int4 = ct_kind(st->scheme) == CtKind::int4_pack;
          const std::vector<std::int8_t> codes = int4 ? quant::unpack_int4_rows(q.weight, out, in) : int8_codes(q.weight);
          dir.add(name + ".weight_packed", pack_int32_rows(codes, out, in, int4 ? 4 : 8));
          Tensor scale = q.weight_scale.to(DType::F32);
          dir.add(name + ".weight_scale", int4 ? scale : f32_tensor(scale.to_f32(), {out, 1}));
          Tensor shape = Tensor::zeros(DType::I64, {2});
          shape.mutable_data<std::int64_t>()[0] = out;
          shape.mutable_data<std::int64_t>()[1] = in;
          dir.add(name + ".weight_shape", shape);
          note_packed(name, spec, q, out, in);
          break;
        }
        case CtKind::int8_w8a8:
        case CtKind::fp8_channel:
          add_weight(name, q.weight);
          dir.add(name + ".weight_scale", f32_tensor(q.weight_scale.to_f32(), {out, 1}));
          break;
        case CtKind::fp8_tensor:
          add_weight(name, q.weight);
          dir.add(name + ".weight_scale", scalar1(only_value(q.weight_scale, name + ".weight_scale")));
          break;
        case CtKind::fp8_block:
          add_weight(name, q.weight);
          dir.add(name + ".weight_scale", q.weight_scale.to(DType::F32));
          break;
        case CtKind::nvfp4:
          note_packed(name, spec, q, out, in);
          dir.add(name + ".weight_packed", q.weight);
          dir.add(name + ".weight_scale", q.weight_scale);
          dir.add(name + ".weight_global_scale", scalar1(1.0f / only_value(*q.weight_scale_2, name + ".weight_scale_2")));
          break;
      }
      if (st->input_scale) {
        const bool nvfp4 = ct_kind(st->scheme) == CtKind::nvfp4;
        dir.add(name + (nvfp4 ? ".input_global_scale" : ".input_scale"), scalar1(nvfp4 ? 1.0f / *st->input_scale : *st->input_scale));
      }
      for (const char* suffix : {".weight", ".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale"}) consumed.insert(name + suffix);
      modules.emplace_back(name, group);
      ++report.quantized_linears;
    }
    if (!reader.kv_algo.empty()) {
      const auto [k, v] = reader.kv_scales(ckpt, l);
      dir.add(prefix + "self_attn.k_scale", scalar1(k));
      dir.add(prefix + "self_attn.v_scale", scalar1(v));
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

  // One config group per distinct scheme; a single one targets every Linear.
  std::vector<std::pair<json, std::vector<std::string>>> groups;
  for (const auto& module : modules) {
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
  json sparsity = json::object();
  if (!sparse_modules.empty()) {
    // compressed-tensors' Sparse24BitMaskConfig ("dense" when a packed format keeps the zeros in place).
    std::uint64_t parameters = static_cast<std::uint64_t>(c.vocab_size * c.hidden_size) * (c.tie_word_embeddings ? 1u : 2u);
    for (std::int64_t l = 0; l < c.num_layers; ++l) {
      for (const auto kind : model::kAllLinears) {
        const auto [o, i] = linear_shape(c, kind);
        parameters += static_cast<std::uint64_t>(o * i);
      }
      parameters += static_cast<std::uint64_t>(2 * c.hidden_size);
    }
    json sparse_ignore = json::array({"lm_head"});
    for (const auto& m : dense_modules) sparse_ignore.push_back(m);
    const bool all = dense_modules.empty();
    sparsity = {{"format", packed_sparse ? "dense" : "sparse-24-bitmask"},
                {"global_sparsity", static_cast<double>(pruned) / static_cast<double>(parameters)},
                {"ignore", sparse_ignore},
                {"registry_requires_subclass", false},
                {"sparsity_structure", "2:4"},
                {"targets", all ? json::array({"Linear"}) : json(sparse_modules)}};
    report.sparse_linears = static_cast<std::int64_t>(sparse_modules.size());
    report.sparsity_format = sparsity["format"].get<std::string>();
  } else if (sparse_24) {
    fail("{}: no decoder Linear is 2:4 sparse; nothing for sparse-24-bitmask to hold", quantized_dir);
  }
  json qc;
  if (modules.empty() && reader.kv_algo.empty()) {
    // Sparsity alone, as compressed-tensors writes it: no quantization groups.
    qc = {{"quant_method", "compressed-tensors"}, {"sparsity_config", sparsity}, {"transform_config", json::object()}};
  } else {
    qc = {{"quant_method", "compressed-tensors"},
          {"format", formats.size() == 1 ? *formats.begin() : std::string("mixed-precision")},
          {"quantization_status", "compressed"},
          {"config_groups", config_groups},
          {"ignore", ignore},
          {"kv_cache_scheme", reader.kv_algo.empty() ? json(nullptr) : quant_args(8, "float", "tensor", 0, false)},
          {"global_compression_ratio", nullptr},
          {"sparsity_config", sparsity}};
  }
  json config = c.raw;
  config["quantization_config"] = qc;
  dir.write_json("config.json", config, 2);
  dir.copy_model_files(quantized_dir);
  dir.commit([](const std::string& d) {
    const QuantizedReader r = compressed_tensors_reader(d);
    const io::Checkpoint back = io::Checkpoint::open(d, io::CheckpointLayout::quantized);
    for (std::int64_t l = 0; l < back.config().num_layers; ++l) {
      for (const auto kind : model::kAllLinears) {
        if (!r.linear(back, l, kind)) r.dense_weight(back, fmt::format("model.layers.{}.{}", l, model::linear_name(kind)));
      }
      if (!r.kv_algo.empty()) r.kv_scales(back, l);
    }
  });
  report.bytes = dir.bytes_written();
  return report;
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
  r.kv_algo = cfg.kv ? "FP8" : "";
  // A weight stored as sparse-24-bitmask (module.compressed / .bitmask / .shape), dense again.
  const auto sparse_weight = [dir](const io::Checkpoint& ckpt, const std::string& module) -> std::optional<Tensor> {
    const auto& store = ckpt.tensors();
    if (!store.contains(module + ".compressed")) return std::nullopt;
    for (const char* part : {".bitmask", ".shape"}) {
      if (!store.contains(module + part)) fail("{}: {}{} is missing (its .compressed is there)", dir, module, part);
    }
    return sparse24_bitmask_decompress(store.tensor(module + ".compressed"), store.tensor(module + ".bitmask"), store.tensor(module + ".shape"),
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
      std::vector<std::int8_t> codes = with_context(label, [&] { return unpack_int32_rows(need(".weight_packed"), out, in, bits); });
      if (bits == 4) {
        if (out % 2 != 0) fail("{}: {} output rows cannot be stored in mopt's INT4 layout", label, out);
        q.weight = quant::pack_int4_rows(codes, out, in);
        const std::int64_t groups = (in + spec.block - 1) / spec.block;
        q.weight_scale = f32_tensor(f32_of(".weight_scale", static_cast<std::uint64_t>(out * groups)), {out, groups});
      } else {
        q.weight = Tensor::zeros(DType::I8, {out, in});
        std::copy(codes.begin(), codes.end(), q.weight.mutable_data<std::int8_t>());
        q.weight_scale = f32_tensor(f32_of(".weight_scale", static_cast<std::uint64_t>(out)), {out});
      }
    } else if (spec.scaling == quant::Scaling::nvfp4) {
      q.weight = need(".weight_packed");
      q.weight_scale = need(".weight_scale");
      const float global = f32_of(".weight_global_scale", 1)[0];
      if (!(global > 0.0f) || !std::isfinite(global)) fail("{}.weight_global_scale is {}", label, global);
      q.weight_scale_2 = f32_tensor({1.0f / global}, {});
      const float in_global = f32_of(".input_global_scale", 1)[0];
      if (!(in_global > 0.0f) || !std::isfinite(in_global)) fail("{}.input_global_scale is {}", label, in_global);
      s.input_scale = 1.0f / in_global;
    } else {
      if (auto w = sparse_weight(ckpt, s.name)) q.weight = std::move(*w);
      else q.weight = need(".weight");
      if (spec.scaling == quant::Scaling::per_tensor) q.weight_scale = f32_tensor(f32_of(".weight_scale", 1), {});
      else if (spec.scaling == quant::Scaling::per_row) q.weight_scale = f32_tensor(f32_of(".weight_scale", static_cast<std::uint64_t>(out)), {out});
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
      v[static_cast<std::size_t>(i)] = only_value(ckpt.tensor(name), dir + ": " + name);
    }
    return std::pair<float, float>{v[0], v[1]};
  };
  return r;
}

}  // namespace mopt::exporter
