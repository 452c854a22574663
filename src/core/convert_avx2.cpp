// AVX2 + F16C + FMA versions of the bulk conversions. Bit-exact with the scalar
// definitions in convert.cpp (tests/core/convert_bulk_test.cpp checks it).
#include <immintrin.h>

#include <array>

#include "core/convert.h"
#include "core/convert_simd.h"

namespace mopt::avx2 {

void convert_bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t count) {
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(w));
  }
  for (; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
}

void convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i inf_bits = _mm256_set1_epi32(0x7F800000);
  const __m256i bias = _mm256_set1_epi32(0x7FFF);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i quiet = _mm256_set1_epi32(0x40);
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(src + i));
    const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, abs_mask), inf_bits);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(bias, odd)), 16);
    const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(bits, 16), quiet);
    const __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan);
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
  for (; i < count; ++i) dst[i] = f32_to_bf16(src[i]);
}

void convert_f16_to_f32(const std::uint16_t* src, float* dst, std::size_t count) {
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < count; ++i) dst[i] = f16_to_f32(src[i]);
}

void convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count) {
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < count; ++i) dst[i] = f32_to_f16(src[i]);
}

namespace {
std::array<float, 256> e4m3_table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) t[static_cast<std::size_t>(c)] = e4m3_to_f32(static_cast<std::uint8_t>(c));
  return t;
}
}  // namespace

void convert_e4m3_to_f32(const std::uint8_t* src, float* dst, std::size_t count) {
  static const std::array<float, 256> table = e4m3_table();
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
    const __m256i idx = _mm256_cvtepu8_epi32(b);
    _mm256_storeu_ps(dst + i, _mm256_i32gather_ps(table.data(), idx, 4));
  }
  for (; i < count; ++i) dst[i] = table[src[i]];
}

void convert_f32_to_e4m3(const float* src, std::uint8_t* dst, std::size_t count) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i inf_bits = _mm256_set1_epi32(0x7F800000);
  const __m256i sign_bit = _mm256_set1_epi32(0x80);
  const __m256i nan_code = _mm256_set1_epi32(0x7F);
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i round_bias = _mm256_set1_epi32(0x7FFFF);
  const __m256i rebias = _mm256_set1_epi32((127 - 7) << 3);
  const __m256 max_finite = _mm256_set1_ps(kE4M3Max);
  const __m256 min_normal = _mm256_set1_ps(0.015625f);  // 2^-6
  const __m256 subnormal_scale = _mm256_set1_ps(512.0f);  // 2^9: one step of the smallest subnormal
  std::size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(src + i));
    const __m256i abs_bits = _mm256_and_si256(bits, abs_mask);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), sign_bit);
    const __m256i is_nan = _mm256_cmpgt_epi32(abs_bits, inf_bits);
    // Clamp first: everything above 448 saturates to 448 anyway.
    const __m256 a = _mm256_min_ps(_mm256_castsi256_ps(abs_bits), max_finite);
    const __m256i ab = _mm256_castps_si256(a);
    // Normal range: round the f32 mantissa to 3 bits (ties to even), re-bias.
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(ab, 20), one);
    const __m256i rounded = _mm256_add_epi32(ab, _mm256_add_epi32(round_bias, odd));
    const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(rounded, 20), rebias);
    // Subnormal range: count smallest subnormals, rounding half to even (MXCSR default).
    const __m256i subnormal = _mm256_cvtps_epi32(_mm256_mul_ps(a, subnormal_scale));
    const __m256i is_subnormal = _mm256_castps_si256(_mm256_cmp_ps(a, min_normal, _CMP_LT_OQ));
    __m256i code = _mm256_blendv_epi8(normal, subnormal, is_subnormal);
    code = _mm256_blendv_epi8(code, nan_code, is_nan);
    code = _mm256_or_si256(code, sign);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_packus_epi16(words, words));
  }
  for (; i < count; ++i) dst[i] = f32_to_e4m3(src[i]);
}

}  // namespace mopt::avx2
