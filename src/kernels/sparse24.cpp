#include "kernels/sparse24.h"

#include <fmt/format.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/linear.h"
#include "kernels/qlinear.h"
#include "kernels/qlinear_simd.h"
#include "kernels/sparse24_simd.h"

namespace mopt::kernels {

namespace {

std::size_t element_bytes(Sparse24Values t) { return t == Sparse24Values::bf16 ? 2 : 1; }

bool is_zero(Sparse24Values t, const std::uint8_t* p) {
  switch (t) {
    case Sparse24Values::bf16: return ((static_cast<unsigned>(p[1]) << 8 | p[0]) & 0x7FFFu) == 0;
    case Sparse24Values::int8:
    case Sparse24Values::int4: return p[0] == 0;
    case Sparse24Values::e4m3: return (p[0] & 0x7F) == 0;
  }
  return false;
}

float value_of(Sparse24Values t, const std::uint8_t* p, float scale) {
  switch (t) {
    case Sparse24Values::bf16: return bf16_to_f32(static_cast<std::uint16_t>(p[1] << 8 | p[0]));
    case Sparse24Values::int8: return static_cast<float>(static_cast<std::int8_t>(p[0])) * scale;
    case Sparse24Values::e4m3: return e4m3_to_f32(p[0]) * scale;
    case Sparse24Values::int4: break;  // nibbles: int4_kept
  }
  return 0.0f;
}

int type_code(Sparse24Values t) { return t == Sparse24Values::bf16 ? 0 : t == Sparse24Values::int8 ? 1 : 2; }

// The block layouts (sparse24.h: INT4 and W8A8): rows in blocks of kBlockRows, each block one stream
// of chunk_bytes per 32 inputs. Where kept value t (0..in/2) of row r sits: its position's byte and
// bit, its value's byte and bit (INT4: a nibble), and the column of its group's first input.
struct BlockPlace {
  std::size_t position_byte;
  int position_shift;
  std::size_t value_byte;
  int value_shift;
  std::int64_t group_column;
};
inline BlockPlace block_place(bool nibbles, std::int64_t in, std::int64_t r, std::int64_t t) {
  const std::int64_t lane = r % kBlockRows, chunk = t / 16, window = (t % 16) / 4, j = t % 4;
  const std::int64_t chunk_bytes = nibbles ? kInt4ChunkBytes : kW8a8ChunkBytes;
  const auto base = static_cast<std::size_t>(((r / kBlockRows) * (in / 32) + chunk) * chunk_bytes);
  const std::int64_t value = nibbles ? 64 + 64 * (window / 2) + 4 * lane + j : 64 + 64 * window + 4 * lane + j;
  return {base + static_cast<std::size_t>(8 * (lane / 2) + 2 * window + lane % 2), static_cast<int>(2 * j), base + static_cast<std::size_t>(value),
          nibbles ? static_cast<int>(4 * (window % 2)) : 0, 32 * chunk + 8 * window + 4 * (j / 2)};
}
inline int int4_kept(const std::uint8_t* stream, const BlockPlace& p) { return static_cast<int>((stream[p.value_byte] >> p.value_shift) & 15u) - 8; }
inline int int8_kept(const std::uint8_t* stream, const BlockPlace& p) { return static_cast<std::int8_t>(stream[p.value_byte]); }
inline std::int64_t block_column(const std::uint8_t* stream, const BlockPlace& p) {
  return p.group_column + static_cast<std::int64_t>((stream[p.position_byte] >> p.position_shift) & 3u);
}
// The INT4 scale of row r at input `col`: scales [row block][group][kBlockRows].
inline float int4_scale(const std::vector<float>& scales, std::int64_t in, std::int64_t block, std::int64_t r, std::int64_t col) {
  const std::int64_t groups = (in + block - 1) / block;
  return scales[static_cast<std::size_t>(((r / kBlockRows) * groups + col / block) * kBlockRows + r % kBlockRows)];
}

// The row layout's kept values and positions (int8 values) rewritten as a block stream; the rows that
// pad the last block keep zeros (INT4: biased nibbles of 8; positions 0).
std::vector<std::uint8_t> block_stream(bool nibbles, const std::vector<std::uint8_t>& values, const std::vector<std::uint32_t>& positions,
                                       std::int64_t out, std::int64_t in) {
  const std::int64_t half = in / 2, words = in / 32, blocks = (out + kBlockRows - 1) / kBlockRows;
  std::vector<std::uint8_t> stream(static_cast<std::size_t>(blocks * (in / 32) * (nibbles ? kInt4ChunkBytes : kW8a8ChunkBytes)), 0);
  for (std::int64_t r = 0; r < blocks * kBlockRows; ++r) {
    for (std::int64_t t = 0; t < half; ++t) {
      const BlockPlace p = block_place(nibbles, in, r, t);
      const bool real = r < out;
      const auto value = real ? static_cast<std::int8_t>(values[static_cast<std::size_t>(r * half + t)]) : std::int8_t{0};
      const unsigned position = real ? (positions[static_cast<std::size_t>(r * words + t / 16)] >> (2 * (t % 16))) & 3u : 0u;
      const auto stored = nibbles ? static_cast<unsigned>(value + 8) << p.value_shift : static_cast<std::uint8_t>(value);
      stream[p.value_byte] = static_cast<std::uint8_t>(stream[p.value_byte] | stored);
      stream[p.position_byte] = static_cast<std::uint8_t>(stream[p.position_byte] | position << p.position_shift);
    }
  }
  return stream;
}

// INT4's input: per 64 values rounded to int8 (the dense INT4 GEMV's rounding).
struct RoundedInput {
  std::vector<std::int8_t> codes;
  std::vector<float> steps;
};
void round_input(const float* x, std::int64_t m, std::int64_t k, RoundedInput& r) {
  r.codes.resize(static_cast<std::size_t>(m * k));
  r.steps.resize(static_cast<std::size_t>(m * k / 64));
  quantize_int8_per64(x, m * k, r.codes.data(), r.steps.data());
}

// The input column of kept value t (0..in/2) of a row.
inline std::int64_t kept_column(const std::uint32_t* row_positions, std::int64_t t) {
  const std::uint32_t word = row_positions[t / 16];
  return (t / 2) * 4 + static_cast<std::int64_t>((word >> (2 * (t % 16))) & 3u);
}

}  // namespace

bool sparse_kernels_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("MOPT_SPARSE_KERNELS");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

std::optional<Sparse24Linear> Sparse24Linear::compress(Sparse24Values type, const std::uint8_t* codes, std::int64_t out, std::int64_t in,
                                                       std::vector<float> row_scales, const std::string& label) {
  if (out <= 0 || in <= 0) fail("{}: a 2:4 weight of [{}, {}]", label, out, in);
  if (type == Sparse24Values::int4) fail("{}: INT4 2:4 weights come through compress_int4", label);
  if (type != Sparse24Values::bf16 && static_cast<std::int64_t>(row_scales.size()) != out) {
    fail("{}: {} row scales for {} rows", label, row_scales.size(), out);
  }
  if (in % 4 != 0) return std::nullopt;
  const std::size_t eb = element_bytes(type);
  // Dense models leave at the first full group: a look costs next to nothing.
  for (std::int64_t g = 0; g < out * in; g += 4) {
    int nonzero = 0;
    for (int t = 0; t < 4; ++t) nonzero += !is_zero(type, codes + static_cast<std::size_t>(g + t) * eb);
    if (nonzero > 2) return std::nullopt;
  }
  if (type == Sparse24Values::e4m3) {
    for (std::int64_t i = 0; i < out * in; ++i) {
      if ((codes[i] & 0x7F) == 0x7F) fail("{}: the E4M3 weight code at row {} column {} is NaN", label, i / in, i % in);
    }
  }
  for (const float s : row_scales) {
    if (!std::isfinite(s)) fail("{}: a weight scale is {}", label, s);
  }
  Sparse24Linear w;
  w.type_ = type;
  w.out_ = out;
  w.in_ = in;
  w.scales_ = std::move(row_scales);
  w.block_ = in;
  const std::int64_t half = in / 2, words = (in + 31) / 32;
  w.values_.assign(static_cast<std::size_t>(out * half) * eb, 0);
  w.positions_.assign(static_cast<std::size_t>(out * words), 0u);
  for (std::int64_t r = 0; r < out; ++r) {
    const std::uint8_t* row = codes + static_cast<std::size_t>(r * in) * eb;
    std::uint8_t* vals = w.values_.data() + static_cast<std::size_t>(r * half) * eb;
    std::uint32_t* pos = w.positions_.data() + r * words;
    for (std::int64_t g = 0; g < in / 4; ++g) {
      int kept[2], n = 0;
      for (int t = 0; t < 4 && n < 2; ++t) {
        if (!is_zero(type, row + static_cast<std::size_t>(g * 4 + t) * eb)) kept[n++] = t;
      }
      for (int t = 0; t < 4 && n < 2; ++t) {  // fewer than two: fill with zeros, positions in order
        if (is_zero(type, row + static_cast<std::size_t>(g * 4 + t) * eb) && (n == 0 || kept[0] != t)) kept[n++] = t;
      }
      if (kept[0] > kept[1]) std::swap(kept[0], kept[1]);
      for (int s = 0; s < 2; ++s) {
        const std::int64_t t = g * 2 + s;  // kept value index in the row
        std::memcpy(vals + static_cast<std::size_t>(t) * eb, row + static_cast<std::size_t>(g * 4 + kept[s]) * eb, eb);
        pos[t / 16] |= static_cast<std::uint32_t>(kept[s]) << (2 * (t % 16));
      }
    }
  }
  if (in % 32 != 0) w.plain_reason_ = fmt::format("{} inputs is not a multiple of 32 (the 2:4 kernel reads 32 inputs at a time)", in);
  else w.plain_reason_ = avx2_kernels_unavailable();
  return w;
}

std::optional<Sparse24Linear> Sparse24Linear::compress_int4(const std::uint8_t* codes, std::int64_t out, std::int64_t in, std::int64_t block,
                                                            std::vector<float> scales, const std::string& label) {
  if (out <= 0 || in <= 0 || block <= 0) fail("{}: an INT4 2:4 weight of [{}, {}] in groups of {}", label, out, in, block);
  const std::int64_t groups = (in + block - 1) / block;
  if (static_cast<std::int64_t>(scales.size()) != out * groups) fail("{}: {} INT4 scales for {} rows of {} groups", label, scales.size(), out, groups);
  for (const float v : scales) {
    if (!std::isfinite(v)) fail("{}: an INT4 group scale is {}", label, v);
  }
  if (block % 64 != 0 || in % 64 != 0) return std::nullopt;
  // The nibbles as int8 bytes, compressed as an int8 weight, the kept values packed back into nibbles.
  const std::int64_t row_bytes = (in + 1) / 2;
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(out * in));
  for (std::int64_t r = 0; r < out; ++r) {
    for (std::int64_t c = 0; c < in; ++c) {
      const unsigned nibble = (codes[r * row_bytes + c / 2] >> (4 * (c & 1))) & 15u;
      bytes[static_cast<std::size_t>(r * in + c)] = static_cast<std::uint8_t>(static_cast<std::int8_t>((nibble ^ 8u) - 8u));
    }
  }
  auto w = compress(Sparse24Values::int8, bytes.data(), out, in, std::vector<float>(static_cast<std::size_t>(out), 1.0f), label);
  if (!w) return w;
  const std::int64_t blocks = (out + kBlockRows - 1) / kBlockRows;
  std::vector<std::uint8_t> stream = block_stream(true, w->values_, w->positions_, out, in);
  std::vector<float> block_scales(static_cast<std::size_t>(blocks * groups * kBlockRows), 0.0f);
  for (std::int64_t r = 0; r < out; ++r) {
    for (std::int64_t g = 0; g < groups; ++g) {
      block_scales[static_cast<std::size_t>(((r / kBlockRows) * groups + g) * kBlockRows + r % kBlockRows)] = scales[static_cast<std::size_t>(r * groups + g)];
    }
  }
  w->values_ = std::move(stream);
  w->positions_.clear();
  w->positions_.shrink_to_fit();
  w->scales_ = std::move(block_scales);
  w->type_ = Sparse24Values::int4;
  w->block_ = block;
  const CpuFeatures& f = cpu_features();
  if (!(f.avx512bw && f.avx512_vbmi && f.avx512_vnni)) {
    w->plain_reason_ = "the INT4 2:4 kernel needs AVX-512 BW, VBMI and VNNI";
  } else {
    w->plain_reason_.clear();
  }
  return w;
}

