#include "quant/qtensor.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "core/convert.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "io/ggml_grid.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "quant/fake_quant.h"

namespace mopt::quant {

namespace {

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// The exporter's view of a calibrated amax: zero (an all-zero group) becomes
// the format's bound, so that its scale is 1.
float export_amax(float amax, float bound) { return amax > 0.0f ? amax : bound; }

// E8M0 exponent of an MX block: ceil(log2(amax / element_max)), at least -127
// (at most 127); an all-zero block gets -127.
int mx_export_exponent(float amax, float element_max) {
  if (!(amax > 0.0f)) return -127;
  int e = 0;
  const float m = std::frexp(amax / element_max, &e);
  const int ceil_log2 = m == 0.5f ? e - 1 : e;
  return std::clamp(ceil_log2, -127, 127);
}

std::uint8_t e2m1_code(float x) {
  // Sign from x < 0 (so -0 encodes as +0), magnitude rounded to nearest even and saturated at 6.
  const float a = round_e2m1_magnitude(std::fabs(x));
  std::uint8_t idx = 0;
  static constexpr float kGrid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  while (kGrid[idx] != a) ++idx;
  return static_cast<std::uint8_t>((x < 0.0f ? 8 : 0) | idx);
}

// MXFP4 export rounds ties down (a strict > against each midpoint) and gives
// zero the sign bit, as the reference's MXFP4 exporter does.
std::uint8_t mxfp4_code(float x) {
  static constexpr float kBounds[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
  const float a = std::fabs(x);
  std::uint8_t idx = 0;
  for (float b : kBounds) idx = static_cast<std::uint8_t>(idx + (a > b ? 1 : 0));
  const bool negative_bit = !(x > 0.0f);  // (2 - sign(x)) // 2: 0 for x > 0, 1 for x <= 0
  return static_cast<std::uint8_t>((negative_bit ? 8 : 0) | idx);
}

}  // namespace

float w4a8_second_amax(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in, std::span<const float> amax) {
  QuantizerSpec first = spec;
  first.fp8_second_stage = false;
  std::vector<float> q(static_cast<std::size_t>(out * in));
  fake_quantize(first, w, out, in, amax, q.data());
  float m = 0.0f;
  for (float v : q) m = std::max(m, std::fabs(v));
  return m;
}

namespace {

// The bytes of one row of ggml blocks.
std::int64_t ggml_row_bytes(const QuantizerSpec& spec, std::int64_t in) {
  const auto info = io::ggml_type_info(static_cast<std::uint32_t>(spec.ggml_type));
  if (!info || !io::ggml_has_grid(spec.ggml_type)) fail("{}: not a ggml block type mopt quantizes onto", spec.describe());
  if (in % info->block_elements != 0) fail("{}: rows of {} values are not whole blocks of {}", spec.describe(), in, info->block_elements);
  return in / info->block_elements * info->block_bytes;
}

QuantizedWeight quantize_ggml_weight(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in,
                                     const GgmlBlockInputs& inputs) {
  const std::int64_t row_bytes = ggml_row_bytes(spec, in);
  const std::span<const std::byte> grid_blocks = inputs.fixed_blocks;
  if (!inputs.importance.empty() && static_cast<std::int64_t>(inputs.importance.size()) != in) {
    fail("{}: {} importance values for {} input channels", spec.describe(), inputs.importance.size(), in);
  }
  if (!grid_blocks.empty() && static_cast<std::int64_t>(grid_blocks.size()) != out * row_bytes) {
    fail("{}: {} grid bytes for a [{}, {}] weight", spec.describe(), grid_blocks.size(), out, in);
  }
  QuantizedWeight q;
  q.weight = Tensor::zeros(DType::U8, {out, row_bytes});
  auto* bytes = reinterpret_cast<std::byte*>(q.weight.mutable_data<std::uint8_t>());
  parallel_each(out, 1, out * in >= (std::int64_t{1} << 15), [&](std::int64_t r) {
    const float* row = w + r * in;
    const auto n = static_cast<std::uint64_t>(in);
    const std::vector<std::byte> b = grid_blocks.empty()
                                         ? io::ggml_quantize(spec.ggml_type, row, n, fmt::format("weight row {}", r), inputs.importance)
                                         : io::ggml_requantize(spec.ggml_type, grid_blocks.subspan(static_cast<std::size_t>(r * row_bytes),
                                                                                                   static_cast<std::size_t>(row_bytes)),
                                                               row, n, fmt::format("weight row {}", r));
    std::copy(b.begin(), b.end(), bytes + r * row_bytes);
  });
  return q;
}

}  // namespace

void check_weight_shape(const QuantizerSpec& spec, std::int64_t out, std::int64_t in) {
  if (spec.grid == IntGrid::ggml) {
    ggml_row_bytes(spec, in);
    return;
  }
  if (spec.scaling == Scaling::mx && in % spec.block != 0) {
    fail("MX export needs the input dimension ({}) to be a multiple of the block ({}), as the reference's exporter does", in, spec.block);
  }
  if (spec.element == Element::int4) {
    if (spec.scaling != Scaling::block || spec.block_rows != 0) fail("no INT4 weight layout for {}", spec.describe());
    if (out % 2 != 0) fail("INT4 packs pairs of rows; the weight has an odd number of rows ({})", out);
    if (in % spec.block != 0) {
      fail("INT4 export needs the input dimension ({}) to be a multiple of the group size ({}), as the reference's "
           "exporter and the engines' kernels do; choose a group size that divides it (--group-size) or leave the module out",
           in, spec.block);
    }
  }
  if (spec.element == Element::e2m1 && in % 2 != 0) fail("FP4 packs pairs of columns; the weight has an odd number of columns ({})", in);
}

QuantizedWeight quantize_weight(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in,
                                std::span<const float> amax, float amax2, std::span<const float> nvfp4_block_amax,
                                const GgmlBlockInputs& ggml) {
  check_weight_shape(spec, out, in);
  if (spec.grid == IntGrid::ggml) return quantize_ggml_weight(spec, w, out, in, ggml);
  if (!ggml.fixed_blocks.empty() || !ggml.importance.empty()) fail("{}: ggml block inputs given to a quantizer without ggml blocks", spec.describe());
  const auto need = static_cast<std::size_t>(amax_count(spec, out, in));
  if (amax.size() != need) fail("{} weight [{}, {}] needs {} amax values, got {}", spec.describe(), out, in, need, amax.size());
  QuantizedWeight q;
  const std::int64_t n = out * in;
  switch (spec.element) {
    case Element::e4m3: {
      if (spec.scaling == Scaling::mx) {
        const std::int64_t nb = ceil_div(in, spec.block);
        q.weight = Tensor::zeros(DType::F8_E4M3, {out, in});
        q.weight_scale = Tensor::zeros(DType::U8, {out, nb});
        auto* codes = q.weight.mutable_data<std::uint8_t>();
        auto* scales = q.weight_scale.mutable_data<std::uint8_t>();
        for (std::int64_t r = 0; r < out; ++r) {
          for (std::int64_t b = 0; b < nb; ++b) {
            const std::int64_t c0 = b * spec.block, len = std::min(spec.block, in - c0);
            float m = 0.0f;
            for (std::int64_t i = 0; i < len; ++i) m = std::max(m, std::fabs(w[r * in + c0 + i]));
            const int e = mx_export_exponent(m, kE4M3Max);
            scales[r * nb + b] = static_cast<std::uint8_t>(e + 127);
            const float mul = std::ldexp(1.0f, -e);
            for (std::int64_t i = 0; i < len; ++i) {
              codes[r * in + c0 + i] = f32_to_e4m3(std::clamp(w[r * in + c0 + i] * mul, -kE4M3Max, kE4M3Max));
            }
          }
        }
        return q;
      }
      q.weight = Tensor::zeros(DType::F8_E4M3, {out, in});
      auto* codes = q.weight.mutable_data<std::uint8_t>();
      if (spec.scaling == Scaling::per_tensor) {
        q.weight_scale = Tensor::zeros(DType::F32, {});
        const float s = export_amax(amax[0], kE4M3Max) / kE4M3Max;
        q.weight_scale.mutable_data<float>()[0] = s;
        for (std::int64_t i = 0; i < n; ++i) codes[i] = f32_to_e4m3(w[i] / s);
      } else if (spec.scaling == Scaling::per_row) {
        q.weight_scale = Tensor::zeros(DType::F32, {out});
        auto* s = q.weight_scale.mutable_data<float>();
        for (std::int64_t r = 0; r < out; ++r) {
          s[r] = export_amax(amax[static_cast<std::size_t>(r)], kE4M3Max) / kE4M3Max;
          for (std::int64_t c = 0; c < in; ++c) codes[r * in + c] = f32_to_e4m3(w[r * in + c] / s[r]);
        }
      } else if (spec.scaling == Scaling::block && spec.block_rows > 0) {
        const std::int64_t tr = ceil_div(out, spec.block_rows), tc = ceil_div(in, spec.block);
        q.weight_scale = Tensor::zeros(DType::F32, {tr, tc});
        auto* s = q.weight_scale.mutable_data<float>();
        for (std::int64_t i = 0; i < tr * tc; ++i) s[i] = export_amax(amax[static_cast<std::size_t>(i)], kE4M3Max) / kE4M3Max;
        for (std::int64_t r = 0; r < out; ++r) {
          for (std::int64_t c = 0; c < in; ++c) codes[r * in + c] = f32_to_e4m3(w[r * in + c] / s[(r / spec.block_rows) * tc + c / spec.block]);
        }
      } else {
        fail("no FP8 weight layout for {}", spec.describe());
      }
      return q;
    }
    case Element::int8: {
      if (spec.scaling != Scaling::per_row) fail("no INT8 weight layout for {}", spec.describe());
      q.weight = Tensor::zeros(DType::I8, {out, in});
      q.weight_scale = Tensor::zeros(DType::F32, {out});
      auto* codes = q.weight.mutable_data<std::int8_t>();
      auto* s = q.weight_scale.mutable_data<float>();
      for (std::int64_t r = 0; r < out; ++r) {
        s[r] = export_amax(amax[static_cast<std::size_t>(r)], 127.0f) / 127.0f;
        for (std::int64_t c = 0; c < in; ++c) {
          codes[r * in + c] = static_cast<std::int8_t>(std::clamp(std::nearbyint(w[r * in + c] / s[r]), -128.0f, 127.0f));
        }
      }
      return q;
    }
    case Element::int4: {
      const std::int64_t nb = ceil_div(in, spec.block);
      q.weight = Tensor::zeros(DType::U8, {out / 2, in});
      q.weight_scale = Tensor::zeros(DType::F32, {out, nb});
      auto* packed = q.weight.mutable_data<std::uint8_t>();
      auto* s = q.weight_scale.mutable_data<float>();
      const bool q4_0 = spec.grid == IntGrid::q4_0;
      if (q4_0 && spec.fp8_second_stage) fail("W4A8's FP8 second stage has no Q4_0 grid");
      for (std::int64_t i = 0; i < out * nb; ++i) {
        // Q4_0: the signed f16 step itself (0 for a zero block: every code 0).
        s[i] = q4_0 ? q4_0_step(amax[static_cast<std::size_t>(i)]) : export_amax(amax[static_cast<std::size_t>(i)], 7.0f) / 7.0f;
      }
      for (std::int64_t r = 0; r < out; ++r) {
        const auto shift = static_cast<int>((r % 2) * 4);
        for (std::int64_t c = 0; c < in; ++c) {
          const float step = s[r * nb + c / spec.block];
          const float v = step == 0.0f ? 0.0f : std::clamp(std::nearbyint(w[r * in + c] / step), -8.0f, 7.0f);
          const auto nibble = static_cast<std::uint8_t>(static_cast<std::int8_t>(v) & 0x0F);
          packed[(r / 2) * in + c] = static_cast<std::uint8_t>(packed[(r / 2) * in + c] | (nibble << shift));
        }
      }
      if (spec.fp8_second_stage) {
        q.weight_scale_2 = Tensor::zeros(DType::F32, {});
        q.weight_scale_2->mutable_data<float>()[0] = export_amax(amax2, kE4M3Max) / kE4M3Max;
      }
      return q;
    }
    case Element::e2m1: {
      const std::int64_t nb = ceil_div(in, spec.block);
      q.weight = Tensor::zeros(DType::U8, {out, in / 2});
      auto* packed = q.weight.mutable_data<std::uint8_t>();
      auto put = [&](std::int64_t r, std::int64_t c, std::uint8_t code) {
        packed[r * (in / 2) + c / 2] = static_cast<std::uint8_t>(packed[r * (in / 2) + c / 2] | (code << ((c % 2) * 4)));
      };
      if (spec.scaling == Scaling::nvfp4) {
        q.weight_scale = Tensor::zeros(DType::F8_E4M3, {out, nb});
        q.weight_scale_2 = Tensor::zeros(DType::F32, {});
        float wsf2 = amax[0] / kNvfp4AmaxBound;
        if (!(wsf2 > 0.0f)) wsf2 = 1.0f;  // an all-zero weight: every code is 0 whatever the scale
        q.weight_scale_2->mutable_data<float>()[0] = wsf2;
        auto* scales = q.weight_scale.mutable_data<std::uint8_t>();
        const float denominator = kE2M1Max * wsf2;
        if (!nvfp4_block_amax.empty() && static_cast<std::int64_t>(nvfp4_block_amax.size()) != out * nb) {
          fail("NVFP4: {} block maxima for a [{}, {}] weight", nvfp4_block_amax.size(), out, in);
        }
        for (std::int64_t r = 0; r < out; ++r) {
          for (std::int64_t b = 0; b < nb; ++b) {
            const std::int64_t c0 = b * spec.block, len = std::min(spec.block, in - c0);
            float m = 0.0f;
            if (nvfp4_block_amax.empty()) {
              for (std::int64_t i = 0; i < len; ++i) m = std::max(m, std::fabs(w[r * in + c0 + i]));
            } else {
              m = nvfp4_block_amax[static_cast<std::size_t>(r * nb + b)];
            }
            float s = m / denominator;
            if (s == 0.0f) s = 1.0f;
            s = std::clamp(s, 0.001953125f, kE4M3Max);  // [2^-9, 448]: never a zero or NaN scale
            const std::uint8_t code = f32_to_e4m3(s);
            scales[r * nb + b] = code;
            const float step = e4m3_to_f32(code) * wsf2;
            for (std::int64_t i = 0; i < len; ++i) put(r, c0 + i, e2m1_code(w[r * in + c0 + i] / step));
          }
        }
      } else if (spec.scaling == Scaling::mx) {
        q.weight_scale = Tensor::zeros(DType::U8, {out, nb});
        auto* scales = q.weight_scale.mutable_data<std::uint8_t>();
        for (std::int64_t r = 0; r < out; ++r) {
          for (std::int64_t b = 0; b < nb; ++b) {
            const std::int64_t c0 = b * spec.block, len = std::min(spec.block, in - c0);
            float m = 0.0f;
            for (std::int64_t i = 0; i < len; ++i) m = std::max(m, std::fabs(w[r * in + c0 + i]));
            const int e = mx_export_exponent(m, kE2M1Max);
            scales[r * nb + b] = static_cast<std::uint8_t>(e + 127);
            const float div = std::ldexp(1.0f, e);
            for (std::int64_t i = 0; i < len; ++i) put(r, c0 + i, mxfp4_code(w[r * in + c0 + i] / div));
          }
        }
      } else {
        fail("no FP4 weight layout for {}", spec.describe());
      }
      return q;
    }
  }
  fail("unknown element type");
}

void check_quantized_weight(const QuantizerSpec& spec, const QuantizedWeight& q, std::int64_t out, std::int64_t in,
                            const std::string& label) {
  auto expect = [&](const Tensor& t, const char* what, DType dtype, const Shape& shape) {
    if (t.dtype() != dtype || t.shape() != shape) {
      fail("{}: {} is {} {}, expected {} {} for {}", label, what, dtype_name(t.dtype()), shape_string(t.shape()),
           dtype_name(dtype), shape_string(shape), spec.describe());
    }
  };
  if (spec.grid == IntGrid::ggml) {
    expect(q.weight, "weight", DType::U8, {out, ggml_row_bytes(spec, in)});
    return;
  }
  const std::int64_t nb = spec.block > 0 ? ceil_div(in, spec.block) : 0;
  switch (spec.element) {
    case Element::e4m3:
      expect(q.weight, "weight", DType::F8_E4M3, {out, in});
      if (spec.scaling == Scaling::mx) expect(q.weight_scale, "weight_scale", DType::U8, {out, nb});
      else if (spec.scaling == Scaling::per_tensor) {
        if (q.weight_scale.numel() != 1 || q.weight_scale.dtype() != DType::F32) expect(q.weight_scale, "weight_scale", DType::F32, {});
      } else if (spec.scaling == Scaling::per_row) expect(q.weight_scale, "weight_scale", DType::F32, {out});
      else expect(q.weight_scale, "weight_scale", DType::F32, {ceil_div(out, spec.block_rows), nb});
      break;
    case Element::int8:
      expect(q.weight, "weight", DType::I8, {out, in});
      expect(q.weight_scale, "weight_scale", DType::F32, {out});
      break;
    case Element::int4:
      expect(q.weight, "weight", DType::U8, {out / 2, in});
      expect(q.weight_scale, "weight_scale", DType::F32, {out, nb});
      if (spec.fp8_second_stage && (!q.weight_scale_2 || q.weight_scale_2->numel() != 1)) fail("{}: weight_scale_2 missing", label);
      break;
    case Element::e2m1:
      expect(q.weight, "weight", DType::U8, {out, in / 2});
      if (spec.scaling == Scaling::nvfp4) {
        expect(q.weight_scale, "weight_scale", DType::F8_E4M3, {out, nb});
        if (!q.weight_scale_2 || q.weight_scale_2->numel() != 1) fail("{}: weight_scale_2 missing", label);
      } else {
        expect(q.weight_scale, "weight_scale", DType::U8, {out, nb});
      }
      break;
  }
  // Q4_0's grid stores the signed f16 step of each block (0 for a zero block).
  const bool signed_steps = spec.element == Element::int4 && spec.grid == IntGrid::q4_0;
  for (const Tensor* t : {&q.weight_scale, q.weight_scale_2 ? &*q.weight_scale_2 : nullptr}) {
    if (t == nullptr || t->dtype() != DType::F32) continue;
    for (float v : t->to_f32()) {
      if (signed_steps) {
        if (!std::isfinite(v) || v != f16_to_f32(f32_to_f16(v))) fail("{}: a Q4_0 block scale is {} (not a finite f16 value)", label, v);
      } else if (!std::isfinite(v) || v <= 0.0f) {
        fail("{}: a weight scale is {} (scales must be finite and positive)", label, v);
      }
    }
  }
}

std::vector<float> nvfp4_block_amax(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in) {
  if (spec.scaling != Scaling::nvfp4) fail("NVFP4 block maxima asked of a {} quantizer", spec.describe());
  const std::int64_t nb = ceil_div(in, spec.block);
  std::vector<float> m(static_cast<std::size_t>(out * nb), 0.0f);
  for (std::int64_t r = 0; r < out; ++r) {
    for (std::int64_t c = 0; c < in; ++c) {
      float& v = m[static_cast<std::size_t>(r * nb + c / spec.block)];
      v = std::max(v, std::fabs(w[r * in + c]));
    }
  }
  return m;
}

float nvfp4_export_step(float block_amax, float global_amax) {
  float wsf2 = global_amax / kNvfp4AmaxBound;
  if (!(wsf2 > 0.0f)) wsf2 = 1.0f;
  float s = block_amax / (6.0f * wsf2);
  if (s == 0.0f) s = 1.0f;
  s = std::clamp(s, 0.001953125f, kE4M3Max);
  return e4m3_to_f32(f32_to_e4m3(s)) * wsf2;
}

std::vector<float> dequantize_weight(const QuantizerSpec& spec, const QuantizedWeight& q, std::int64_t out, std::int64_t in) {
  std::vector<float> w(static_cast<std::size_t>(out * in));
  if (spec.grid == IntGrid::ggml) {
    const std::int64_t row_bytes = ggml_row_bytes(spec, in);
    if (q.weight.dtype() != DType::U8 || static_cast<std::int64_t>(q.weight.numel()) != out * row_bytes) {
      fail("{}: {} bytes of blocks for a [{}, {}] weight", spec.describe(), q.weight.numel(), out, in);
    }
    const auto* bytes = reinterpret_cast<const std::byte*>(q.weight.data<std::uint8_t>());
    for (std::int64_t r = 0; r < out; ++r) {
      io::ggml_dequantize(spec.ggml_type, {bytes + r * row_bytes, static_cast<std::size_t>(row_bytes)}, w.data() + r * in, static_cast<std::uint64_t>(in));
    }
    return w;
  }
  const std::int64_t nb = spec.block > 0 ? ceil_div(in, spec.block) : 0;
  const std::vector<float> s = q.weight_scale.dtype() == DType::U8 ? std::vector<float>{} : q.weight_scale.to_f32();
  switch (spec.element) {
    case Element::e4m3: {
      const auto* codes = q.weight.data<std::uint8_t>();
      for (std::int64_t r = 0; r < out; ++r) {
        for (std::int64_t c = 0; c < in; ++c) {
          float scale = 1.0f;
          if (spec.scaling == Scaling::mx) scale = e8m0_to_f32(q.weight_scale.data<std::uint8_t>()[r * nb + c / spec.block]);
          else if (spec.scaling == Scaling::per_tensor) scale = s[0];
          else if (spec.scaling == Scaling::per_row) scale = s[static_cast<std::size_t>(r)];
          else scale = s[static_cast<std::size_t>((r / spec.block_rows) * nb + c / spec.block)];
          w[static_cast<std::size_t>(r * in + c)] = e4m3_to_f32(codes[r * in + c]) * scale;
        }
      }
      break;
    }
    case Element::int8: {
      const auto* codes = q.weight.data<std::int8_t>();
      for (std::int64_t r = 0; r < out; ++r) {
        for (std::int64_t c = 0; c < in; ++c) w[static_cast<std::size_t>(r * in + c)] = static_cast<float>(codes[r * in + c]) * s[static_cast<std::size_t>(r)];
      }
      break;
    }
    case Element::int4: {
      const auto* packed = q.weight.data<std::uint8_t>();
      for (std::int64_t r = 0; r < out; ++r) {
        const auto shift = static_cast<int>((r % 2) * 4);
        for (std::int64_t c = 0; c < in; ++c) {
          const auto nibble = static_cast<std::uint8_t>((packed[(r / 2) * in + c] >> shift) & 0x0F);
          w[static_cast<std::size_t>(r * in + c)] = int4_to_f32(nibble) * s[static_cast<std::size_t>(r * nb + c / spec.block)];
        }
      }
      if (spec.fp8_second_stage) {
        const float amax2 = q.weight_scale_2->to_f32()[0] * kE4M3Max;
        for (float& v : w) v = fake_quant_e4m3(v, amax2);
      }
      break;
    }
    case Element::e2m1: {
      const auto* packed = q.weight.data<std::uint8_t>();
      const float wsf2 = q.weight_scale_2 ? q.weight_scale_2->to_f32()[0] : 1.0f;
      for (std::int64_t r = 0; r < out; ++r) {
        for (std::int64_t c = 0; c < in; ++c) {
          const auto code = static_cast<std::uint8_t>((packed[r * (in / 2) + c / 2] >> ((c % 2) * 4)) & 0x0F);
          const std::uint8_t sc = q.weight_scale.data<std::uint8_t>()[r * nb + c / spec.block];
          const float step = spec.scaling == Scaling::nvfp4 ? e4m3_to_f32(sc) * wsf2 : e8m0_to_f32(sc);
          w[static_cast<std::size_t>(r * in + c)] = e2m1_to_f32(code) * step;
        }
      }
      break;
    }
  }
  return w;
}

std::vector<std::int8_t> unpack_int4_rows(const Tensor& packed, std::int64_t out, std::int64_t in) {
  if (packed.shape() != Shape{out / 2, in} || out % 2 != 0 || (packed.dtype() != DType::U8 && packed.dtype() != DType::I8)) {
    fail("INT4 weight is {} {}, expected u8 [{}, {}]", dtype_name(packed.dtype()), shape_string(packed.shape()), out / 2, in);
  }
  std::vector<std::int8_t> codes(static_cast<std::size_t>(out * in));
  const auto* b = reinterpret_cast<const std::uint8_t*>(packed.bytes().data());
  for (std::int64_t r2 = 0; r2 < out / 2; ++r2) {
    for (std::int64_t c = 0; c < in; ++c) {
      const int lo = b[r2 * in + c] & 0xF, hi = b[r2 * in + c] >> 4;
      codes[static_cast<std::size_t>(2 * r2 * in + c)] = static_cast<std::int8_t>(lo >= 8 ? lo - 16 : lo);
      codes[static_cast<std::size_t>((2 * r2 + 1) * in + c)] = static_cast<std::int8_t>(hi >= 8 ? hi - 16 : hi);
    }
  }
  return codes;
}

Tensor pack_int4_rows(const std::vector<std::int8_t>& codes, std::int64_t out, std::int64_t in) {
  if (out % 2 != 0) fail("INT4 rows are stored in pairs; {} rows", out);
  Tensor t = Tensor::zeros(DType::U8, {out / 2, in});
  auto* b = t.mutable_data<std::uint8_t>();
  for (std::int64_t r2 = 0; r2 < out / 2; ++r2) {
    for (std::int64_t c = 0; c < in; ++c) {
      const auto lo = static_cast<std::uint8_t>(codes[static_cast<std::size_t>(2 * r2 * in + c)] & 0xF);
      const auto hi = static_cast<std::uint8_t>(codes[static_cast<std::size_t>((2 * r2 + 1) * in + c)] & 0xF);
      b[r2 * in + c] = static_cast<std::uint8_t>(lo | (hi << 4));
    }
  }
  return t;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : 0.0;
}

}  // namespace mopt::quant
