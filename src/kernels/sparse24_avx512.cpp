// The AVX-512 GEMV of the 2:4 sparse Linear (kernels/sparse24.h): 32 inputs (16 kept values) per
// step, the input gathered from its two 16-float halves by one two-source permute (VPERMT2PS) with
// the index 4 * group + position built from the packed 2-bit positions. W8A8's kernel, on bytes, is in
// sparse24_avx512_vbmi.cpp.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/prefetch.h"
#include "kernels/sparse24_simd.h"

namespace mopt::kernels::avx512 {

namespace {

template <int Type, int M>
void gemv_m(const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0, std::int64_t r1,
            const float* x, float* y, std::int64_t ldy) {
  constexpr std::int64_t eb = Type == 0 ? 2 : 1;
  const std::int64_t chunks = k / 32;
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i three = _mm512_set1_epi32(3);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* vr = values + r * (k / 2) * eb;
    const std::uint32_t* pr = positions + r * chunks;
    __m512 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    // Four chunks per step (their index and value work independent), a prefetch per 64 bytes of values.
    const auto step = [&](std::int64_t c, int a) {
      // (word >> 2t) & 3 | 4 * (t / 2) in one ternary-logic op (0xEA: (a & b) | c; the base's low bits are 0).
      const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(pr[c])), shifts), three, base, 0xEA);
      __m512 v;
      if constexpr (Type == 0) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + c * 32));
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else if constexpr (Type == 1) {
        v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + c * 16))));
      } else {
        // E4M3 -> the F16 of its value times 2^-8 (exponent and mantissa moved up, bias 15 for 7).
        const __m256i s = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + c * 16)));
        v = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(s, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF))));
      }
      for (int i = 0; i < M; ++i) {
        const float* xc = x + i * k + c * 32;
        const __m512 g = _mm512_permutex2var_ps(_mm512_loadu_ps(xc), idx, _mm512_loadu_ps(xc + 16));
        acc[i][a] = _mm512_fmadd_ps(g, v, acc[i][a]);
      }
    };
    std::int64_t c = 0;
    for (; c + 4 <= chunks; c += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(vr + c * 16 * eb) + kPrefetchAhead, _MM_HINT_T0);
      if constexpr (eb == 2) _mm_prefetch(reinterpret_cast<const char*>(vr + c * 16 * eb) + kPrefetchAhead + 64, _MM_HINT_T0);
      step(c, 0);
      step(c + 1, 1);
      step(c + 2, 0);
      step(c + 3, 1);
    }
    for (; c < chunks; ++c) step(c, static_cast<int>(c & 1));
    const float scale = Type == 0 ? 1.0f : Type == 1 ? scales[r] : scales[r] * 256.0f;
    for (int i = 0; i < M; ++i) y[i * ldy + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) * scale;
  }
}

template <int Type>
void gemv_type(const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0, std::int64_t r1,
               const float* x, int m, float* y, std::int64_t ldy) {
  switch (m) {
    case 1: return gemv_m<Type, 1>(values, positions, scales, k, r0, r1, x, y, ldy);
    case 2: return gemv_m<Type, 2>(values, positions, scales, k, r0, r1, x, y, ldy);
    case 3: return gemv_m<Type, 3>(values, positions, scales, k, r0, r1, x, y, ldy);
    default: return gemv_m<Type, 4>(values, positions, scales, k, r0, r1, x, y, ldy);
  }
}

// Which inputs of a group its two kept values sit at (a 4-bit mask), by the group's 4-bit position code.
constexpr std::uint8_t kKeptMask[16] = {0x1, 0x3, 0x5, 0x9, 0x3, 0x2, 0x6, 0xA, 0x5, 0x6, 0x4, 0xC, 0x9, 0xA, 0xC, 0x8};