std::optional<Sparse24Linear> Sparse24Linear::compress_w8a8(const std::uint8_t* codes, std::int64_t out, std::int64_t in,
                                                            std::vector<float> row_scales, float input_amax, const std::string& label) {
  if (!std::isfinite(input_amax) || input_amax < 0.0f) fail("{}: the W8A8 input amax is {}", label, input_amax);
  auto w = compress(Sparse24Values::int8, codes, out, in, std::move(row_scales), label);
  if (!w || in % 32 != 0) return std::nullopt;  // the block stream holds whole 32s of inputs
  w->int8_activations_ = true;
  w->input_amax_ = input_amax;
  // As PackedLinear's W8A8: y = sum(qx * qw) * w_scale / (127 / amax); per row of the padded blocks
  // (padding rows: 0).
  const float x_scale = int8_input_scale(input_amax);
  const std::int64_t half = in / 2, padded = (out + kBlockRows - 1) / kBlockRows * kBlockRows;
  w->factors_.assign(static_cast<std::size_t>(padded), 0.0f);
  w->offsets_.assign(static_cast<std::size_t>(padded), 0);
  for (std::int64_t r = 0; r < out; ++r) {
    w->factors_[static_cast<std::size_t>(r)] = w->scales_[static_cast<std::size_t>(r)] / x_scale;
    std::int32_t sum = 0;
    for (std::int64_t t = 0; t < half; ++t) sum += static_cast<std::int8_t>(w->values_[static_cast<std::size_t>(r * half + t)]);
    w->offsets_[static_cast<std::size_t>(r)] = 128 * sum;
  }
  w->values_ = block_stream(false, w->values_, w->positions_, out, in);
  w->positions_.clear();
  w->positions_.shrink_to_fit();
  const CpuFeatures& f = cpu_features();
  if (!(f.avx512bw && f.avx512_vbmi && f.avx512_vnni)) {
    w->plain_reason_ = "the W8A8 2:4 kernel needs AVX-512 BW, VBMI and VNNI";
  } else {
    w->plain_reason_.clear();
  }
  return w;
}

