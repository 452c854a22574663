#include "quant/fake_quant.h"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "core/convert.h"
#include "core/error.h"
#include "core/cpu_features.h"
#include "core/thread_pool.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "quant/fake_quant_simd.h"

namespace mopt::quant {

namespace {

// Elements from which the row-wise roundings are worth the threads' synchronization.
constexpr std::int64_t kParallelElements = std::int64_t{1} << 15;

bool simd_rounding() {
  static const bool yes = avx2_kernels_available();
  return yes;
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

[[noreturn]] void fail_non_finite(const float* x, std::int64_t i, std::int64_t cols) {
  fail("non-finite value {} at row {}, column {}", x[i], i / cols, i % cols);
}

float block_abs_max(const float* x, std::int64_t n) {
  float m = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

// The first value of largest magnitude, with its sign (Q4_0's "max"); 0 for a zero block.
float block_extreme(const float* x, std::int64_t n) {
  float m = 0.0f, v = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > m) {
      m = std::fabs(x[i]);
      v = x[i];
    }
  }
  return v;
}

float convert_element(Element element, float magnitude) {
  switch (element) {
    case Element::e4m3: return e4m3_to_f32(f32_to_e4m3(magnitude));
    case Element::e2m1: return round_e2m1_magnitude(magnitude);
    case Element::int8: return std::clamp(std::nearbyint(magnitude), -127.0f, 127.0f);  // MXINT8 is symmetric
    case Element::int4: return std::clamp(std::nearbyint(magnitude), -7.0f, 7.0f);
  }
  return magnitude;
}

// Calls f(slot, begin, length) for every static block of a [rows, cols] tensor: `slot` indexes the
// amax as compute_amax lays it out (2-D tiles with block_rows), `begin` the block's first element.
template <typename F>
void for_each_static_block(const QuantizerSpec& spec, std::int64_t rows, std::int64_t cols, F&& f) {
  const std::int64_t nb = ceil_div(cols, spec.block);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t b = 0; b < nb; ++b) {
      const std::int64_t c0 = b * spec.block;
      f(spec.block_rows > 0 ? (r / spec.block_rows) * nb + b : r * nb + b, r * cols + c0, std::min(spec.block, cols - c0));
    }
  }
}

// The per-group constants are computed once; each element then costs a multiply, a rounding and a multiply.
void fake_quantize_group(const QuantizerSpec& spec, const float* x, float* y, std::int64_t n, float amax) {
  switch (spec.element) {
    case Element::int4:
      if (spec.grid == IntGrid::q4_0) {
        for (std::int64_t i = 0; i < n; ++i) y[i] = fake_quant_q4_0(x[i], amax);
        break;
      }
      [[fallthrough]];
    case Element::int8: {
      const float bound = spec.element == Element::int8 ? 127.0f : 7.0f;
      if (!(amax > kTinyAmax)) {
        std::fill(y, y + n, 0.0f);
        break;
      }
      const float scale = bound / amax;
      for (std::int64_t i = 0; i < n; ++i) y[i] = std::clamp(std::nearbyint(x[i] * scale), -bound - 1.0f, bound) / scale;
      break;
    }
    case Element::e4m3: {
      if (!(amax > kTinyAmax)) amax = 1.0f;
      const float scale = (1.0f / amax) * kE4M3Max;
      const float inv_scale = 1.0f / scale;
      // In pieces through the bulk (vectorized) conversions: the same roundings as the scalar ones.
      constexpr std::int64_t kPiece = 256;
      float scaled[kPiece];
      std::uint8_t codes[kPiece];
      for (std::int64_t i0 = 0; i0 < n; i0 += kPiece) {
        const std::int64_t len = std::min(kPiece, n - i0);
        for (std::int64_t i = 0; i < len; ++i) scaled[i] = std::clamp(x[i0 + i] * scale, -kE4M3Max, kE4M3Max);
        convert_f32_to_e4m3(scaled, codes, static_cast<std::size_t>(len));
        convert_e4m3_to_f32(codes, scaled, static_cast<std::size_t>(len));
        for (std::int64_t i = 0; i < len; ++i) y[i0 + i] = scaled[i] * inv_scale;
      }
      break;
    }
    case Element::e2m1:
      fail("E2M1 needs NVFP4 or MX scaling");
  }
}

}  // namespace

float element_max_bound(Element element) {
  switch (element) {
    case Element::int8: return 127.0f;
    case Element::int4: return 7.0f;
    case Element::e4m3: return kE4M3Max;
    case Element::e2m1: return kE2M1Max;
  }
  return 0.0f;
}

