// The 2:4 kernels of the block layouts (W8A8 and INT4, kernels/sparse24.h), compiled with AVX-512
// VBMI for VPMULTISHIFTQB and called only where the CPU has AVX-512 BW, VBMI and VNNI.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/prefetch.h"
#include "kernels/sparse24_simd.h"

namespace mopt::kernels::avx512 {

namespace {

// The gather indices of window u (8 inputs) of a 32-input chunk for the 16 rows of a block: byte j of
// lane l = row l's kept position j + 4 (j / 2), the input within the window. VPMULTISHIFTQB pulls the
// 2 bits of output byte b of a 64-bit lane (row 2q + b / 4, kept b % 4) from bit 8 (2u + b / 4) +
// 2 (b % 4) of the positions' lane q; a ternary op keeps 2 bits and adds 4 for the second group.
class WindowIndex {
 public:
  WindowIndex() {
    for (int u = 0; u < 4; ++u) {
      std::uint64_t c = 0;
      for (int b = 0; b < 8; ++b) c |= static_cast<std::uint64_t>(8 * (2 * u + b / 4) + 2 * (b % 4)) << (8 * b);
      select_[u] = _mm512_set1_epi64(static_cast<long long>(c));
    }
  }
  __m512i operator()(__m512i positions, int u) const {
    return _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(select_[u], positions), three_, second_group_, 0xEA);  // (a & b) | c
  }

 private:
  __m512i select_[4];
  __m512i three_ = _mm512_set1_epi8(3), second_group_ = _mm512_set1_epi32(0x04040000);
};

// The input's 8 bytes of a window broadcast to every 64-bit lane, gathered by a window's indices.
inline __m512i gather_window(const void* x, __m512i idx) {
  long long window;
  std::memcpy(&window, x, sizeof window);
  return _mm512_shuffle_epi8(_mm512_set1_epi64(window), idx);
}

// W8A8: the int32 sums of M input rows with the 16 rows of one block, one row per 32-bit lane. Per
// window: the indices, VPSHUFB gathers each row's 4 kept input codes, one VPDPBUSD multiplies them
// with the 4 kept int8 codes and sums. Fewer rows keep more chains of sums for the VPDPBUSD latency.
template <int M>
void w8a8_block(const std::uint8_t* s, const WindowIndex& index, std::int64_t k, const std::uint8_t* x, bool prefetch, __m512i* sums) {
  constexpr int kChains = M == 1 ? 4 : M == 2 ? 2 : 1;
  __m512i acc[M][kChains];
  for (int i = 0; i < M; ++i) {
    for (int c = 0; c < kChains; ++c) acc[i][c] = _mm512_setzero_si512();
  }
  for (std::int64_t c = 0; c < k / 32; ++c) {
    const std::uint8_t* p = s + c * kW8a8ChunkBytes;
    if (prefetch) {
      for (int line = 0; line < 5; ++line) _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchAhead + 64 * line, _MM_HINT_T0);
    }
    const __m512i pos = _mm512_loadu_si512(p);
    for (int u = 0; u < 4; ++u) {
      const __m512i idx = index(pos, u), w = _mm512_loadu_si512(p + 64 + 64 * u);
      const int chain = u % kChains;
      for (int i = 0; i < M; ++i) acc[i][chain] = _mm512_dpbusd_epi32(acc[i][chain], gather_window(x + i * k + 32 * c + 8 * u, idx), w);
    }
  }
  for (int i = 0; i < M; ++i) {
    sums[i] = acc[i][0];
    for (int c = 1; c < kChains; ++c) sums[i] = _mm512_add_epi32(sums[i], acc[i][c]);
  }
}