std::string Sparse24Linear::describe() const {
  switch (type_) {
    case Sparse24Values::bf16: return "bf16 2:4";
    case Sparse24Values::int8: return int8_activations_ ? "int8 w8a8 2:4" : "int8 weight-only 2:4";
    case Sparse24Values::e4m3: return "fp8 2:4";
    case Sparse24Values::int4: return fmt::format("int4 g{} 2:4", block_);
  }
  return "?";
}

namespace {

// Rows of the compressed layout decoded into f32 rows (zeros included), one loop per value type.
template <Sparse24Values Type>
void decode_rows(const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t in, std::int64_t row0,
                 std::int64_t rows, float* out) {
  constexpr std::size_t eb = Type == Sparse24Values::bf16 ? 2 : 1;
  const std::int64_t half = in / 2, words = (in + 31) / 32;
  for (std::int64_t r = row0; r < row0 + rows; ++r) {
    const std::uint8_t* vals = values + static_cast<std::size_t>(r * half) * eb;
    const std::uint32_t* pos = positions + r * words;
    const float scale = Type == Sparse24Values::bf16 ? 1.0f : scales[r];
    float* o = out + (r - row0) * in;
    std::fill(o, o + in, 0.0f);
    for (std::int64_t w = 0; w < words; ++w) {
      std::uint32_t word = pos[w];
      const std::int64_t t_end = std::min<std::int64_t>(half, (w + 1) * 16);
      for (std::int64_t t = w * 16; t < t_end; ++t, word >>= 2) {
        const std::int64_t col = (t >> 1) * 4 + static_cast<std::int64_t>(word & 3u);
        const std::uint8_t* p = vals + static_cast<std::size_t>(t) * eb;
        if constexpr (Type == Sparse24Values::bf16) o[col] = bf16_to_f32(static_cast<std::uint16_t>(p[1] << 8 | p[0]));
        else if constexpr (Type == Sparse24Values::int8) o[col] = static_cast<float>(static_cast<std::int8_t>(p[0])) * scale;
        else o[col] = e4m3_to_f32(p[0]) * scale;
      }
    }
  }
}

void decode_rows_int4(const std::uint8_t* stream, const std::vector<float>& scales, std::int64_t in, std::int64_t block, std::int64_t row0,
                      std::int64_t rows, float* out) {
  for (std::int64_t r = row0; r < row0 + rows; ++r) {
    float* o = out + (r - row0) * in;
    std::fill(o, o + in, 0.0f);
    for (std::int64_t t = 0; t < in / 2; ++t) {
      const BlockPlace p = block_place(true, in, r, t);
      const std::int64_t col = block_column(stream, p);
      o[col] = static_cast<float>(int4_kept(stream, p)) * int4_scale(scales, in, block, r, col);
    }
  }
}

// W8A8 rows from the block stream (inspect's whole weights; the forward pass never decodes them).
void decode_rows_w8a8(const std::uint8_t* stream, const std::vector<float>& scales, std::int64_t in, std::int64_t row0, std::int64_t rows,
                      float* out) {
  for (std::int64_t r = row0; r < row0 + rows; ++r) {
    float* o = out + (r - row0) * in;
    std::fill(o, o + in, 0.0f);
    for (std::int64_t t = 0; t < in / 2; ++t) {
      const BlockPlace p = block_place(false, in, r, t);
      o[block_column(stream, p)] = static_cast<float>(int8_kept(stream, p)) * scales[static_cast<std::size_t>(r)];
    }
  }
}

}  // namespace

