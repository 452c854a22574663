// Small AVX-512 helpers shared by the bf16 kernels (gemm_avx512.cpp, gemm_amx.cpp): included only by
// files compiled with -mavx512f -mavx512bw -mavx512bf16.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace mopt::kernels::avx512 {

// 32 f32 (fewer with a mask, the rest zeros) -> 16 dwords of bf16 pairs, round to nearest even.
inline __m512i f32x32_to_bf16_pairs(const float* src, std::int64_t n) {
  const __mmask16 lo = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u);
  const __mmask16 hi = static_cast<__mmask16>(n >= 32 ? 0xFFFF : n <= 16 ? 0u : (1u << (n - 16)) - 1u);
  const __m512 a = _mm512_maskz_loadu_ps(lo, src);
  const __m512 b = _mm512_maskz_loadu_ps(hi, src + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
}

// 16 vectors of 16 dwords (r[i] = row i) -> their transpose: out[j] = (r[0][j], ..., r[15][j]).
inline void transpose_16x16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // Per 128-bit lane L: u[4g + e] = rows 4g..4g+3 of element 4L + e.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i v = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), w = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88), w2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    r[0 + e] = _mm512_shuffle_i32x4(v, v2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(w, w2, 0x88);
    r[8 + e] = _mm512_shuffle_i32x4(v, v2, 0xDD);
    r[12 + e] = _mm512_shuffle_i32x4(w, w2, 0xDD);
  }
}

}  // namespace mopt::kernels::avx512