template <int Type>
void decode_rows_type(const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0,
                      std::int64_t r1, float* out) {
  constexpr std::int64_t eb = Type == 0 ? 2 : 1;
  const std::int64_t chunks = k / 32;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* vr = values + r * (k / 2) * eb;
    const std::uint32_t* pr = positions + r * chunks;
    const __m512 scale = _mm512_set1_ps(Type == 0 ? 1.0f : Type == 1 ? scales[r] : scales[r] * 256.0f);
    float* o = out + (r - r0) * k;
    for (std::int64_t c = 0; c < chunks; ++c) {
      __m512 v;
      if constexpr (Type == 0) {
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + c * 32))), 16));
      } else if constexpr (Type == 1) {
        v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + c * 16))));
      } else {
        const __m256i s = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + c * 16)));
        v = _mm512_cvtph_ps(_mm256_and_si256(_mm256_slli_epi16(s, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF))));
      }
      if constexpr (Type != 0) v = _mm512_mul_ps(v, scale);
      // The kept inputs of the 32 as a mask; kept values are in input order, eight per 16 inputs, so
      // expanding them into the mask's lanes puts each at its input and zeros elsewhere.
      const std::uint32_t word = pr[c];
      std::uint32_t mask = 0;
      for (int g = 0; g < 8; ++g) mask |= static_cast<std::uint32_t>(kKeptMask[(word >> (4 * g)) & 15u]) << (4 * g);
      _mm512_storeu_ps(o + c * 32, _mm512_maskz_expand_ps(static_cast<__mmask16>(mask & 0xFFFF), v));
      _mm512_storeu_ps(o + c * 32 + 16, _mm512_maskz_expand_ps(static_cast<__mmask16>(mask >> 16), _mm512_shuffle_f32x4(v, v, 0x0E)));
    }
  }
}

}  // namespace

void dequantize_sparse24_int4(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                              std::int64_t r1, float* out) {
  const std::int64_t chunks = k / 32, groups = (k + block - 1) / block;
  // A row's 16 kept values of 32 inputs come as 4 bytes of windows 0 (low nibbles) and 1 (high) and 4
  // of windows 2 and 3: in kept order after splitting the nibbles and this byte order.
  const __m128i kept_order = _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
  const __m512i eight = _mm512_set1_epi32(8);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int64_t lane = r % kBlockRows;
    const std::uint8_t* s = stream + (r / kBlockRows) * chunks * kInt4ChunkBytes;
    const float* sc = scales + (r / kBlockRows) * groups * kBlockRows + lane;
    float* o = out + (r - r0) * k;
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::uint8_t* p = s + c * kInt4ChunkBytes;
      std::uint32_t a, b;
      std::memcpy(&a, p + 64 + 4 * lane, 4);
      std::memcpy(&b, p + 128 + 4 * lane, 4);
      const std::uint64_t both = static_cast<std::uint64_t>(b) << 32 | a, nibbles = 0x0F0F0F0F0F0F0F0FULL;
      const __m128i split = _mm_set_epi64x(static_cast<long long>((both >> 4) & nibbles), static_cast<long long>(both & nibbles));
      const __m512i q = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(split, kept_order)), eight);
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(sc[((c * 32) / block) * kBlockRows]));
      // The kept inputs of each window (a byte of four 2-bit positions) as a mask of 8.
      std::uint32_t mask = 0;
      for (int u = 0; u < 4; ++u) {
        const unsigned positions = p[8 * (lane / 2) + 2 * u + lane % 2];
        mask |= static_cast<std::uint32_t>(kKeptMask[positions & 15u] | kKeptMask[positions >> 4] << 4) << (8 * u);
      }
      _mm512_storeu_ps(o + c * 32, _mm512_maskz_expand_ps(static_cast<__mmask16>(mask & 0xFFFF), v));
      _mm512_storeu_ps(o + c * 32 + 16, _mm512_maskz_expand_ps(static_cast<__mmask16>(mask >> 16), _mm512_shuffle_f32x4(v, v, 0x0E)));
    }
  }
}

void dequantize_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k,
                         std::int64_t r0, std::int64_t r1, float* out) {
  switch (type) {
    case 0: return decode_rows_type<0>(values, positions, scales, k, r0, r1, out);
    case 1: return decode_rows_type<1>(values, positions, scales, k, r0, r1, out);
    default: return decode_rows_type<2>(values, positions, scales, k, r0, r1, out);
  }
}

void gemv_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0,
                   std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (type) {
    case 0: return gemv_type<0>(values, positions, scales, k, r0, r1, x, m, y, ldy);
    case 1: return gemv_type<1>(values, positions, scales, k, r0, r1, x, m, y, ldy);
    default: return gemv_type<2>(values, positions, scales, k, r0, r1, x, m, y, ldy);
  }
}

}  // namespace mopt::kernels::avx512
