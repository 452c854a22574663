#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "kernels/avx512_bf16_util.h"
#include "kernels/gemm_simd.h"

namespace mopt::kernels::avx512 {

namespace {

__mmask16 column_mask(std::int64_t cols, int vector) {
  const std::int64_t n = std::clamp<std::int64_t>(cols - vector * 16, 0, 16);
  return static_cast<__mmask16>((1u << n) - 1u);
}

// Packs a panel 16 columns x 16 pairs at a time: load(c, p0) gives column c's pairs p0..p0+15
// (zeros past k); columns past `rows` are zeros.
template <class Load>
void pack_panel(std::int64_t rows, std::int64_t k, std::uint32_t* panel, const Load& load) {
  const std::int64_t pairs = (k + 1) / 2;
  __m512i r[16];
  for (std::int64_t c0 = 0; c0 < kPanelColumns; c0 += 16) {
    for (std::int64_t p0 = 0; p0 < pairs; p0 += 16) {
      for (int i = 0; i < 16; ++i) r[i] = c0 + i < rows ? load(c0 + i, p0) : _mm512_setzero_si512();
      transpose_16x16(r);
      const std::int64_t n = std::min<std::int64_t>(16, pairs - p0);
      for (std::int64_t j = 0; j < n; ++j) _mm512_storeu_si512(panel + (p0 + j) * kPanelColumns + c0, r[j]);
    }
  }
}

template <int RM>
void tile_bf16(const std::uint32_t* xp, std::int64_t pairs, const std::uint32_t* panel, float* y, std::int64_t ldy,
               const __mmask16* mask, bool accumulate) {
  __m512 acc[RM][4];
  for (int r = 0; r < RM; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  }
  for (std::int64_t p = 0; p < pairs; ++p) {
    const std::uint32_t* w = panel + p * kPanelColumns;
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + 16));
    const __m512bh w2 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + 32));
    const __m512bh w3 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + 48));
    for (int r = 0; r < RM; ++r) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(xp[p * kRowBlock + r])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, w3);
    }
  }
  for (int r = 0; r < RM; ++r) {
    float* yr = y + r * ldy;
    for (int j = 0; j < 4; ++j) {
      if (mask[j] == 0) continue;
      __m512 v = acc[r][j];
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask[j], yr + 16 * j));
      _mm512_mask_storeu_ps(yr + 16 * j, mask[j], v);
    }
  }
}

// acc + (unsigned bytes of u) · (signed bytes of s), four products per dword: VPDPBUSD. Written as
// inline assembly because GCC 12's register allocation of the intrinsic kept tile_int8's 24
// accumulators on the stack, storing each of them in every iteration (objdump), at half the rate.
inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}

// The int32 sums of a pass are kept in y's own storage between passes (as int32 bits); the last
// pass turns them into (sum - offset) * factor.
template <int RM>
void tile_int8(const std::uint32_t* xp, std::int64_t quads, const std::uint32_t* panel, const std::int32_t* offsets,
               const float* factor, float* y, std::int64_t ldy, const __mmask16* mask, bool first, bool last) {
  __m512i acc[RM][4];
  for (int r = 0; r < RM; ++r) {
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  }
  for (std::int64_t q = 0; q < quads; ++q) {
    const std::uint32_t* w = panel + q * kPanelColumns;
    const __m512i w0 = _mm512_loadu_si512(w);
    const __m512i w1 = _mm512_loadu_si512(w + 16);
    const __m512i w2 = _mm512_loadu_si512(w + 32);
    const __m512i w3 = _mm512_loadu_si512(w + 48);
    for (int r = 0; r < RM; ++r) {
      const __m512i x = _mm512_set1_epi32(static_cast<int>(xp[q * kRowBlock + r]));
      acc[r][0] = dpbusd(acc[r][0], x, w0);
      acc[r][1] = dpbusd(acc[r][1], x, w1);
      acc[r][2] = dpbusd(acc[r][2], x, w2);
      acc[r][3] = dpbusd(acc[r][3], x, w3);
    }
  }
  // Rows outer, as in tile_bf16: with the columns outer GCC 12 kept the accumulators on the stack
  // and stored all 24 of them in every iteration of the loop above (half the VNNI rate).
  for (int r = 0; r < RM; ++r) {
    for (int j = 0; j < 4; ++j) {
      if (mask[j] == 0) continue;
      float* yr = y + r * ldy + 16 * j;
      __m512i sum = acc[r][j];
      if (!first) sum = _mm512_add_epi32(sum, _mm512_maskz_loadu_epi32(mask[j], yr));
      if (last) {
        const __m512i off = _mm512_maskz_loadu_epi32(mask[j], offsets + 16 * j);
        const __m512 f = _mm512_maskz_loadu_ps(mask[j], factor + 16 * j);
        _mm512_mask_storeu_ps(yr, mask[j], _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sum, off)), f));
      } else {
        _mm512_mask_storeu_epi32(yr, mask[j], sum);
      }
    }
  }
}