void Sparse24Linear::dequantize_rows(std::int64_t row0, std::int64_t rows, float* out) const {
  if (int8_activations_) return decode_rows_w8a8(values_.data(), scales_, in_, row0, rows, out);
  if (type_ == Sparse24Values::int4) {
    if (cpu_features().avx512f) {
      return avx512::dequantize_sparse24_int4(values_.data(), scales_.data(), block_, in_, row0, row0 + rows, out);
    }
    return decode_rows_int4(values_.data(), scales_, in_, block_, row0, rows, out);
  }
  if (plain_reason_.empty() && cpu_features().avx512f) {
    return avx512::dequantize_sparse24(type_code(type_), values_.data(), positions_.data(), scales_.data(), in_, row0, row0 + rows, out);
  }
  switch (type_) {
    case Sparse24Values::bf16: return decode_rows<Sparse24Values::bf16>(values_.data(), positions_.data(), scales_.data(), in_, row0, rows, out);
    case Sparse24Values::int8: return decode_rows<Sparse24Values::int8>(values_.data(), positions_.data(), scales_.data(), in_, row0, rows, out);
    case Sparse24Values::e4m3: return decode_rows<Sparse24Values::e4m3>(values_.data(), positions_.data(), scales_.data(), in_, row0, rows, out);
    case Sparse24Values::int4: break;  // above
  }
}

