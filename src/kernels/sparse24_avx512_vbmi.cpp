// The W8A8 kernel of the 2:4 sparse Linear (kernels/sparse24.h), compiled with AVX-512 VBMI for its
// byte permute and called only where the CPU has AVX-512 BW, VBMI and VNNI.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/prefetch.h"
#include "kernels/sparse24_simd.h"

namespace mopt::kernels::avx512 {

namespace {

// The input index of each of the 64 kept values of a 128-input step (4 * group + position).
inline __m512i kept_inputs(const std::uint32_t* step_positions) {
  const __m512i shift_bytes = _mm512_set1_epi64(0x0E0C0A0806040200LL);
  const __m512i base = _mm512_set_epi8(124, 124, 120, 120, 116, 116, 112, 112, 108, 108, 104, 104, 100, 100, 96, 96, 92, 92, 88, 88, 84, 84, 80,
                                       80, 76, 76, 72, 72, 68, 68, 64, 64, 60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32, 28,
                                       28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i words = _mm512_cvtepu16_epi64(_mm_loadu_si128(reinterpret_cast<const __m128i*>(step_positions)));
  return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(shift_bytes, words), _mm512_set1_epi8(3), base, 0xEA);
}

// W8A8: the int32 sums of M input rows with one weight row. Per 128 inputs (64 kept codes): the
// 16 bytes of positions widened to one 16-bit word per 64-bit lane, VPMULTISHIFTQB pulls each kept
// value's two bits into a byte of its own, a ternary op adds 4 * group, VPERMT2B gathers the input
// codes of the two 64-byte halves, VPDPBUSD multiplies and sums.
template <int M>
void w8a8_row(const std::int8_t* vr, const std::uint32_t* pr, std::int64_t k, const std::uint8_t* x, std::int32_t* sums) {
  __m512i acc[M];
  for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_si512();
  const std::int64_t steps = k / 128;
  for (std::int64_t s = 0; s < steps; ++s) {
    // Ahead of the hardware's prefetch, which loses the two streams at each short row's end; the
    // positions (16 bytes a step against the values' 64) the same number of steps ahead.
    _mm_prefetch(reinterpret_cast<const char*>(vr + 64 * s) + kPrefetchAhead, _MM_HINT_T0);
    if (s % 4 == 0) _mm_prefetch(reinterpret_cast<const char*>(pr + 4 * s) + kPrefetchAhead / 4, _MM_HINT_T0);
    const __m512i idx = kept_inputs(pr + 4 * s);
    const __m512i w = _mm512_loadu_si512(vr + 64 * s);
    for (int i = 0; i < M; ++i) {
      const std::uint8_t* xs = x + i * k + 128 * s;
      const __m512i g = _mm512_permutex2var_epi8(_mm512_loadu_si512(xs), idx, _mm512_loadu_si512(xs + 64));
      acc[i] = _mm512_dpbusd_epi32(acc[i], g, w);
    }
  }
  for (int i = 0; i < M; ++i) sums[i] = _mm512_reduce_add_epi32(acc[i]);
}

// INT4: blocks of 16 weight rows, one row per 32-bit lane, so that no sum crosses lanes. Per window
// of 8 inputs: VPMULTISHIFTQB pulls each lane's four 2-bit positions into bytes of their own, a ternary
// op masks them and adds 4 for the second group (the index within the window), VPSHUFB gathers the 8
// input codes (broadcast to every 64-bit lane) by them, and VPDPBUSD multiplies the kept nibbles
// (biased by 8; one AND, and a shift for the high ones) with them and a second one the 8s (the bias,
// taken back out per 64 inputs). Per 64 inputs the int32 lanes to f32 times the 16 rows' group scales
// and the input's step. M <= 2 keeps two chains of sums (even and odd windows) for the VPDPBUSD
// latency.
template <int M>
void int4_blocks(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t b0, std::int64_t b1,
                 std::int64_t out, const std::int8_t* x, const float* x_steps, float* y, std::int64_t ldy) {
  constexpr int kChains = M <= 2 ? 2 : 1;
  const std::int64_t chunks = k / 32, sixty_fours = k / 64, groups = (k + block - 1) / block;
  // Window u: output byte b of a 64-bit lane (row lane 2q + b / 4, kept value b % 4) takes the bits at
  // 8 (2u + b / 4) + 2 (b % 4) of the positions' 64-bit lane q.
  __m512i select[4];
  for (int u = 0; u < 4; ++u) {
    std::uint64_t c = 0;
    for (int b = 0; b < 8; ++b) c |= static_cast<std::uint64_t>(8 * (2 * u + b / 4) + 2 * (b % 4)) << (8 * b);
    select[u] = _mm512_set1_epi64(static_cast<long long>(c));
  }
  const __m512i three = _mm512_set1_epi8(3), second_group = _mm512_set1_epi32(0x04040000), low = _mm512_set1_epi8(0x0F);
  const __m512i eights = _mm512_set1_epi8(8);
  for (std::int64_t blk = b0; blk < b1; ++blk) {
    const std::uint8_t* s = stream + blk * chunks * kInt4ChunkBytes;
    const float* sc = scales + blk * groups * kInt4Rows;
    __m512 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm512_setzero_ps();
    for (std::int64_t h = 0; h < sixty_fours; ++h) {
      __m512i kept[M][kChains], bias[M][kChains];
      for (int i = 0; i < M; ++i) {
        for (int c = 0; c < kChains; ++c) kept[i][c] = bias[i][c] = _mm512_setzero_si512();
      }
      for (int half = 0; half < 2; ++half) {
        const std::uint8_t* p = s + (2 * h + half) * kInt4ChunkBytes;
        for (int line = 0; line < 3; ++line) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchAhead + 64 * line, _MM_HINT_T0);
        const __m512i pos = _mm512_loadu_si512(p), v01 = _mm512_loadu_si512(p + 64), v23 = _mm512_loadu_si512(p + 128);
        for (int u = 0; u < 4; ++u) {
          const __m512i idx = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(select[u], pos), three, second_group, 0xEA);
          const __m512i v = u < 2 ? v01 : v23;
          const __m512i w = _mm512_and_si512(u % 2 == 0 ? v : _mm512_srli_epi16(v, 4), low);
          const int chain = kChains == 2 ? u % 2 : 0;
          for (int i = 0; i < M; ++i) {
            long long window;
            std::memcpy(&window, x + i * k + 64 * h + 32 * half + 8 * u, sizeof window);
            const __m512i g = _mm512_shuffle_epi8(_mm512_set1_epi64(window), idx);
            kept[i][chain] = _mm512_dpbusd_epi32(kept[i][chain], w, g);
            bias[i][chain] = _mm512_dpbusd_epi32(bias[i][chain], eights, g);
          }
        }
      }
      const __m512 f = _mm512_loadu_ps(sc + ((64 * h) / block) * kInt4Rows);
      for (int i = 0; i < M; ++i) {
        __m512i d = _mm512_sub_epi32(kept[i][0], bias[i][0]);
        if constexpr (kChains == 2) d = _mm512_add_epi32(d, _mm512_sub_epi32(kept[i][1], bias[i][1]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(f, _mm512_set1_ps(x_steps[i * sixty_fours + h])), acc[i]);
      }
    }
    const std::int64_t r = blk * kInt4Rows, live = std::min(out - r, kInt4Rows);
    const auto mask = static_cast<__mmask16>(live >= 16 ? 0xFFFFu : (1u << live) - 1u);
    for (int i = 0; i < M; ++i) _mm512_mask_storeu_ps(y + i * ldy + r, mask, acc[i]);
  }
}

}  // namespace

