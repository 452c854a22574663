#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "kernels/ops_simd.h"

namespace mopt::kernels::avx2 {

namespace {

// e^x: x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2 (ln2 in two parts so
// r is exact to f32), e^r by its degree-7 Taylor polynomial (truncation below 2^-27
// there), 2^n through the exponent bits. Lanes below -87.336 give 0, above ln(FLT_MAX) +inf.
inline __m256 exp8(__m256 x) {
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693145751953125f);
  const __m256 ln2_lo = _mm256_set1_ps(1.42860682030941723212e-6f);
  const __m256 lo_limit = _mm256_set1_ps(-87.336f), hi_limit = _mm256_set1_ps(88.7228f);
  const __m256 too_small = _mm256_cmp_ps(x, lo_limit, _CMP_LT_OQ);
  const __m256 too_large = _mm256_cmp_ps(x, hi_limit, _CMP_GT_OQ);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo_limit), hi_limit);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, ln2_hi, xc);
  r = _mm256_fnmadd_ps(n, ln2_lo, r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  // 2^n as n + 127 in the exponent field; n is in [-126, 128]: 2^128 in two halves.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_andnot_ps(too_small, y);
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), too_large);
  // NaN compares false both ways and was clamped: give it back.
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// e^x for 4 doubles with x <= 0 (a logit less its row's largest): x = n ln2 + r with
// n = round(x / ln2), |r| <= ln2 / 2 (ln2 in two parts, fdlibm's, so n ln2_hi is exact), e^r by its
// degree-13 Taylor polynomial (truncation below 2^-57 there), 2^n through the exponent bits.
// Lanes below -708 (or -inf) give 0; NaN stays NaN. Only for x <= 0: 2^n is not split.
inline __m256d exp4d_nonpositive(__m256d x) {
  const __m256d magic = _mm256_set1_pd(6755399441055744.0);  // 1.5 * 2^52: x + magic rounds x to an integer
  const __m256d nm = _mm256_fmadd_pd(x, _mm256_set1_pd(1.4426950408889634), magic);
  const __m256d n = _mm256_sub_pd(nm, magic);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
  static constexpr double kInverseFactorials[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                                  1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                                  1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                                  1.0 / 24.0,         1.0 / 6.0,         0.5,
                                                  1.0,                1.0};
  __m256d p = _mm256_set1_pd(kInverseFactorials[0]);
  for (int k = 1; k < 14; ++k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInverseFactorials[k]));
  // The low bits of nm hold n (two's complement under 2^51): n + 1023 into the exponent field.
  const __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_castpd_si256(nm), _mm256_set1_epi64x(1023)), 52);
  const __m256d y = _mm256_mul_pd(p, _mm256_castsi256_pd(e));
  return _mm256_andnot_pd(_mm256_cmp_pd(x, _mm256_set1_pd(-708.0), _CMP_LT_OQ), y);
}

inline double lane_sum(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}

// Elements [i, i + 4) of x as doubles, less `shift`; past n, `fill` (already shifted).
inline __m256d load4_shifted(const float* x, std::int64_t i, std::int64_t n, __m256d shift, double fill) {
  if (i + 4 <= n) return _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), shift);
  alignas(32) double tmp[4];
  for (std::int64_t j = 0; j < 4; ++j) tmp[j] = i + j < n ? static_cast<double>(x[i + j]) : fill;
  return _mm256_sub_pd(_mm256_load_pd(tmp), shift);
}

inline float lane_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The first `n` (< 8) floats of p, the rest `fill`.
inline __m256 load_partial(const float* p, std::int64_t n, float fill) {
  alignas(32) float tmp[8];
  for (int i = 0; i < 8; ++i) tmp[i] = i < n ? p[i] : fill;
  return _mm256_load_ps(tmp);
}

inline void store_partial(float* p, std::int64_t n, __m256 v) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}

}  // namespace

void exp_inplace(float* x, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
  if (i < n) store_partial(x + i, n - i, exp8(load_partial(x + i, n - i, 0.0f)));
}