void Sparse24Linear::gemv_int4(const float* x, std::int64_t m, float* y) const {
  const std::int64_t k = in_, n = out_;
  thread_local RoundedInput rounded;
  round_input(x, m, k, rounded);
  const std::int8_t* codes = rounded.codes.data();  // thread_local: the workers must see this thread's buffers
  const float* steps = rounded.steps.data();
  if (plain_reason_.empty()) {
    // Ranges of whole blocks of rows (gemv_passes cuts at multiples of 16 = kBlockRows).
    static_assert(kBlockRows == 16);
    gemv_passes(n, m, [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
      avx512::gemv_sparse24_int4(values_.data(), scales_.data(), block_, k, r0, r1, n, codes + i0 * k, steps + i0 * (k / 64), rows, y + i0 * n, n);
    });
    return;
  }
  // Per 64 inputs the exact int32 sum of the kept products, times that 64's step and group scale.
  parallel_ranges(n, kBlockRows, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      for (std::int64_t i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (std::int64_t b = 0; b < k / 64; ++b) {
          std::int32_t sum = 0;
          for (std::int64_t t = 32 * b; t < 32 * b + 32; ++t) {
            const BlockPlace p = block_place(true, k, r, t);
            sum += int4_kept(values_.data(), p) * codes[i * k + block_column(values_.data(), p)];
          }
          // One rounding, as the kernel's FMA (the scale times the step, as it multiplies them).
          acc = std::fma(static_cast<float>(sum), int4_scale(scales_, k, block_, r, 64 * b) * steps[i * (k / 64) + b], acc);
        }
        y[i * n + r] = acc;
      }
    }
  });
}

