#include "kernels/qlinear.h"

#include <algorithm>
#include <cmath>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/linear.h"
#include "kernels/qlinear_simd.h"

namespace mopt::kernels {

namespace {


std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

bool is_nibble_type(QuantizedWeightType t) {
  return t == QuantizedWeightType::int4 || t == QuantizedWeightType::int4_fp8_table || t == QuantizedWeightType::e2m1;
}

// The source's codes in their natural layout: its own vector, else the stored tensor's bytes.
std::span<const std::uint8_t> codes_of(const QuantizedWeightSource& s) {
  if (!s.codes.empty() || s.stored_codes.nbytes() == 0) return s.codes;
  return {reinterpret_cast<const std::uint8_t*>(s.stored_codes.bytes().data()), s.stored_codes.nbytes()};
}

// Code of element (r, c) in the source's natural layout.
std::uint8_t natural_code(const QuantizedWeightSource& s, std::span<const std::uint8_t> codes, std::int64_t r, std::int64_t c) {
  if (is_nibble_type(s.type)) {
    const std::uint8_t b = codes[static_cast<std::size_t>(r * ceil_div(s.in, 2) + c / 2)];
    return static_cast<std::uint8_t>(c % 2 == 0 ? b & 0x0F : b >> 4);
  }
  return codes[static_cast<std::size_t>(r * s.in + c)];
}

// The value of code `code` at (r, c); int4 codes are two's complement nibbles.
float code_value(const QuantizedWeightSource& s, std::int64_t nb, std::int64_t r, std::int64_t c, std::uint8_t code) {
  const auto b = static_cast<std::size_t>(r * nb + c / s.block);
  switch (s.type) {
    case QuantizedWeightType::int4: return int4_to_f32(code) * s.scales[b];
    case QuantizedWeightType::int4_fp8_table: return e4m3_to_f32(s.block_tables[b * 16 + (code ^ 8u)]) * s.table_scale;
    case QuantizedWeightType::int8: return static_cast<float>(static_cast<std::int8_t>(code)) * s.scales[b];
    case QuantizedWeightType::e4m3: return e4m3_to_f32(code) * s.scales[b];
    case QuantizedWeightType::e2m1: return e2m1_to_f32(code) * s.scale_code_values[s.scale_codes[b]];
  }
  return 0.0f;
}

// Why no vectorized kernel runs this weight (empty when one does): first what no AVX2 kernel holds (on
// any CPU), then what this CPU lacks.
std::string plain_loop_reason(const QuantizedWeightSource& s, std::span<const std::uint8_t> codes) {
  const auto not_whole_chunks = [&] {
    return fmt::format("{} inputs is not a multiple of 64 (the AVX2 layout packs 64 inputs into 32 bytes)", s.in);
  };
  switch (s.type) {
    case QuantizedWeightType::int4:
    case QuantizedWeightType::int4_fp8_table:
      // A 64-input chunk is two halves of 32: a group that is a multiple of 32 never splits a half.
      if (s.block % 32 != 0) return fmt::format("no AVX2 kernel for groups of {} (it takes multiples of 32)", s.block);
      if (s.in % 64 != 0) return not_whole_chunks();
      return avx2_kernels_unavailable();
    case QuantizedWeightType::e2m1:
      if (s.block != 16 && s.block != 32) return fmt::format("no AVX2 kernel for FP4 blocks of {} (it takes 16 and 32)", s.block);
      if (s.in % 64 != 0) return not_whole_chunks();
      return avx2_kernels_unavailable();
    case QuantizedWeightType::int8:
      if (s.int8_activations) {
        if (vnni_gemm_available()) return {};  // VPDPBUSD takes every code
        // The AVX2 product needs weight codes in -127..127 (the sign trick).
        if (std::any_of(codes.begin(), codes.end(), [](std::uint8_t c) { return c == 0x80; })) {
          return "a weight code is -128 (the AVX2 int8 product takes -127..127)";
        }
        return avx2_kernels_unavailable();
      }
      [[fallthrough]];
    case QuantizedWeightType::e4m3:
      if (s.in % 16 != 0) return fmt::format("{} inputs is not a multiple of 16", s.in);
      if (s.block % 16 != 0 && s.block < s.in) return fmt::format("no AVX2 kernel for blocks of {} (it takes multiples of 16)", s.block);
      return avx2_kernels_unavailable();
  }
  return "unknown weight type";
}

// One block at a time, as threads become free: for the compute-bound prefill GEMM, where a core
// slowed by anything else would otherwise keep the other waiting at the end of every matmul.
template <class F>
void parallel_rows_dynamic(std::int64_t n, std::int64_t block, F&& f) {
  parallel_for(ceil_div(n, block), [&](std::int64_t b) { f(b * block, std::min(n, (b + 1) * block)); });
}

}  // namespace

void quantize_int8_per64(const float* x, std::int64_t n, std::int8_t* codes, float* steps) {
  for (std::int64_t c = 0; c < n / 64; ++c) {
    const float* xc = x + c * 64;
    float amax = 0.0f;
    for (int t = 0; t < 64; ++t) amax = std::max(amax, std::fabs(xc[t]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (int t = 0; t < 64; ++t) codes[c * 64 + t] = static_cast<std::int8_t>(std::clamp(std::nearbyint(xc[t] * inv), -127.0f, 127.0f));
    steps[c] = amax / 127.0f;
  }
}

float int8_input_scale(float amax) { return amax > kTinyAmax ? 127.0f / amax : 1.0f; }

bool int4_decode_rounds_input(const QuantizedWeightSource& s) { return s.type == QuantizedWeightType::int4 && s.block % 32 == 0 && s.in % 64 == 0; }

namespace {

// Rows [r0, r1) of the INT4 decode on inputs already rounded (ref::int4_decode's arithmetic), the
// weight read from its natural layout.
void int4_decode_rows(const QuantizedWeightSource& s, std::span<const std::uint8_t> codes, const std::int8_t* xq, const float* steps, std::int64_t m,
                      std::int64_t r0, std::int64_t r1, float* y, std::int64_t ldy) {
  const std::int64_t k = s.in, chunks = k / 64, nb = ceil_div(k, s.block);
  for (std::int64_t r = r0; r < r1; ++r) {
    for (std::int64_t i = 0; i < m; ++i) {
      double acc = 0.0;
      for (std::int64_t h = 0; h < k / 32; ++h) {
        std::int32_t d = 0;
        for (std::int64_t t = h * 32; t < h * 32 + 32; ++t) {
          d += static_cast<std::int32_t>(int4_to_f32(natural_code(s, codes, r, t))) * xq[i * k + t];
        }
        acc += static_cast<double>(s.scales[static_cast<std::size_t>(r * nb + h * 32 / s.block)]) * steps[i * chunks + h / 2] * d;
      }
      y[i * ldy + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace

void quantize_int8_activations(const float* x, std::int64_t n, float amax, std::int8_t* codes) {
  if (!(amax > kTinyAmax)) {
    std::fill(codes, codes + n, std::int8_t{0});
    return;
  }
  const float scale = 127.0f / amax;
  if (avx2_kernels_available()) {
    avx2::quantize_int8(x, n, scale, codes);
    return;
  }
  for (std::int64_t i = 0; i < n; ++i) codes[i] = static_cast<std::int8_t>(std::clamp(std::nearbyint(x[i] * scale), -128.0f, 127.0f));
}

PackedLinear::PackedLinear(QuantizedWeightSource source, const std::string& label) : src_(std::move(source)) {
  auto& s = src_;
  if (s.out <= 0 || s.in <= 0 || s.block <= 0) fail("{}: quantized weight [{}, {}] with block {}", label, s.out, s.in, s.block);
  blocks_per_row_ = ceil_div(s.in, s.block);
  const auto scale_count = static_cast<std::size_t>(s.out * blocks_per_row_);
  const auto code_bytes = static_cast<std::size_t>(is_nibble_type(s.type) ? s.out * ceil_div(s.in, 2) : s.out * s.in);
  // Layouts the kernels rebuild take a copy; the rest read the stored codes where they are.
  const bool keeps_natural_layout = (s.type == QuantizedWeightType::int8 && !s.int8_activations) || s.type == QuantizedWeightType::e4m3;
  if (s.codes.empty() && !keeps_natural_layout) {
    const auto stored = codes_of(s);
    s.codes.assign(stored.begin(), stored.end());
    s.stored_codes = Tensor();
  }
  codes_ = codes_of(s);
  if (codes_.size() != code_bytes) fail("{}: {} code bytes for [{}, {}], expected {}", label, codes_.size(), s.out, s.in, code_bytes);
  switch (s.type) {
    case QuantizedWeightType::e2m1:
      if (s.scale_codes.size() != scale_count || s.scale_code_values.size() != 256) fail("{}: FP4 scales do not match the weight", label);
      break;
    case QuantizedWeightType::int4_fp8_table:
      if (s.block_tables.size() != scale_count * 16) fail("{}: {} table bytes, expected {}", label, s.block_tables.size(), scale_count * 16);
      if (!std::isfinite(s.table_scale)) fail("{}: table scale {}", label, s.table_scale);
      break;
    default:
      if (s.scales.size() != scale_count) fail("{}: {} scales, expected {}", label, s.scales.size(), scale_count);
  }
  for (const float v : s.scales) {
    if (!std::isfinite(v)) fail("{}: a weight scale is {}", label, v);
  }
  if (s.type == QuantizedWeightType::e4m3) {
    for (std::size_t i = 0; i < codes_.size(); ++i) {
      if ((codes_[i] & 0x7F) == 0x7F) fail("{}: the E4M3 weight code at row {} column {} is NaN", label, i / s.in, i % s.in);
    }
  }
  if (s.int8_activations && s.type != QuantizedWeightType::int8) fail("{}: int8 activations need int8 weights", label);
  if (s.int8_activations && !(std::isfinite(s.input_amax) && s.input_amax >= 0.0f)) fail("{}: input amax {}", label, s.input_amax);

  plain_reason_ = plain_loop_reason(s, codes_);
  vectorized_ = plain_reason_.empty();
  if (s.type == QuantizedWeightType::e2m1) {
    for (const float v : s.scale_code_values) half_code_values_.push_back(v * 0.5f);
  }
  if (vectorized_ && is_nibble_type(s.type)) {
    // Chunks of 64 inputs: byte j holds input j (low nibble) and j + 32 (high); int4 biased to 0..15.
    const std::int64_t row_bytes = s.in / 2;
    layout_.nibbles.assign(static_cast<std::size_t>(s.out * row_bytes), 0);
    const std::uint8_t bias = s.type == QuantizedWeightType::e2m1 ? 0 : 8;
    for (std::int64_t r = 0; r < s.out; ++r) {
      std::uint8_t* dst = layout_.nibbles.data() + r * row_bytes;
      for (std::int64_t c = 0; c < s.in; ++c) {
        const auto n = static_cast<std::uint8_t>(natural_code(s, codes_, r, c) ^ bias);
        const std::int64_t chunk = c / 64, j = c % 64;
        dst[chunk * 32 + j % 32] |= static_cast<std::uint8_t>(j < 32 ? n : n << 4);
      }
    }
    std::vector<std::uint8_t>().swap(s.codes);  // give the natural copy back (clear() keeps the capacity)
    codes_ = {};
  }
  if (s.int8_activations) {
    if (s.block < s.in) fail("{}: int8 w8a8 needs one scale per weight row", label);
    // y = sum(qx * qw) * w_scale / (127 / amax): the fake-quantized product, computed on integers.
    const float x_scale = int8_input_scale(s.input_amax);
    w8a8_factor_.resize(static_cast<std::size_t>(s.out));
    for (std::int64_t r = 0; r < s.out; ++r) w8a8_factor_[static_cast<std::size_t>(r)] = s.scales[static_cast<std::size_t>(r)] / x_scale;
    if (vnni_gemm_available()) {
      layout_.vnni = Int8Panels(reinterpret_cast<const std::int8_t*>(codes_.data()), s.in, s.out, s.in);
      std::vector<std::uint8_t>().swap(s.codes);
      codes_ = {};
    } else if (vectorized_) {
      layout_.k32 = ceil_div(s.in, 32) * 32;
      layout_.int8_rows.assign(static_cast<std::size_t>(s.out * layout_.k32), 0);
      for (std::int64_t r = 0; r < s.out; ++r) {
        std::copy_n(reinterpret_cast<const std::int8_t*>(codes_.data()) + r * s.in, s.in, layout_.int8_rows.data() + r * layout_.k32);
      }
      std::vector<std::uint8_t>().swap(s.codes);
      codes_ = {};
    }
  }
}

std::uint64_t PackedLinear::bytes() const {
  return codes_.size() + layout_.nibbles.size() + layout_.int8_rows.size() + static_cast<std::uint64_t>(layout_.vnni.bytes()) +
         src_.scales.size() * sizeof(float) +
         src_.scale_codes.size() + src_.block_tables.size();
}

std::string PackedLinear::describe() const {
  switch (src_.type) {
    case QuantizedWeightType::int4: return fmt::format("int4 g{}", src_.block);
    case QuantizedWeightType::int4_fp8_table: return fmt::format("int4 g{} via fp8", src_.block);
    case QuantizedWeightType::int8: return src_.int8_activations ? "int8 w8a8" : "int8 weight-only";
    case QuantizedWeightType::e4m3: return src_.block >= src_.in ? "fp8" : fmt::format("fp8 block {}", src_.block);
    case QuantizedWeightType::e2m1: return fmt::format("fp4 block {}", src_.block);
  }
  return "?";
}

void PackedLinear::dequantize_rows(std::int64_t row0, std::int64_t rows, float* out) const {
  const auto& s = src_;
  if (vectorized_ && !s.int8_activations) {
    const std::int64_t r1 = row0 + rows;
    switch (s.type) {
      case QuantizedWeightType::int4: return avx2::dequantize_int4(layout_.nibbles.data(), s.scales.data(), s.block, s.in, row0, r1, out);
      case QuantizedWeightType::int4_fp8_table:
        return avx2::dequantize_int4_fp8_table(layout_.nibbles.data(), s.block_tables.data(), s.table_scale, s.block, s.in, row0, r1, out);
      case QuantizedWeightType::e2m1:
        return avx2::dequantize_e2m1(layout_.nibbles.data(), s.scale_codes.data(), half_code_values_.data(), s.block, s.in, row0, r1, out);
      case QuantizedWeightType::int8:
        return avx2::dequantize_int8(reinterpret_cast<const std::int8_t*>(codes_.data()), s.scales.data(), std::min(s.block, s.in), s.in, row0, r1, out);
      case QuantizedWeightType::e4m3: return avx2::dequantize_e4m3(codes_.data(), s.scales.data(), std::min(s.block, s.in), s.in, row0, r1, out);
    }
  }
  for (std::int64_t r = row0; r < row0 + rows; ++r) {
    float* o = out + (r - row0) * s.in;
    if (!layout_.nibbles.empty()) {
      const std::uint8_t* src = layout_.nibbles.data() + r * (s.in / 2);
      const std::uint8_t unbias = s.type == QuantizedWeightType::e2m1 ? 0 : 8;
      for (std::int64_t c = 0; c < s.in; ++c) {
        const std::int64_t chunk = c / 64, j = c % 64;
        const std::uint8_t b = src[chunk * 32 + j % 32];
        o[c] = code_value(s, blocks_per_row_, r, c, static_cast<std::uint8_t>((j < 32 ? b & 0x0F : b >> 4) ^ unbias));
      }
    } else if (layout_.vnni.rows() > 0) {
      for (std::int64_t c = 0; c < s.in; ++c) o[c] = static_cast<float>(layout_.vnni.code(r, c)) * s.scales[static_cast<std::size_t>(r * blocks_per_row_ + c / s.block)];
    } else if (!layout_.int8_rows.empty()) {
      for (std::int64_t c = 0; c < s.in; ++c) {
        o[c] = static_cast<float>(layout_.int8_rows[static_cast<std::size_t>(r * layout_.k32 + c)]) * s.scales[static_cast<std::size_t>(r * blocks_per_row_ + c / s.block)];
      }
    } else {
      for (std::int64_t c = 0; c < s.in; ++c) o[c] = code_value(s, blocks_per_row_, r, c, natural_code(s, codes_, r, c));
    }
  }
}

namespace {

// Input rows up to which a vectorized weight of this type runs its GEMV in passes rather than f32 tiles
// for the f32 GEMM (batched decode): where the passes were faster in bench/qlinear_bench --rows on
// Sapphire Rapids (GFLOP/s, passes against tiles: int8 and FP8 at 8 rows 151-168 / 55, 16 rows
// 137-171 / 100-102, 32 rows 137-139 / 157-159; W4A8 8: 120 / 55, 16: 106 / 102, 32: 107 / 158; NVFP4
// 8: 66-71 / 45, 16: 64-69 / 83). INT4 rounds its input and has its own limit, int4_gemv_max_rows.
std::int64_t gemv_pass_rows(QuantizedWeightType type) {
  switch (type) {
    case QuantizedWeightType::int4: return kGemvMaxRows;  // int4_decode_rounds_input decides (int4_gemv_max_rows)
    case QuantizedWeightType::int8:
    case QuantizedWeightType::e4m3: return 16;
    case QuantizedWeightType::int4_fp8_table:
    case QuantizedWeightType::e2m1: return 8;
  }
  return kGemvMaxRows;
}

}  // namespace

bool PackedLinear::runs_gemv(std::int64_t m) const {
  if (src_.int8_activations) return false;
  return m <= kGemvMaxRows || (int4_decode_rounds_input(src_) && m <= int4_gemv_max_rows(src_.out, src_.in)) || (vectorized_ && m <= gemv_pass_rows(src_.type));
}

void PackedLinear::forward(const float* x, std::int64_t m, float* y, Precision precision) const {
  if (m <= 0) return;
  if (src_.int8_activations) return forward_w8a8(x, m, y);
  // INT4 batched decode too (the plain loop rounds as the GEMV does, so no result depends on the CPU).
  if (runs_gemv(m)) return forward_gemv(x, m, y);
  forward_tiles(x, m, y, precision);
}

void PackedLinear::forward_gemv(const float* x, std::int64_t m, float* y) const {
  const auto& s = src_;
  const std::int64_t k = s.in, n = s.out;
  if (!vectorized_ && int4_decode_rounds_input(s)) {
    // The AVX2 GEMV's arithmetic (its input rounded to int8 per 64), so that no result depends on the CPU.
    thread_local std::vector<std::int8_t> xq;
    thread_local std::vector<float> steps;
    xq.resize(static_cast<std::size_t>(m * k));
    steps.resize(static_cast<std::size_t>(m * (k / 64)));
    quantize_int8_per64(x, m * k, xq.data(), steps.data());
    // thread_local: the workers must see this thread's buffers, not their own (empty) ones.
    const std::int8_t* codes = xq.data();
    const float* step = steps.data();
    parallel_ranges(n, 16, [&](std::int64_t r0, std::int64_t r1) { int4_decode_rows(s, codes_, codes, step, m, r0, r1, y, n); });
    return;
  }
  if (!vectorized_) {
    parallel_ranges(n, 16, [&](std::int64_t r0, std::int64_t r1) {
      thread_local std::vector<float> row;
      if (row.size() < static_cast<std::size_t>(k)) row.resize(static_cast<std::size_t>(k));
      for (std::int64_t r = r0; r < r1; ++r) {
        dequantize_rows(r, 1, row.data());
        for (std::int64_t i = 0; i < m; ++i) {
          float acc = 0.0f;
          for (std::int64_t p = 0; p < k; ++p) acc += x[i * k + p] * row[static_cast<std::size_t>(p)];
          y[i * n + r] = acc;
        }
      }
    });
    return;
  }
  switch (s.type) {
    case QuantizedWeightType::int4: {
      // The input rounded to int8 per 64 values; offsets carry the -8 of the biased nibbles, summed per group
      // by halves of 32 (a group is a multiple of 32 inputs, so no half straddles two).
      thread_local std::vector<std::int8_t> codes;
      thread_local std::vector<float> steps, offsets;
      const std::int64_t chunks = k / 64, groups = blocks_per_row_;
      codes.resize(static_cast<std::size_t>(m * k));
      steps.resize(static_cast<std::size_t>(m * chunks));
      offsets.assign(static_cast<std::size_t>(m * groups), 0.0f);
      quantize_int8_per64(x, m * k, codes.data(), steps.data());
      for (std::int64_t i = 0; i < m; ++i) {
        for (std::int64_t c = 0; c < chunks; ++c) {
          const std::int8_t* qc = codes.data() + i * k + c * 64;
          std::int32_t sum[2] = {0, 0};
          for (int t = 0; t < 64; ++t) sum[t / 32] += qc[t];
          const float step = steps[static_cast<std::size_t>(i * chunks + c)];
          for (int h = 0; h < 2; ++h) offsets[static_cast<std::size_t>(i * groups + (c * 64 + h * 32) / s.block)] += step * static_cast<float>(sum[h]);
        }
      }
      const std::int8_t* all_codes = codes.data();  // thread_local: the workers must see this thread's buffers
      const float* all_steps = steps.data();
      const float* all_offsets = offsets.data();
      gemv_passes(n, m, [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
        const avx2::Int8Blocks xb{all_codes + i0 * k, all_steps + i0 * chunks, all_offsets + i0 * groups};
        avx2::gemv_int4(layout_.nibbles.data(), s.scales.data(), s.block, k, r0, r1, xb, rows, y + i0 * n, n);
      });
      return;
    }
    case QuantizedWeightType::int4_fp8_table:
      gemv_passes(n, m, [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
        avx2::gemv_int4_fp8_table(layout_.nibbles.data(), s.block_tables.data(), s.table_scale, s.block, k, r0, r1, x + i0 * k, rows, y + i0 * n, n);
      });
      return;
    case QuantizedWeightType::e2m1:
      gemv_passes(n, m, [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
        avx2::gemv_e2m1(layout_.nibbles.data(), s.scale_codes.data(), half_code_values_.data(), s.block, k, r0, r1, x + i0 * k, rows, y + i0 * n, n);
      });
      return;
    case QuantizedWeightType::int8:
      gemv_passes(n, m, [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
        avx2::gemv_int8(reinterpret_cast<const std::int8_t*>(codes_.data()), s.scales.data(), std::min(s.block, k), k, r0, r1, x + i0 * k, rows,
                        y + i0 * n, n);
      });
      return;
    case QuantizedWeightType::e4m3:
      gemv_passes(n, m, [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
        avx2::gemv_e4m3(codes_.data(), s.scales.data(), std::min(s.block, k), k, r0, r1, x + i0 * k, rows, y + i0 * n, n);
      });
      return;
  }
}

void PackedLinear::forward_tiles(const float* x, std::int64_t m, float* y, Precision precision) const {
  const std::int64_t k = src_.in, n = src_.out;
  if (precision == Precision::bf16 && bf16_kernels_chosen()) {
    // Each thread decodes a panel of 64 weight rows to f32 (exactly as below) and rounds it to bf16.
    gemm_bf16(x, m, k, [this](std::int64_t r0, std::int64_t rows, float* out) { dequantize_rows(r0, rows, out); }, n, y);
    return;
  }
  // Each task decodes a block of weight rows to f32 (what dequantize_rows defines) and multiplies x with it.
  gemm_f32_rows(x, m, k, [this](std::int64_t r0, std::int64_t rows, float* out) { dequantize_rows(r0, rows, out); }, n, y);
}

void PackedLinear::forward_w8a8(const float* x, std::int64_t m, float* y) const {
  const auto& s = src_;
  const std::int64_t k = s.in, n = s.out;
  const std::vector<float>& factor = w8a8_factor_;
  thread_local std::vector<std::int8_t> xq;
  if (layout_.vnni.rows() > 0) {
    xq.resize(static_cast<std::size_t>(m * k));
    std::int8_t* rows = xq.data();  // thread_local: the workers must see this thread's buffer
    if (m > kGemvMaxRows) {
      parallel_ranges(m, 16, [&](std::int64_t i0, std::int64_t i1) { quantize_int8_activations(x + i0 * k, (i1 - i0) * k, s.input_amax, rows + i0 * k); });
    } else {
      quantize_int8_activations(x, m * k, s.input_amax, rows);
    }
    layout_.vnni.multiply(rows, m, factor.data(), y);
    return;
  }
  if (vectorized_) {
    const std::int64_t k32 = layout_.k32;
    xq.assign(static_cast<std::size_t>(m * k32), 0);
    std::int8_t* rows = xq.data();  // thread_local: the workers must see this thread's buffer
    if (m > kGemvMaxRows) {
      parallel_ranges(m, 16, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) quantize_int8_activations(x + i * k, k, s.input_amax, rows + i * k32);
      });
    } else {
      for (std::int64_t i = 0; i < m; ++i) quantize_int8_activations(x + i * k, k, s.input_amax, rows + i * k32);
    }
    const std::int8_t* codes = rows;
    const auto weight_rows = [&](std::int64_t r0, std::int64_t r1) { avx2::int8_gemm(layout_.int8_rows.data(), k32, r0, r1, codes, m, factor.data(), y, n); };
    if (m <= kGemvMaxRows) parallel_ranges(n, 16, weight_rows);
    else parallel_rows_dynamic(n, 64, weight_rows);
    return;
  }
  xq.resize(static_cast<std::size_t>(m * k));
  quantize_int8_activations(x, m * k, s.input_amax, xq.data());
  const auto* w = reinterpret_cast<const std::int8_t*>(codes_.data());
  const std::int8_t* codes = xq.data();
  parallel_ranges(n, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      for (std::int64_t i = 0; i < m; ++i) {
        std::int32_t acc = 0;
        for (std::int64_t p = 0; p < k; ++p) acc += static_cast<std::int32_t>(codes[i * k + p]) * w[r * k + p];
        y[i * n + r] = static_cast<float>(acc) * factor[static_cast<std::size_t>(r)];
      }
    }
  });
}

namespace ref {

std::vector<float> dequantize(const QuantizedWeightSource& s) {
  const std::int64_t nb = ceil_div(s.in, s.block);
  std::vector<float> w(static_cast<std::size_t>(s.out * s.in));
  for (std::int64_t r = 0; r < s.out; ++r) {
    for (std::int64_t c = 0; c < s.in; ++c) w[static_cast<std::size_t>(r * s.in + c)] = code_value(s, nb, r, c, natural_code(s, codes_of(s), r, c));
  }
  return w;
}

void quantized_linear_forward(const QuantizedWeightSource& s, const float* x, std::int64_t m, float* y) {
  const std::vector<float> w = dequantize(s);
  if (!s.int8_activations) {
    kernels::ref::gemm_f32(x, m, s.in, w.data(), s.out, y);
    return;
  }
  // The fake-quantized input: clamp(rint(x * 127/amax), -128, 127) / (127/amax).
  std::vector<std::int8_t> q(static_cast<std::size_t>(m * s.in));
  quantize_int8_activations(x, m * s.in, s.input_amax, q.data());
  const float x_scale = int8_input_scale(s.input_amax);
  std::vector<float> xf(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) xf[i] = static_cast<float>(q[i]) / x_scale;
  kernels::ref::gemm_f32(xf.data(), m, s.in, w.data(), s.out, y);
}

void int4_decode(const QuantizedWeightSource& s, const float* x, std::int64_t m, float* y) {
  if (!int4_decode_rounds_input(s)) fail("int4 decode: [{}, {}] in groups of {} is not INT4 in whole 64s of inputs and groups of 32s", s.out, s.in, s.block);
  std::vector<std::int8_t> xq(static_cast<std::size_t>(m * s.in));
  std::vector<float> steps(static_cast<std::size_t>(m * (s.in / 64)));
  quantize_int8_per64(x, m * s.in, xq.data(), steps.data());
  int4_decode_rows(s, codes_of(s), xq.data(), steps.data(), m, 0, s.out, y, s.out);
}

}  // namespace ref

}  // namespace mopt::kernels