float exp_shifted_sum(float* row, std::int64_t n, float shift) {
  const __m256 s = _mm256_set1_ps(shift);
  __m256 total = _mm256_setzero_ps();
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), s));
    _mm256_storeu_ps(row + j, e);
    total = _mm256_add_ps(total, e);
  }
  if (j < n) {
    // Padding lanes hold -inf: e^-inf = 0 adds nothing.
    const __m256 e = exp8(_mm256_sub_ps(load_partial(row + j, n - j, -INFINITY), s));
    store_partial(row + j, n - j, e);
    total = _mm256_add_ps(total, e);
  }
  return lane_sum(total);
}

float max_of(const float* x, std::int64_t n) {
  std::int64_t i = 0;
  float m = x[0];
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, v);
    for (const float l : lanes) m = std::max(m, l);
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

void scale(float* x, std::int64_t n, float factor) {
  const __m256 f = _mm256_set1_ps(factor);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), f));
  for (; i < n; ++i) x[i] *= factor;
}

void softmax_backward_row(const float* p, std::int64_t n, float delta, float* ds) {
  const __m256 d = _mm256_set1_ps(delta);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(ds + i, _mm256_mul_ps(_mm256_loadu_ps(p + i), _mm256_sub_ps(_mm256_loadu_ps(ds + i), d)));
  }
  for (; i < n; ++i) ds[i] = p[i] * (ds[i] - delta);
}

void silu_mul(float* gate, const float* up, std::int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_xor_ps(g, sign));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void silu_mul_backward(const float* gate, const float* up, const float* dh, std::int64_t n, float* dgate, float* dup) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i), u = _mm256_loadu_ps(up + i), d = _mm256_loadu_ps(dh + i);
    const __m256 sig = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(g, sign))));
    const __m256 silu = _mm256_mul_ps(g, sig);
    _mm256_storeu_ps(dup + i, _mm256_mul_ps(d, silu));
    // sig * (1 + g * (1 - sig))
    const __m256 slope = _mm256_mul_ps(sig, _mm256_fmadd_ps(g, _mm256_sub_ps(one, sig), one));
    _mm256_storeu_ps(dgate + i, _mm256_mul_ps(_mm256_mul_ps(d, u), slope));
  }
  for (; i < n; ++i) {
    const float g = gate[i];
    const float sig = 1.0f / (1.0f + std::exp(-g));
    dup[i] = dh[i] * (g * sig);
    dgate[i] = dh[i] * up[i] * (sig * (1.0f + g * (1.0f - sig)));
  }
}

double exp_sum_f64(const float* x, std::int64_t n, double shift) {
  const __m256d sh = _mm256_set1_pd(shift);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 = _mm256_add_pd(s0, exp4d_nonpositive(load4_shifted(x, i, n, sh, 0)));
    s1 = _mm256_add_pd(s1, exp4d_nonpositive(load4_shifted(x, i + 4, n, sh, 0)));
  }
  for (; i < n; i += 4) s0 = _mm256_add_pd(s0, exp4d_nonpositive(load4_shifted(x, i, n, sh, shift - 1000.0)));
  return lane_sum(_mm256_add_pd(s0, s1));
}

void exp_sum_weighted_difference(const float* a, const float* b, std::int64_t n, double shift, double& sum, double& weighted) {
  const __m256d sh = _mm256_set1_pd(shift), zero = _mm256_setzero_pd();
  __m256d s = zero, w = zero;
  for (std::int64_t i = 0; i < n; i += 4) {
    // Past n both rows read as shift - 1000: e^-1000 is 0 and the difference 0.
    const __m256d xa = load4_shifted(a, i, n, sh, shift - 1000.0), xb = load4_shifted(b, i, n, sh, shift - 1000.0);
    const __m256d e = exp4d_nonpositive(xa);
    // A term whose weight is 0 adds 0 (an -inf logit in `a` with any `b`).
    const __m256d d = _mm256_and_pd(_mm256_cmp_pd(e, zero, _CMP_GT_OQ), _mm256_sub_pd(xa, xb));
    s = _mm256_add_pd(s, e);
    w = _mm256_fmadd_pd(e, d, w);
  }
  sum = lane_sum(s);
  weighted = lane_sum(w);
}

}  // namespace mopt::kernels::avx2
