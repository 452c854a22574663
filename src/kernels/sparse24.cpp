#include "kernels/sparse24.h"

#include <fmt/format.h>

#include <cstdlib>
#include <cstring>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/linear.h"
#include "kernels/qlinear_simd.h"
#include "kernels/sparse24_simd.h"

namespace mopt::kernels {

namespace {

std::size_t element_bytes(Sparse24Values t) { return t == Sparse24Values::bf16 ? 2 : 1; }

bool is_zero(Sparse24Values t, const std::uint8_t* p) {
  switch (t) {
    case Sparse24Values::bf16: return ((static_cast<unsigned>(p[1]) << 8 | p[0]) & 0x7FFFu) == 0;
    case Sparse24Values::int8: return p[0] == 0;
    case Sparse24Values::e4m3: return (p[0] & 0x7F) == 0;
  }
  return false;
}

float value_of(Sparse24Values t, const std::uint8_t* p, float scale) {
  switch (t) {
    case Sparse24Values::bf16: return bf16_to_f32(static_cast<std::uint16_t>(p[1] << 8 | p[0]));
    case Sparse24Values::int8: return static_cast<float>(static_cast<std::int8_t>(p[0])) * scale;
    case Sparse24Values::e4m3: return e4m3_to_f32(p[0]) * scale;
  }
  return 0.0f;
}

int type_code(Sparse24Values t) { return t == Sparse24Values::bf16 ? 0 : t == Sparse24Values::int8 ? 1 : 2; }

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

std::string Sparse24Linear::describe() const {
  switch (type_) {
    case Sparse24Values::bf16: return "bf16 2:4";
    case Sparse24Values::int8: return "int8 weight-only 2:4";
    case Sparse24Values::e4m3: return "fp8 2:4";
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

}  // namespace

void Sparse24Linear::dequantize_rows(std::int64_t row0, std::int64_t rows, float* out) const {
  if (plain_reason_.empty() && cpu_features().avx512f) {
    return avx512::dequantize_sparse24(type_code(type_), values_.data(), positions_.data(), scales_.data(), in_, row0, row0 + rows, out);
  }
  switch (type_) {
    case Sparse24Values::bf16: return decode_rows<Sparse24Values::bf16>(values_.data(), positions_.data(), scales_.data(), in_, row0, rows, out);
    case Sparse24Values::int8: return decode_rows<Sparse24Values::int8>(values_.data(), positions_.data(), scales_.data(), in_, row0, rows, out);
    case Sparse24Values::e4m3: return decode_rows<Sparse24Values::e4m3>(values_.data(), positions_.data(), scales_.data(), in_, row0, rows, out);
  }
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

void Sparse24Linear::forward(const float* x, std::int64_t m, float* y, Precision precision) const {
  if (m <= 0) return;
  const std::int64_t k = in_, n = out_;
  if (m <= kGemvMaxRows) {
    if (!plain_reason_.empty()) return gemv_plain(x, m, y);
    const int mi = static_cast<int>(m);
    const bool avx512 = cpu_features().avx512f;
    parallel_ranges(n, 16, [&](std::int64_t r0, std::int64_t r1) {
      if (avx512) avx512::gemv_sparse24(type_code(type_), values_.data(), positions_.data(), scales_.data(), k, r0, r1, x, mi, y, n);
      else avx2::gemv_sparse24(type_code(type_), values_.data(), positions_.data(), scales_.data(), k, r0, r1, x, mi, y, n);
    });
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