void gemv_sparse24_int4(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0, std::int64_t r1,
                        std::int64_t out, const std::int8_t* x_codes, const float* x_steps, int m, float* y, std::int64_t ldy) {
  const std::int64_t b0 = r0 / kInt4Rows, b1 = (std::min(r1, out) + kInt4Rows - 1) / kInt4Rows;
  switch (m) {
    case 1: return int4_blocks<1>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
    case 2: return int4_blocks<2>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
    case 3: return int4_blocks<3>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
    default: return int4_blocks<4>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
  }
}

void pack_sparse24_int8_panel(const std::int8_t* values, const std::uint32_t* positions, const std::int32_t* offsets, std::int64_t k,
                              std::int64_t r0, std::int64_t rows, std::uint32_t* panel, std::int32_t* panel_offsets) {
  constexpr std::int64_t kColumns = 64;
  if (rows < kColumns) std::fill(panel, panel + (k / 4) * kColumns, 0u);
  for (std::int64_t c = 0; c < kColumns; ++c) panel_offsets[c] = c < rows ? offsets[r0 + c] : 0;
  // Output byte j of a 64-byte half (group g = j / 4) holds the kept value 2g or 2g + 1 whose input is
  // j, else 0: the two kept inputs of its group spread over the group's bytes, compared with j, and
  // the values gathered under those masks.
  alignas(64) std::int8_t first[64], second[64], lane[64];
  alignas(64) std::int32_t column[16];
  for (int j = 0; j < 64; ++j) {
    first[j] = static_cast<std::int8_t>(2 * (j / 4));
    second[j] = static_cast<std::int8_t>(2 * (j / 4) + 1);
    lane[j] = static_cast<std::int8_t>(j);
  }
  for (int j = 0; j < 16; ++j) column[j] = static_cast<std::int32_t>(j * kColumns);
  const __m512i sel_first = _mm512_load_si512(first), sel_second = _mm512_load_si512(second), j_lo = _mm512_load_si512(lane);
  const __m512i sixty_four = _mm512_set1_epi8(64), thirty_two = _mm512_set1_epi8(32), quad_stride = _mm512_load_si512(column);
  const std::int64_t steps = k / 128, words = k / 32;
  for (std::int64_t c = 0; c < rows; ++c) {
    const std::int64_t r = r0 + c;
    const std::int8_t* vr = values + r * (k / 2);
    const std::uint32_t* pr = positions + r * words;
    for (std::int64_t s = 0; s < steps; ++s) {
      const __m512i idx = kept_inputs(pr + 4 * s);
      const __m512i v = _mm512_loadu_si512(vr + 64 * s);
      for (int h = 0; h < 2; ++h) {
        // The 64 bytes of inputs 128s + 64h .. + 63 (kept values 32h .. + 31), i.e. the row's dwords of
        // quads 32s + 16h .. + 15, scattered down the panel's column c.
        const __m512i a_sel = h == 0 ? sel_first : _mm512_add_epi8(sel_first, thirty_two);
        const __m512i b_sel = h == 0 ? sel_second : _mm512_add_epi8(sel_second, thirty_two);
        const __m512i j = h == 0 ? j_lo : _mm512_add_epi8(j_lo, sixty_four);
        const __mmask64 at_a = _mm512_cmpeq_epi8_mask(_mm512_permutexvar_epi8(a_sel, idx), j);
        const __mmask64 at_b = _mm512_cmpeq_epi8_mask(_mm512_permutexvar_epi8(b_sel, idx), j);
        const __m512i d = _mm512_mask_permutexvar_epi8(_mm512_maskz_permutexvar_epi8(at_a, a_sel, v), at_b, b_sel, v);
        _mm512_i32scatter_epi32(panel + (32 * s + 16 * h) * kColumns + c, quad_stride, d, 4);
      }
    }
  }
}