const char* element_name(Element element) {
  switch (element) {
    case Element::int8: return "int8";
    case Element::int4: return "int4";
    case Element::e4m3: return "fp8";
    case Element::e2m1: return "fp4";
  }
  return "?";
}

float QuantizerSpec::max_bound() const { return element_max_bound(element); }

std::string QuantizerSpec::describe() const {
  std::string s = element_name(element);
  switch (scaling) {
    case Scaling::per_tensor: s += " per-tensor"; break;
    case Scaling::per_row: s += " per-channel"; break;
    case Scaling::per_token: s += " per-token"; break;
    case Scaling::block:
      s += block_rows > 0 ? fmt::format(" block {}x{}", block_rows, block) : fmt::format(" block {}", block);
      break;
    case Scaling::nvfp4: s = fmt::format("nvfp4 block {}", block); break;
    case Scaling::mx: s = fmt::format("mx{} block {}", element_name(element), block); break;
  }
  if (fp8_second_stage) s += " + fp8 per-tensor";
  if (grid == IntGrid::q4_0) s += " (q4_0 grid)";
  if (grid == IntGrid::ggml) {
    const auto info = io::ggml_type_info(static_cast<std::uint32_t>(ggml_type));
    s = fmt::format("{} in ggml {} blocks", element_name(element), info ? std::string(info->name) : "?");
  }
  return s;
}

std::int64_t amax_count(const QuantizerSpec& spec, std::int64_t rows, std::int64_t cols) {
  switch (spec.scaling) {
    case Scaling::per_tensor:
    case Scaling::nvfp4: return 1;
    case Scaling::per_row: return rows;
    case Scaling::block:
      if (spec.block_rows > 0) return ceil_div(rows, spec.block_rows) * ceil_div(cols, spec.block);
      return rows * ceil_div(cols, spec.block);
    case Scaling::per_token:
    case Scaling::mx: return 0;
  }
  return 0;
}

float q4_0_step(float extreme) {
  const float d = f16_to_f32(f32_to_f16(extreme / -8.0f));
  if (!std::isfinite(d)) fail("a Q4_0 block whose largest value is {} has a scale beyond f16's range", extreme);
  return d;
}

float fake_quant_q4_0(float x, float extreme) {
  const float d = q4_0_step(extreme);
  if (d == 0.0f) return 0.0f;
  return std::clamp(std::nearbyint(x / d), -8.0f, 7.0f) * d;
}

float fake_quant_integer(const QuantizerSpec& spec, float x, float amax) {
  if (spec.grid == IntGrid::ggml) fail("{}: a ggml block's scales come from its values, not from an amax", spec.describe());
  if (spec.element == Element::int4 && spec.grid == IntGrid::q4_0) return fake_quant_q4_0(x, amax);
  return fake_quant_int(x, amax, spec.element == Element::int4 ? 4 : 8);
}

float fake_quant_int(float x, float amax, int bits) {
  const float bound = static_cast<float>((1 << (bits - 1)) - 1);
  if (!(amax > kTinyAmax)) return 0.0f;
  const float scale = bound / amax;
  const float q = std::clamp(std::nearbyint(x * scale), -bound - 1.0f, bound);
  return q / scale;
}

float fake_quant_e4m3(float x, float amax) {
  if (!(amax > kTinyAmax)) amax = 1.0f;
  // As the reference's eager path computes `448.0 / amax` and `1 / scale` on tensors:
  // PyTorch evaluates scalar / tensor as reciprocal(tensor) * scalar.
  const float scale = (1.0f / amax) * kE4M3Max;
  const float inv_scale = 1.0f / scale;
  const float scaled = std::clamp(x * scale, -kE4M3Max, kE4M3Max);
  return e4m3_to_f32(f32_to_e4m3(scaled)) * inv_scale;
}

float nvfp4_block_scale(float block_amax, float global_amax) {
  const float global_scale = global_amax / (6.0f * kE4M3Max);
  const float safe_global = global_scale > 0.0f ? global_scale : 1e-12f;
  const float ratio = std::min(block_amax / (6.0f * safe_global), kE4M3Max);
  float scale = e4m3_to_f32(f32_to_e4m3(ratio)) * global_scale;
  if (!(scale >= 1e-5f)) scale = 1.0f;
  return scale;
}