void Sparse24Linear::gemv_plain(const float* x, std::int64_t m, float* y) const {
  const std::size_t eb = element_bytes(type_);
  const std::int64_t half = in_ / 2, words = (in_ + 31) / 32, k = in_, n = out_;
  parallel_ranges(n, 16, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::uint8_t* vals = values_.data() + static_cast<std::size_t>(r * half) * eb;
      const std::uint32_t* pos = positions_.data() + r * words;
      const float scale = scales_.empty() ? 1.0f : scales_[static_cast<std::size_t>(r)];
      for (std::int64_t i = 0; i < m; ++i) {
        float acc = 0.0f;
        for (std::int64_t t = 0; t < half; ++t) acc += x[i * k + kept_column(pos, t)] * value_of(type_, vals + static_cast<std::size_t>(t) * eb, scale);
        y[i * n + r] = acc;
      }
    }
  });
}

void Sparse24Linear::forward_w8a8(const float* x, std::int64_t m, float* y) const {
  const std::int64_t k = in_, n = out_;
  thread_local std::vector<std::int8_t> xq;
  xq.resize(static_cast<std::size_t>(m * k));
  std::int8_t* codes = xq.data();  // thread_local: the workers must see this thread's buffer
  const bool fast = plain_reason_.empty();
  parallel_ranges(m, 16, [&](std::int64_t i0, std::int64_t i1) {
    quantize_int8_activations(x + i0 * k, (i1 - i0) * k, input_amax_, codes + i0 * k);
    // The kernel multiplies unsigned bytes: the codes biased by 128 (offsets_ takes the bias back out).
    if (fast) {
      for (std::int64_t i = i0 * k; i < i1 * k; ++i) codes[i] = static_cast<std::int8_t>(static_cast<std::uint8_t>(codes[i]) ^ 0x80u);
    }
  });
  if (fast) {
    const auto* xu = reinterpret_cast<const std::uint8_t*>(codes);
    // Ranges of whole blocks of rows (parallel_ranges cuts at multiples of the grain).
    parallel_ranges(n, kBlockRows, [&](std::int64_t r0, std::int64_t r1) {
      avx512::gemm_sparse24_w8a8(values_.data(), offsets_.data(), factors_.data(), k, r0, r1, n, xu, m, y, n);
    });
    return;
  }
  parallel_ranges(n, kBlockRows, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      for (std::int64_t i = 0; i < m; ++i) {
        std::int32_t acc = 0;
        for (std::int64_t t = 0; t < k / 2; ++t) {
          const BlockPlace p = block_place(false, k, r, t);
          acc += static_cast<std::int32_t>(codes[i * k + block_column(values_.data(), p)]) * int8_kept(values_.data(), p);
        }
        y[i * n + r] = static_cast<float>(acc) * factors_[static_cast<std::size_t>(r)];
      }
    }
  });
}