// An f32 tile as tile_bf16's: 6 rows x 64 columns, x broadcast, one FMA per input and vector.
void tile_f32(const float* x, std::int64_t k, const float* panel, float* y) {
  __m512 acc[kRowBlock][4];
  for (auto& row : acc) {
    for (auto& a : row) a = _mm512_setzero_ps();
  }
  for (std::int64_t p = 0; p < k; ++p) {
    const float* w = panel + p * kPanelColumns;
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
    for (int r = 0; r < kRowBlock; ++r) {
      const __m512 v = _mm512_set1_ps(x[p * kRowBlock + r]);
      acc[r][0] = _mm512_fmadd_ps(v, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(v, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(v, w3, acc[r][3]);
    }
  }
  for (int r = 0; r < kRowBlock; ++r) {
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(y + r * kPanelColumns + 16 * j, _mm512_add_ps(acc[r][j], _mm512_loadu_ps(y + r * kPanelColumns + 16 * j)));
  }
}

}  // namespace

double bf16_tile_over_fma_tile() {
  constexpr std::int64_t kInputs = 256, kPairs = kInputs / 2;
  constexpr int kCalls = 64;  // ~0.2 ms per run at ~100 GFLOP/s
  // Small values (1/64 as bf16 and f32) keep the sums finite and normal.
  std::vector<std::uint32_t> xb(kPairs * kRowBlock, 0x3C803C80u), pb(kPairs * kPanelColumns, 0x3C803C80u);
  std::vector<float> xf(kInputs * kRowBlock, 1.0f / 64), pf(kInputs * kPanelColumns, 1.0f / 64), y(kRowBlock * kPanelColumns, 0.0f);
  const __mmask16 all[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
  double best_bf16 = 1e30, best_f32 = 1e30;
  for (int run = 0; run < 5; ++run) {
    auto t = std::chrono::steady_clock::now();
    for (int i = 0; i < kCalls; ++i) tile_bf16<kRowBlock>(xb.data(), kPairs, pb.data(), y.data(), kPanelColumns, all, true);
    best_bf16 = std::min(best_bf16, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
    t = std::chrono::steady_clock::now();
    for (int i = 0; i < kCalls; ++i) tile_f32(xf.data(), kInputs, pf.data(), y.data());
    best_f32 = std::min(best_f32, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
  }
  // Both tiles did the same products; keep y alive so neither loop is dropped.
  volatile float sink = y[0];
  (void)sink;
  return best_f32 / best_bf16;
}

void pack_rows_bf16(const float* x, std::int64_t ldx, std::int64_t rows, std::int64_t k, std::uint32_t* block) {
  const std::int64_t pairs = (k + 1) / 2;
  alignas(64) std::uint32_t buf[16];
  for (std::int64_t r = 0; r < kRowBlock; ++r) {
    if (r >= rows) {
      for (std::int64_t p = 0; p < pairs; ++p) block[p * kRowBlock + r] = 0;
      continue;
    }
    const float* src = x + r * ldx;
    for (std::int64_t p0 = 0; p0 < pairs; p0 += 16) {
      const std::int64_t n = std::min<std::int64_t>(16, pairs - p0);
      _mm512_store_si512(buf, f32x32_to_bf16_pairs(src + 2 * p0, k - 2 * p0));
      for (std::int64_t t = 0; t < n; ++t) block[(p0 + t) * kRowBlock + r] = buf[t];
    }
  }
}

void pack_rows_uint8(const std::int8_t* x, std::int64_t ldx, std::int64_t rows, std::int64_t k, std::uint32_t* block) {
  const std::int64_t quads = (k + 3) / 4;
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  alignas(64) std::uint32_t buf[16];
  for (std::int64_t r = 0; r < kRowBlock; ++r) {
    for (std::int64_t q0 = 0; q0 < quads; q0 += 16) {
      const std::int64_t n = std::min<std::int64_t>(16, quads - q0);
      const std::int64_t bytes = r < rows ? std::min<std::int64_t>(64, k - 4 * q0) : 0;
      const auto mask = static_cast<__mmask64>(bytes >= 64 ? ~0ull : (1ull << bytes) - 1ull);
      // Missing inputs and rows load as 0, the code 0, which is 128 once offset.
      const std::int8_t* src = r < rows ? x + r * ldx + 4 * q0 : x;
      _mm512_store_si512(buf, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, src), offset));
      for (std::int64_t t = 0; t < n; ++t) block[(q0 + t) * kRowBlock + r] = buf[t];
    }
  }
}

void pack_panel_bf16(const std::uint16_t* w, std::int64_t ldw, std::int64_t rows, std::int64_t k, std::uint32_t* panel) {
  pack_panel(rows, k, panel, [&](std::int64_t c, std::int64_t p0) {
    const std::int64_t elems = std::min<std::int64_t>(32, k - 2 * p0);
    return _mm512_maskz_loadu_epi16(static_cast<__mmask32>(elems >= 32 ? 0xFFFFFFFFu : (1u << elems) - 1u), w + c * ldw + 2 * p0);
  });
}

void pack_panel_f32(const float* w, std::int64_t ldw, std::int64_t rows, std::int64_t k, std::uint32_t* panel) {
  pack_panel(rows, k, panel, [&](std::int64_t c, std::int64_t p0) { return f32x32_to_bf16_pairs(w + c * ldw + 2 * p0, k - 2 * p0); });
}

void gemm_bf16_panel(const std::uint32_t* xp, std::int64_t pairs_total, std::int64_t m, std::int64_t pair0, std::int64_t pairs,
                     const std::uint32_t* panel, std::int64_t cols, float* y, std::int64_t ldy, bool accumulate) {
  const __mmask16 mask[4] = {column_mask(cols, 0), column_mask(cols, 1), column_mask(cols, 2), column_mask(cols, 3)};
  for (std::int64_t i = 0; i < m; i += kRowBlock) {
    const std::uint32_t* x = xp + (i / kRowBlock) * pairs_total * kRowBlock + pair0 * kRowBlock;
    float* yi = y + i * ldy;
    switch (std::min<std::int64_t>(kRowBlock, m - i)) {
      case 6: tile_bf16<6>(x, pairs, panel, yi, ldy, mask, accumulate); break;
      case 5: tile_bf16<5>(x, pairs, panel, yi, ldy, mask, accumulate); break;
      case 4: tile_bf16<4>(x, pairs, panel, yi, ldy, mask, accumulate); break;
      case 3: tile_bf16<3>(x, pairs, panel, yi, ldy, mask, accumulate); break;
      case 2: tile_bf16<2>(x, pairs, panel, yi, ldy, mask, accumulate); break;
      default: tile_bf16<1>(x, pairs, panel, yi, ldy, mask, accumulate); break;
    }
  }
}

void pack_panel_int8(const std::int8_t* w, std::int64_t ldw, std::int64_t rows, std::int64_t k, std::uint32_t* panel,
                     std::int32_t* column_offsets) {
  const std::int64_t quads = (k + 3) / 4;
  for (std::int64_t c = 0; c < kPanelColumns; ++c) {
    std::int32_t sum = 0;
    for (std::int64_t q = 0; q < quads; ++q) {
      std::uint32_t d = 0;
      if (c < rows) {
        for (int b = 0; b < 4; ++b) {
          const std::int64_t p = 4 * q + b;
          if (p >= k) break;
          const std::int8_t v = w[c * ldw + p];
          sum += v;
          d |= static_cast<std::uint32_t>(static_cast<std::uint8_t>(v)) << (8 * b);
        }
      }
      panel[q * kPanelColumns + c] = d;
    }
    column_offsets[c] = 128 * sum;
  }
}

void gemm_int8_panel(const std::uint32_t* xp, std::int64_t quads_total, std::int64_t m, std::int64_t quad0, std::int64_t quads,
                     const std::uint32_t* panel, const std::int32_t* column_offsets, const float* factor, std::int64_t cols,
                     float* y, std::int64_t ldy) {
  const __mmask16 mask[4] = {column_mask(cols, 0), column_mask(cols, 1), column_mask(cols, 2), column_mask(cols, 3)};
  const bool first = quad0 == 0, last = quad0 + quads == quads_total;
  for (std::int64_t i = 0; i < m; i += kRowBlock) {
    const std::uint32_t* x = xp + (i / kRowBlock) * quads_total * kRowBlock + quad0 * kRowBlock;
    float* yi = y + i * ldy;
    switch (std::min<std::int64_t>(kRowBlock, m - i)) {
      case 6: tile_int8<6>(x, quads, panel, column_offsets, factor, yi, ldy, mask, first, last); break;
      case 5: tile_int8<5>(x, quads, panel, column_offsets, factor, yi, ldy, mask, first, last); break;
      case 4: tile_int8<4>(x, quads, panel, column_offsets, factor, yi, ldy, mask, first, last); break;
      case 3: tile_int8<3>(x, quads, panel, column_offsets, factor, yi, ldy, mask, first, last); break;
      case 2: tile_int8<2>(x, quads, panel, column_offsets, factor, yi, ldy, mask, first, last); break;
      default: tile_int8<1>(x, quads, panel, column_offsets, factor, yi, ldy, mask, first, last); break;
    }
  }
}

}  // namespace mopt::kernels::avx512