void nvfp4_block_scales(const float* block_amax, std::int64_t n, float global_amax, float* out) {
  const float global_scale = global_amax / (6.0f * kE4M3Max);
  const float safe_global = global_scale > 0.0f ? global_scale : 1e-12f;
  // nvfp4_block_scale's steps, the E4M3 round trip through the bulk conversions (the same roundings).
  constexpr std::int64_t kPiece = 256;
  float ratio[kPiece];
  std::uint8_t codes[kPiece];
  for (std::int64_t i0 = 0; i0 < n; i0 += kPiece) {
    const std::int64_t len = std::min(kPiece, n - i0);
    for (std::int64_t i = 0; i < len; ++i) ratio[i] = std::min(block_amax[i0 + i] / (6.0f * safe_global), kE4M3Max);
    convert_f32_to_e4m3(ratio, codes, static_cast<std::size_t>(len));
    convert_e4m3_to_f32(codes, ratio, static_cast<std::size_t>(len));
    for (std::int64_t i = 0; i < len; ++i) {
      const float scale = ratio[i] * global_scale;
      out[i0 + i] = scale >= 1e-5f ? scale : 1.0f;
    }
  }
}

int mx_exponent(float block_amax, Element element) {
  const float ratio = block_amax / element_max_bound(element);
  if (!(ratio > 0.0f) || !std::isfinite(ratio)) return 0;
  int e = 0;
  const float m = std::frexp(ratio, &e);  // ratio = m * 2^e, m in [0.5, 1)
  // ceil(log2(ratio)): e when ratio is not a power of two, e - 1 when it is.
  return m == 0.5f ? e - 1 : e;
}

void row_amax(const float* x, std::int64_t rows, std::int64_t cols, float* out) {
  for (std::int64_t r = 0; r < rows; ++r) out[r] = block_abs_max(x + r * cols, cols);
}

std::vector<float> compute_amax(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) fail_non_finite(x, i, cols);
  }
  std::vector<float> amax(static_cast<std::size_t>(amax_count(spec, rows, cols)), 0.0f);
  switch (spec.scaling) {
    case Scaling::per_tensor:
    case Scaling::nvfp4: amax[0] = block_abs_max(x, n); break;
    case Scaling::per_row: row_amax(x, rows, cols, amax.data()); break;
    case Scaling::block: {
      const std::int64_t nb = ceil_div(cols, spec.block);
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t b = 0; b < nb; ++b) {
          const std::int64_t c0 = b * spec.block, len = std::min(spec.block, cols - c0);
          const std::int64_t slot = spec.block_rows > 0 ? (r / spec.block_rows) * nb + b : r * nb + b;
          if (spec.grid == IntGrid::q4_0) {  // one block per slot: its signed extreme
            amax[static_cast<std::size_t>(slot)] = block_extreme(x + r * cols + c0, len);
            continue;
          }
          const float m = block_abs_max(x + r * cols + c0, len);
          amax[static_cast<std::size_t>(slot)] = std::max(amax[static_cast<std::size_t>(slot)], m);
        }
      }
      break;
    }
    case Scaling::per_token:
    case Scaling::mx: break;
  }
  return amax;
}