void Sparse24Linear::forward(const float* x, std::int64_t m, float* y, Precision precision) const {
  if (m <= 0) return;
  if (int8_activations_) return forward_w8a8(x, m, y);
  const std::int64_t k = in_, n = out_;
  if (type_ == Sparse24Values::int4 && m <= int4_gemv_max_rows(out_, in_)) return gemv_int4(x, m, y);
  // (INT4 beyond its GEMV's rows: the tiles below.)
  if (type_ != Sparse24Values::int4 && (m <= kGemvMaxRows || (plain_reason_.empty() && m <= kSparse24GemvMaxRows))) {
    if (!plain_reason_.empty()) return gemv_plain(x, m, y);
    const bool avx512 = cpu_features().avx512f;
    const auto gemv = [&](std::int64_t i0, int rows, std::int64_t r0, std::int64_t r1) {
      if (avx512) avx512::gemv_sparse24(type_code(type_), values_.data(), positions_.data(), scales_.data(), k, r0, r1, x + i0 * k, rows, y + i0 * n, n);
      else avx2::gemv_sparse24(type_code(type_), values_.data(), positions_.data(), scales_.data(), k, r0, r1, x + i0 * k, rows, y + i0 * n, n);
    };
    gemv_passes(n, m, gemv);
    return;
  }
  const auto rows = [this](std::int64_t r0, std::int64_t count, float* out) { dequantize_rows(r0, count, out); };
  if (precision == Precision::bf16 && bf16_kernels_chosen()) gemm_bf16(x, m, k, rows, n, y);
  else gemm_f32_rows(x, m, k, rows, n, y);
}

namespace ref {

void sparse24_forward(const Sparse24Linear& w, const float* x, std::int64_t m, float* y) {
  const std::size_t eb = element_bytes(w.type());
  const std::int64_t half = w.in() / 2, words = (w.in() + 31) / 32, k = w.in(), n = w.out();
  if (w.type() == Sparse24Values::int4) {
    // Decode (m <= int4_gemv_max_rows) rounds the input per 64 values as the kernels do; prefill keeps f32.
    const bool rounded = m <= int4_gemv_max_rows(w.out(), w.in());
    RoundedInput q;
    if (rounded) round_input(x, m, k, q);
    for (std::int64_t r = 0; r < n; ++r) {
      for (std::int64_t i = 0; i < m; ++i) {
        double acc = 0.0;
        for (std::int64_t t = 0; t < half; ++t) {
          const BlockPlace p = block_place(true, k, r, t);
          const std::int64_t col = block_column(w.values().data(), p);
          const double xv = rounded ? static_cast<double>(q.codes[static_cast<std::size_t>(i * k + col)]) * q.steps[static_cast<std::size_t>(i * (k / 64) + col / 64)]
                                    : static_cast<double>(x[i * k + col]);
          acc += static_cast<double>(int4_kept(w.values().data(), p)) * int4_scale(w.scales(), k, w.block(), r, col) * xv;
        }
        y[i * n + r] = static_cast<float>(acc);
      }
    }
    return;
  }
  if (w.int8_activations()) {
    std::vector<std::int8_t> q(static_cast<std::size_t>(m * k));
    quantize_int8_activations(x, m * k, w.input_amax(), q.data());
    const float x_scale = int8_input_scale(w.input_amax());
    for (std::int64_t r = 0; r < n; ++r) {
      for (std::int64_t i = 0; i < m; ++i) {
        std::int64_t acc = 0;
        for (std::int64_t t = 0; t < half; ++t) {
          const BlockPlace p = block_place(false, k, r, t);
          acc += std::int64_t{q[static_cast<std::size_t>(i * k + block_column(w.values().data(), p))]} * int8_kept(w.values().data(), p);
        }
        y[i * n + r] = static_cast<float>(acc) * (w.scales()[static_cast<std::size_t>(r)] / x_scale);
      }
    }
    return;
  }
  for (std::int64_t r = 0; r < n; ++r) {
    const std::uint8_t* vals = w.values().data() + static_cast<std::size_t>(r * half) * eb;
    const std::uint32_t* pos = w.positions().data() + r * words;
    const float scale = w.scales().empty() ? 1.0f : w.scales()[static_cast<std::size_t>(r)];
    for (std::int64_t i = 0; i < m; ++i) {
      double acc = 0.0;
      for (std::int64_t t = 0; t < half; ++t) {
        acc += static_cast<double>(x[i * k + kept_column(pos, t)]) * value_of(w.type(), vals + static_cast<std::size_t>(t) * eb, scale);
      }
      y[i * n + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace ref

}  // namespace mopt::kernels
