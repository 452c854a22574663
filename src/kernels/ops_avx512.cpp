#include <immintrin.h>

#include <cmath>

#include "kernels/ops_simd.h"

namespace mopt::kernels::avx512 {

namespace {

// avx2's exp8 on 16 lanes, the same operations in the same order: the same bits lane by lane.
__m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f);
  const __m512 ln2_lo = _mm512_set1_ps(1.42860682030941723212e-6f);
  const __m512 lo_limit = _mm512_set1_ps(-87.336f), hi_limit = _mm512_set1_ps(88.7228f);
  const __mmask16 too_small = _mm512_cmp_ps_mask(x, lo_limit, _CMP_LT_OQ);
  const __mmask16 too_large = _mm512_cmp_ps_mask(x, hi_limit, _CMP_GT_OQ);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo_limit), hi_limit);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, xc);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i half = _mm512_srai_epi32(ni, 1);
  const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, _mm512_set1_epi32(127)), 23));
  const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, half), _mm512_set1_epi32(127)), 23));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
  y = _mm512_maskz_mov_ps(static_cast<__mmask16>(~too_small), y);
  y = _mm512_mask_blend_ps(too_large, y, _mm512_set1_ps(INFINITY));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

__m256 low_half(__m512 v) { return _mm512_castps512_ps256(v); }
__m256 high_half(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

// avx2's lane_sum: the same additions.
float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace

float exp_shifted_sum(float* row, std::int64_t n, float shift) {
  const __m512 s = _mm512_set1_ps(shift);
  // Sums kept in 8 lanes, each 16 values' halves added in turn: avx2::exp_shifted_sum's order.
  __m256 total = _mm256_setzero_ps();
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), s));
    _mm512_storeu_ps(row + j, e);
    total = _mm256_add_ps(total, low_half(e));
    total = _mm256_add_ps(total, high_half(e));
  }
  if (j < n) {
    // Lanes past n hold -inf: e^-inf = 0 adds nothing (avx2 pads its last 8 so too).
    const auto mask = static_cast<__mmask16>((1u << (n - j)) - 1u);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, row + j), s));
    _mm512_mask_storeu_ps(row + j, mask, e);
    total = _mm256_add_ps(total, low_half(e));
    if (n - j > 8) total = _mm256_add_ps(total, high_half(e));
  }
  return lane_sum(total);
}

}  // namespace mopt::kernels::avx512
