#include <immintrin.h>

#include "core/convert.h"
#include "kernels/prefetch.h"
#include "kernels/linear_simd.h"

namespace mopt::kernels::avx2 {

namespace {
float horizontal_sum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
}  // namespace

float dot_f32(const float* x, const void* w_row, std::int64_t k) {
  const auto* w = static_cast<const float*>(w_row);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  std::int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p), _mm256_loadu_ps(w + p), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p + 8), _mm256_loadu_ps(w + p + 8), a1);
  }
  float s = horizontal_sum(_mm256_add_ps(a0, a1));
  for (; p < k; ++p) s += x[p] * w[p];
  return s;
}

float dot_bf16(const float* x, const void* w_row, std::int64_t k) {
  const auto* w = static_cast<const std::uint16_t*>(w_row);
  // Four independent FMA chains (one would wait on the FMA latency instead of on memory).
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  std::int64_t p = 0;
  for (; p + 32 <= k; p += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(w + p) + kPrefetchAhead, _MM_HINT_T0);
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p));
    const __m256i g = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p + 16));
    const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
    const __m256 w2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(g)), 16));
    const __m256 w3 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(g, 1)), 16));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p + 8), w1, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p + 16), w2, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p + 24), w3, a3);
  }
  for (; p + 16 <= k; p += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p));
    const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
    const __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p + 8), w1, a1);
  }
  float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; p < k; ++p) s += x[p] * bf16_to_f32(w[p]);
  return s;
}

float dot_f16(const float* x, const void* w_row, std::int64_t k) {
  const auto* w = static_cast<const std::uint16_t*>(w_row);
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  std::int64_t p = 0;
  for (; p + 16 <= k; p += 16) {
    const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p)));
    const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + p + 8)));
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p), w0, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + p + 8), w1, a1);
  }
  float s = horizontal_sum(_mm256_add_ps(a0, a1));
  for (; p < k; ++p) s += x[p] * f16_to_f32(w[p]);
  return s;
}

}  // namespace mopt::kernels::avx2