void fake_quantize(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols,
                   std::span<const float> amax, float* y) {
  const auto need = static_cast<std::size_t>(amax_count(spec, rows, cols));
  if (amax.size() != need) fail("{} quantizer of a [{}, {}] tensor needs {} amax values, got {}", spec.describe(), rows, cols, need, amax.size());
  if (spec.grid == IntGrid::ggml) {
    fake_quantize_ggml(spec, x, rows, cols, {}, y);
    return;
  }
  switch (spec.scaling) {
    case Scaling::per_tensor: fake_quantize_group(spec, x, y, rows * cols, amax[0]); break;
    case Scaling::per_row:
      for (std::int64_t r = 0; r < rows; ++r) fake_quantize_group(spec, x + r * cols, y + r * cols, cols, amax[static_cast<std::size_t>(r)]);
      break;
    case Scaling::per_token:
      for (std::int64_t r = 0; r < rows; ++r) {
        const float m = block_abs_max(x + r * cols, cols);
        fake_quantize_group(spec, x + r * cols, y + r * cols, cols, m);
      }
      break;
    case Scaling::block:
      for_each_static_block(spec, rows, cols, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
        fake_quantize_group(spec, x + begin, y + begin, n, amax[static_cast<std::size_t>(slot)]);
      });
      break;
    case Scaling::nvfp4: {
      const float global_amax = amax[0];
      // Rows are independent (the global amax is given): an activation of many rows is rounded by all threads.
      const bool simd = spec.block == 16 && simd_rounding();
      parallel_each(rows, 1, rows * cols >= kParallelElements, [&](std::int64_t r) {
        std::int64_t c0 = 0;
        if (simd && cols >= 16) {
          // The whole blocks of 16 vectorized, the same values as the loop below.
          const std::int64_t blocks = cols / 16;
          thread_local std::vector<float> block_scales;
          block_scales.resize(static_cast<std::size_t>(blocks));
          avx2::block16_abs_max(x + r * cols, blocks, block_scales.data());
          nvfp4_block_scales(block_scales.data(), blocks, global_amax, block_scales.data());
          avx2::round_e2m1_blocks16(x + r * cols, block_scales.data(), blocks, y + r * cols);
          c0 = blocks * 16;
        }
        for (; c0 < cols; c0 += spec.block) {
          const std::int64_t len = std::min(spec.block, cols - c0);
          const float* xb = x + r * cols + c0;
          float* yb = y + r * cols + c0;
          const float s = nvfp4_block_scale(block_abs_max(xb, len), global_amax);
          for (std::int64_t i = 0; i < len; ++i) yb[i] = with_sign_of(xb[i], round_e2m1_magnitude(std::fabs(xb[i]) / s) * s);
        }
      });
      break;
    }
    case Scaling::mx: {
      parallel_each(rows, 1, rows * cols >= kParallelElements, [&](std::int64_t r) {
        for (std::int64_t c0 = 0; c0 < cols; c0 += spec.block) {
          const std::int64_t len = std::min(spec.block, cols - c0);
          const float* xb = x + r * cols + c0;
          float* yb = y + r * cols + c0;
          const float bmax = block_abs_max(xb, len);
          const int e = mx_exponent(bmax, spec.element);
          const float scale = std::ldexp(1.0f, -e), unscale = std::ldexp(1.0f, e);
          for (std::int64_t i = 0; i < len; ++i) {
            const float q = convert_element(spec.element, std::fabs(xb[i]) * scale) * unscale;
            yb[i] = xb[i] >= 0.0f ? q : -q;
          }
        }
      });
      break;
    }
  }
  if (spec.fp8_second_stage) fail("a two-stage quantizer is applied with fake_quantize_weight");
}

void fake_quantize_ggml(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols, std::span<const float> importance,
                        float* y) {
  if (spec.grid != IntGrid::ggml) fail("{}: not a quantizer of ggml blocks", spec.describe());
  if (!importance.empty() && static_cast<std::int64_t>(importance.size()) != cols) {
    fail("{}: {} importance values for {} columns", spec.describe(), importance.size(), cols);
  }
  // llama.cpp's quantizer on each row, and its dequantization.
  parallel_each(rows, 1, rows * cols >= kParallelElements, [&](std::int64_t r) {
    const std::vector<std::byte> blocks = io::ggml_quantize(spec.ggml_type, x + r * cols, static_cast<std::uint64_t>(cols), "weight", importance);
    io::ggml_dequantize(spec.ggml_type, blocks, y + r * cols, static_cast<std::uint64_t>(cols));
  });
}

void zero_clipped_gradient(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols,
                           std::span<const float> amax, float* grad) {
  if (spec.grid == IntGrid::ggml) fail("{}: no clipping rule for ggml blocks (training runs on the reference's grids)", spec.describe());
  const auto need = static_cast<std::size_t>(amax_count(spec, rows, cols));
  if (amax.size() != need) fail("{} quantizer of a [{}, {}] tensor needs {} amax values, got {}", spec.describe(), rows, cols, need, amax.size());
  const auto clip_group = [&](std::int64_t begin, std::int64_t n, float limit) {
    for (std::int64_t i = begin; i < begin + n; ++i) {
      if (!(std::fabs(x[i]) <= limit)) grad[i] = 0.0f;
    }
  };
  switch (spec.scaling) {
    case Scaling::per_tensor:
    case Scaling::nvfp4: clip_group(0, rows * cols, amax[0]); break;
    case Scaling::per_row:
      for (std::int64_t r = 0; r < rows; ++r) clip_group(r * cols, cols, amax[static_cast<std::size_t>(r)]);
      break;
    case Scaling::block:
      for_each_static_block(spec, rows, cols, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
        clip_group(begin, n, amax[static_cast<std::size_t>(slot)]);
      });
      break;
    case Scaling::per_token:
    case Scaling::mx: break;
  }
}

