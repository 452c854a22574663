#include <immintrin.h>

#include "quant/fake_quant_simd.h"

namespace mopt::quant::avx2 {

namespace {

inline __m256 abs8(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

// 1.0f where the mask is set, 0.0f elsewhere.
inline __m256 step(__m256 mask) { return _mm256_and_ps(mask, _mm256_set1_ps(1.0f)); }

}  // namespace

void block16_abs_max(const float* x, std::int64_t blocks, float* out) {
  for (std::int64_t b = 0; b < blocks; ++b) {
    // MAXPS gives its second operand when the first is NaN: a NaN |x| leaves the running max.
    __m256 m = _mm256_max_ps(abs8(_mm256_loadu_ps(x + 16 * b)), _mm256_setzero_ps());
    m = _mm256_max_ps(abs8(_mm256_loadu_ps(x + 16 * b + 8)), m);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    out[b] = _mm_cvtss_f32(h);
  }
}

void round_e2m1_blocks16(const float* x, const float* scales, std::int64_t blocks, float* y) {
  const __m256 sign = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
  const __m256 t025 = _mm256_set1_ps(0.25f), t075 = _mm256_set1_ps(0.75f), t125 = _mm256_set1_ps(1.25f);
  const __m256 t175 = _mm256_set1_ps(1.75f), t25 = _mm256_set1_ps(2.5f), t35 = _mm256_set1_ps(3.5f), t5 = _mm256_set1_ps(5.0f);
  for (std::int64_t b = 0; b < blocks; ++b) {
    const __m256 s = _mm256_set1_ps(scales[b]);
    for (int half = 0; half < 2; ++half) {
      const float* xp = x + 16 * b + 8 * half;
      const __m256 v = _mm256_loadu_ps(xp);
      const __m256 a = _mm256_div_ps(abs8(v), s);
      // round_e2m1_magnitude's steps; every partial sum is a multiple of 0.5 below 16, so exact in
      // any order.
      __m256 r = _mm256_add_ps(_mm256_add_ps(step(_mm256_cmp_ps(a, t025, _CMP_GT_OQ)), step(_mm256_cmp_ps(a, t075, _CMP_GE_OQ))),
                               _mm256_add_ps(step(_mm256_cmp_ps(a, t125, _CMP_GT_OQ)), step(_mm256_cmp_ps(a, t175, _CMP_GE_OQ))));
      r = _mm256_mul_ps(r, _mm256_set1_ps(0.5f));
      r = _mm256_add_ps(r, _mm256_add_ps(step(_mm256_cmp_ps(a, t25, _CMP_GT_OQ)), step(_mm256_cmp_ps(a, t35, _CMP_GE_OQ))));
      r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(2.0f), step(_mm256_cmp_ps(a, t5, _CMP_GT_OQ))));
      r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_set1_ps(6.0f), step(_mm256_cmp_ps(a, a, _CMP_UNORD_Q))));
      const __m256 q = _mm256_mul_ps(r, s);
      // Negative where x is negative or NaN (not x >= 0), as with_sign_of.
      const __m256 negative = _mm256_cmp_ps(v, zero, _CMP_NGE_UQ);
      _mm256_storeu_ps(y + 16 * b + 8 * half, _mm256_xor_ps(q, _mm256_and_ps(negative, sign)));
    }
  }
}

}  // namespace mopt::quant::avx2