void gemm_sparse24_w8a8(const std::int8_t* values, const std::uint32_t* positions, const std::int32_t* offsets, const float* factors,
                        std::int64_t k, std::int64_t r0, std::int64_t r1, const std::uint8_t* x_u8, std::int64_t m, float* y, std::int64_t ldy) {
  const std::int64_t words = k / 32;
  // 16 weight rows (16 x 5/8 k bytes) stay in cache while every 4 input rows pass over them.
  for (std::int64_t rb = r0; rb < r1; rb += 16) {
    const std::int64_t re = rb + 16 < r1 ? rb + 16 : r1;
    for (std::int64_t i0 = 0; i0 < m; i0 += 4) {
      const std::int64_t mi = m - i0 < 4 ? m - i0 : 4;
      const std::uint8_t* x = x_u8 + i0 * k;
      for (std::int64_t r = rb; r < re; ++r) {
        const std::int8_t* vr = values + r * (k / 2);
        const std::uint32_t* pr = positions + r * words;
        std::int32_t sums[4];
        switch (mi) {
          case 1: w8a8_row<1>(vr, pr, k, x, sums); break;
          case 2: w8a8_row<2>(vr, pr, k, x, sums); break;
          case 3: w8a8_row<3>(vr, pr, k, x, sums); break;
          default: w8a8_row<4>(vr, pr, k, x, sums); break;
        }
        for (std::int64_t i = 0; i < mi; ++i) y[(i0 + i) * ldy + r] = static_cast<float>(sums[i] - offsets[r]) * factors[r];
      }
    }
  }
}

}  // namespace mopt::kernels::avx512