namespace {
bool is_nvfp4(const QuantizerSpec& spec) { return spec.element == Element::e2m1 && spec.scaling == Scaling::nvfp4; }

// The reference's scaled_e4m3(s, amax = global_amax / 6) (its eager FP8 fake quantization): the NVFP4
// block scale s rounded to E4M3 with 448 at the global scale, in its f32 steps.
float nvfp4_fp8_rounded_scale(float s, float global_amax) {
  const float per_tensor = global_amax / 6.0f;
  const float safe = per_tensor <= kTinyAmax ? 1.0f : per_tensor;
  const float to_fp8 = kE4M3Max / safe;
  return e4m3_to_f32(f32_to_e4m3(std::clamp(s * to_fp8, -kE4M3Max, kE4M3Max))) * (1.0f / to_fp8);
}
}  // namespace

bool supports_learned_scales(const QuantizerSpec& spec) {
  const bool integer_blocks = spec.grid != IntGrid::ggml && (spec.element == Element::int4 || spec.element == Element::int8) &&
                              spec.scaling == Scaling::block && spec.block_rows == 0 && !spec.fp8_second_stage;
  return integer_blocks || is_nvfp4(spec);
}

float nvfp4_lsq_scale(float amax, float global_amax, bool* passes_gradient) {
  // The reference's StaticBlockScaleQuantizer._block_scale_from_amax, step by step in f32.
  const float per_tensor = global_amax / 6.0f;
  const float floor = 0.001953125f * per_tensor;  // 2^-9, E4M3's smallest subnormal, times the global scale
  const float raw = amax / 6.0f;
  const float s = raw <= floor ? floor : raw;
  if (passes_gradient != nullptr) *passes_gradient = raw > floor && std::fabs(s) <= per_tensor;
  return nvfp4_fp8_rounded_scale(s, global_amax);
}

namespace {

// Calls f(slot, begin, length) for every block whose amax LSQ learns, after checking `amax`'s length.
template <typename F>
void for_each_block(const QuantizerSpec& spec, std::int64_t rows, std::int64_t cols, std::span<const float> amax, F&& f) {
  if (!supports_learned_scales(spec)) fail("learned scales are for integer weights in static blocks and NVFP4, not {}", spec.describe());
  const std::int64_t need = rows * ceil_div(cols, spec.block);
  if (static_cast<std::int64_t>(amax.size()) != need) fail("{} of a [{}, {}] weight needs {} amax values, got {}", spec.describe(), rows, cols, need, amax.size());
  for_each_static_block(spec, rows, cols, f);
}

float lsq_step(float amax, float bound) {
  const float s = amax / bound;
  return s <= 1e-8f ? 1e-8f : s;
}

// The reference's MSE search of integer block amax (see lsq_initial_amax).
std::vector<float> mse_weight_amax(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax) {
  // torch.linspace(0.25, 4.0, 39) in f32: the first half counted up from the start, the rest down from the end.
  constexpr int kSteps = 39;
  const float start = 0.25f, end = 4.0f, step = (end - start) / static_cast<float>(kSteps - 1);
  float candidates[kSteps];
  for (int i = 0; i < kSteps; ++i) {
    candidates[i] = i < kSteps / 2 ? start + step * static_cast<float>(i) : end - step * static_cast<float>(kSteps - 1 - i);
  }
  std::vector<float> out(amax.begin(), amax.end());
  std::vector<float> y;
  for_each_block(spec, rows, cols, amax, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
    y.resize(static_cast<std::size_t>(n));
    double best = -1;
    for (const float c : candidates) {
      const float a = amax[static_cast<std::size_t>(slot)] * c;
      fake_quantize_group(spec, w + begin, y.data(), n, a);
      double err = 0;
      for (std::int64_t i = 0; i < n; ++i) {
        const double d = static_cast<double>(w[begin + i]) - y[static_cast<std::size_t>(i)];
        err += d * d;
      }
      if (best < 0 || err < best) {
        best = err;
        out[static_cast<std::size_t>(slot)] = a;
      }
    }
  });
  return out;
}

