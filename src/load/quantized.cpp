#include "load/quantized.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <memory>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "io/json_util.h"
#include "kernels/sparse24.h"
#include "quant/act_quant.h"

namespace mopt::load {

std::string config_quant_method(const std::string& dir) {
  const std::filesystem::path config = std::filesystem::path(dir) / "config.json";
  if (!std::filesystem::is_regular_file(config)) return "";
  try {
    const nlohmann::json j = io::parse_json_unique_keys(io::read_text_file(config.string()), config.string());
    if (!j.is_object() || !j.contains("quantization_config") || !j["quantization_config"].is_object()) return "";
    const nlohmann::json& q = j["quantization_config"];
    return q.contains("quant_method") && q["quant_method"].is_string() ? q["quant_method"].get<std::string>() : "";
  } catch (const Error&) {
    return "";
  }
}

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
      if (!(amax2 > kTinyAmax)) amax2 = 1.0f;
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
    // gather). W8A8 and INT4 (groups of 64 or more) where their block kernels run (AVX-512 VBMI and
    // VNNI, inputs a multiple of 32 and 64; 1.7x and 1.35x the dense decode, W8A8 also 1.2-2.5x its
    // batched and prefill products).
    const CpuFeatures& cpu = cpu_features();
    const bool w8a8 = source.type == kernels::QuantizedWeightType::int8 && source.int8_activations;
    const bool int4 = source.type == kernels::QuantizedWeightType::int4;
    const bool vbmi = cpu.avx512bw && cpu.avx512_vbmi && cpu.avx512_vnni && source.in % (int4 ? 64 : 32) == 0;
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
      const float bound = s.input->scaling == quant::Scaling::nvfp4 ? kNvfp4AmaxBound : s.input->max_bound();
      aq.amax = {scale * bound};
    }
    lin.input_transform = std::move(aq);
  } else if (!pre_quant_scale.empty()) {
    // Weight-only with a pre-quantization scale, or W8A8 whose kernel quantizes the input:
    // only the scale applies to the input here.
    lin.input_transform = quant::ActivationQuantizer{std::nullopt, {}, std::move(pre_quant_scale)};
  }
}

}  // namespace

model::Model load_quantized(const std::string& dir, const QuantizedReader& reader, QuantizedRun run) {
  if (!reader.kv_algo.empty() && quant::kv_scheme_for_quant_algo(reader.kv_algo) == nullptr) {
    fail("{}: KV-cache quantization '{}' is not one mopt reads", dir, reader.kv_algo);
  }
  model::LoadOptions options;
  options.layout = reader.layout;
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
      const quant::KvScheme& kv = *quant::kv_scheme_for_quant_algo(reader.kv_algo);
      const float bound = kv.spec.scaling == quant::Scaling::nvfp4 ? kNvfp4AmaxBound : kv.spec.max_bound();
      const auto [k_scale, v_scale] = reader.kv_scales(ckpt, index);
      for (const float v : {k_scale, v_scale}) {
        if (!std::isfinite(v) || v < 0.0f) fail("{}: layer {}'s KV-cache scale is {}", dir, index, v);
      }
      if (kv.e4m3_cache) w.kv_e4m3_amax = std::pair<float, float>{k_scale * bound, v_scale * bound};
      w.key_transform = quant::ActivationQuantizer{kv.spec, {k_scale * bound}, {}};
      w.value_transform = quant::ActivationQuantizer{kv.spec, {v_scale * bound}, {}};
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

}  // namespace mopt::load