// INT4: blocks of 16 weight rows, one row per 32-bit lane, so that no sum crosses lanes. Per window
// of 8 inputs: the indices, VPSHUFB gathers each row's 4 kept input codes, and VPDPBUSD multiplies the kept nibbles
// (biased by 8; one AND, and a shift for the high ones) with them and a second one the 8s (the bias,
// taken back out per 64 inputs). Per 64 inputs the int32 lanes to f32 times the 16 rows' group scales
// and the input's step. M <= 2 keeps two chains of sums (even and odd windows) for the VPDPBUSD
// latency.
template <int M>
void int4_blocks(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t b0, std::int64_t b1,
                 std::int64_t out, const std::int8_t* x, const float* x_steps, float* y, std::int64_t ldy) {
  constexpr int kChains = M <= 2 ? 2 : 1;
  const std::int64_t chunks = k / 32, sixty_fours = k / 64, groups = (k + block - 1) / block;
  const WindowIndex index;
  const __m512i low = _mm512_set1_epi8(0x0F), eights = _mm512_set1_epi8(8);
  for (std::int64_t blk = b0; blk < b1; ++blk) {
    const std::uint8_t* s = stream + blk * chunks * kInt4ChunkBytes;
    const float* sc = scales + blk * groups * kBlockRows;
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
          const __m512i idx = index(pos, u);
          const __m512i v = u < 2 ? v01 : v23;
          const __m512i w = _mm512_and_si512(u % 2 == 0 ? v : _mm512_srli_epi16(v, 4), low);
          const int chain = kChains == 2 ? u % 2 : 0;
          for (int i = 0; i < M; ++i) {
            const __m512i g = gather_window(x + i * k + 64 * h + 32 * half + 8 * u, idx);
            kept[i][chain] = _mm512_dpbusd_epi32(kept[i][chain], w, g);
            bias[i][chain] = _mm512_dpbusd_epi32(bias[i][chain], eights, g);
          }
        }
      }
      const __m512 f = _mm512_loadu_ps(sc + ((64 * h) / block) * kBlockRows);
      for (int i = 0; i < M; ++i) {
        __m512i d = _mm512_sub_epi32(kept[i][0], bias[i][0]);
        if constexpr (kChains == 2) d = _mm512_add_epi32(d, _mm512_sub_epi32(kept[i][1], bias[i][1]));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(f, _mm512_set1_ps(x_steps[i * sixty_fours + h])), acc[i]);
      }
    }
    const std::int64_t r = blk * kBlockRows, live = std::min(out - r, kBlockRows);
    const auto mask = static_cast<__mmask16>(live >= 16 ? 0xFFFFu : (1u << live) - 1u);
    for (int i = 0; i < M; ++i) _mm512_mask_storeu_ps(y + i * ldy + r, mask, acc[i]);
  }
}

}  // namespace

void gemv_sparse24_int4(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0, std::int64_t r1,
                        std::int64_t out, const std::int8_t* x_codes, const float* x_steps, int m, float* y, std::int64_t ldy) {
  const std::int64_t b0 = r0 / kBlockRows, b1 = (std::min(r1, out) + kBlockRows - 1) / kBlockRows;
  switch (m) {
    case 1: return int4_blocks<1>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
    case 2: return int4_blocks<2>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
    case 3: return int4_blocks<3>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
    default: return int4_blocks<4>(stream, scales, block, k, b0, b1, out, x_codes, x_steps, y, ldy);
  }
}

void gemm_sparse24_w8a8(const std::uint8_t* stream, const std::int32_t* offsets, const float* factors, std::int64_t k, std::int64_t r0,
                        std::int64_t r1, std::int64_t out, const std::uint8_t* x_u8, std::int64_t m, float* y, std::int64_t ldy) {
  constexpr std::int64_t kTileRows = 8;  // input rows per pass over a block (its 16 x 5/8 k bytes stay in cache)
  const WindowIndex index;
  const std::int64_t b0 = r0 / kBlockRows, b1 = (std::min(r1, out) + kBlockRows - 1) / kBlockRows;
  for (std::int64_t blk = b0; blk < b1; ++blk) {
    const std::uint8_t* s = stream + blk * (k / 32) * kW8a8ChunkBytes;
    const std::int64_t r = blk * kBlockRows, live = std::min(out - r, kBlockRows);
    const auto mask = static_cast<__mmask16>(live >= 16 ? 0xFFFFu : (1u << live) - 1u);
    const __m512i offset = _mm512_loadu_si512(offsets + r);
    const __m512 factor = _mm512_loadu_ps(factors + r);
    for (std::int64_t i0 = 0; i0 < m; i0 += kTileRows) {
      const std::int64_t mi = std::min(m - i0, kTileRows);
      const std::uint8_t* x = x_u8 + i0 * k;
      const bool prefetch = i0 == 0;
      __m512i sums[kTileRows];
      switch (mi) {
        case 1: w8a8_block<1>(s, index, k, x, prefetch, sums); break;
        case 2: w8a8_block<2>(s, index, k, x, prefetch, sums); break;
        case 3: w8a8_block<3>(s, index, k, x, prefetch, sums); break;
        case 4: w8a8_block<4>(s, index, k, x, prefetch, sums); break;
        case 5: w8a8_block<5>(s, index, k, x, prefetch, sums); break;
        case 6: w8a8_block<6>(s, index, k, x, prefetch, sums); break;
        case 7: w8a8_block<7>(s, index, k, x, prefetch, sums); break;
        default: w8a8_block<8>(s, index, k, x, prefetch, sums); break;
      }
      for (std::int64_t i = 0; i < mi; ++i) {
        _mm512_mask_storeu_ps(y + (i0 + i) * ldy + r, mask, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[i], offset)), factor));
      }
    }
  }
}

}  // namespace mopt::kernels::avx512