// The reference's fp8_scale_sweep for static NVFP4 weights (see lsq_initial_amax). Every block tries the
// same 126 amax values, so each candidate's block scale is computed once.
std::vector<float> nvfp4_sweep_amax(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, float global_amax) {
  constexpr int kCandidates = 126;  // E4M3 codes 0x01 .. 0x7E: the positive finite values, ascending
  float amax[kCandidates], scale[kCandidates];
  for (int i = 0; i < kCandidates; ++i) {
    amax[i] = global_amax * (e4m3_to_f32(static_cast<std::uint8_t>(i + 1)) / kE4M3Max);
    // Static NVFP4 at a block amax a (the reference's compute_fp4_scales): a / 6, FP8-rounded, no floor.
    scale[i] = nvfp4_fp8_rounded_scale(amax[i] / 6.0f, global_amax);
  }
  const std::int64_t per_row = ceil_div(cols, spec.block);
  std::vector<float> out(static_cast<std::size_t>(rows * per_row));
  parallel_each(rows, 1, rows * cols * kCandidates >= kParallelElements, [&](std::int64_t r) {
    for (std::int64_t b = 0; b < per_row; ++b) {
      const float* x = w + r * cols + b * spec.block;
      const std::int64_t n = std::min(spec.block, cols - b * spec.block);
      double best = -1;
      int best_i = 0;
      for (int i = 0; i < kCandidates; ++i) {
        const float s = scale[i];
        double err = 0;
        for (std::int64_t k = 0; k < n; ++k) {
          // A zero scale quantizes the block to zero (the reference's nvfp4_scalar_quant).
          const float q = s == 0.0f ? 0.0f : round_e2m1_magnitude(std::fabs(x[k]) / s) * s;
          const float d = std::fabs(x[k]) - q;
          err += static_cast<double>(d * d);
        }
        if (best < 0 || err < best) {
          best = err;
          best_i = i;
        }
      }
      out[static_cast<std::size_t>(r * per_row + b)] = amax[best_i];
    }
  });
  return out;
}

}  // namespace

void lsq_forward(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax,
                 float global_amax, float* wq) {
  if (is_nvfp4(spec)) {
    for_each_block(spec, rows, cols, amax, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
      const float s = nvfp4_lsq_scale(amax[static_cast<std::size_t>(slot)], global_amax);
      for (std::int64_t i = begin; i < begin + n; ++i) {
        // A zero scale (an all-zero weight's global amax of 0) leaves the block zero.
        wq[i] = s == 0.0f ? 0.0f : with_sign_of(w[i], round_e2m1_magnitude(std::fabs(w[i] / s))) * s;
      }
    });
    return;
  }
  const float bound = spec.max_bound();
  for_each_block(spec, rows, cols, amax, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
    const float s = lsq_step(amax[static_cast<std::size_t>(slot)], bound);
    for (std::int64_t i = begin; i < begin + n; ++i) wq[i] = std::clamp(std::nearbyint(w[i] / s), -bound - 1.0f, bound) * s;
  });
}

void lsq_backward(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax,
                  float global_amax, const float* g, float* dw, float* damax) {
  if (is_nvfp4(spec)) {
    for_each_block(spec, rows, cols, amax, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
      bool passes = false;
      const float s = nvfp4_lsq_scale(amax[static_cast<std::size_t>(slot)], global_amax, &passes);
      if (s == 0.0f) return;
      double d = 0;
      for (std::int64_t i = begin; i < begin + n; ++i) {
        const float v = w[i] / s;
        const float q = with_sign_of(w[i], round_e2m1_magnitude(std::fabs(v)));
        const bool in_range = std::fabs(v) <= 6.0f;
        if (in_range) dw[i] += g[i];
        d += static_cast<double>(g[i]) * (q - (in_range ? v : 0.0f));
      }
      if (passes) damax[slot] += static_cast<float>(d / 6.0);
    });
    return;
  }
  const float bound = spec.max_bound();
  for_each_block(spec, rows, cols, amax, [&](std::int64_t slot, std::int64_t begin, std::int64_t n) {
    const float s = lsq_step(amax[static_cast<std::size_t>(slot)], bound);
    double d = 0;
    for (std::int64_t i = begin; i < begin + n; ++i) {
      const float v = w[i] / s;
      const float q = std::clamp(std::nearbyint(v), -bound - 1.0f, bound);
      const bool in_range = v >= -bound - 1.0f && v <= bound;
      if (in_range) dw[i] += g[i];
      d += static_cast<double>(g[i]) * (q - (in_range ? v : 0.0f));
    }
    damax[slot] += static_cast<float>(d / bound);
  });
}

std::vector<float> lsq_initial_amax(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax) {
  if (is_nvfp4(spec)) {
    if (amax.size() != 1) fail("{} needs its one global amax, got {} values", spec.describe(), amax.size());
    return nvfp4_sweep_amax(spec, w, rows, cols, amax[0]);
  }
  return mse_weight_amax(spec, w, rows, cols, amax);
}

}  // namespace mopt::quant
