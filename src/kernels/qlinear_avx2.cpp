#include <immintrin.h>

#include <cmath>

#include <algorithm>

#include "kernels/prefetch.h"
#include "kernels/qlinear_simd.h"

namespace mopt::kernels::avx2 {

namespace {

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

std::int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 16 E4M3 codes -> two f32 vectors of their values times 2^-8: the code's
// exponent and mantissa moved into an F16's (bias 15 instead of 7), then F16C.
inline void e4m3x16_times_2m8(__m128i bytes, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_cvtepi8_epi16(bytes);  // sign-extended: bits 8..15 repeat the sign
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16(static_cast<short>(0xBFFF)));
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// The weight streams from memory: ask for what comes 1 KiB later while this is used.
inline void prefetch_ahead(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchAhead, _MM_HINT_T0); }

// Low 8 int8 of v -> f32.
inline __m256 i8x8_to_f32(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

// The 32 int8 of v -> four f32 vectors (inputs 0-7, 8-15, 16-23, 24-31).
inline void i8x32_to_f32(__m256i v, __m256* w) {
  const __m128i a = _mm256_castsi256_si128(v), b = _mm256_extracti128_si256(v, 1);
  w[0] = i8x8_to_f32(a);
  w[1] = i8x8_to_f32(_mm_srli_si128(a, 8));
  w[2] = i8x8_to_f32(b);
  w[3] = i8x8_to_f32(_mm_srli_si128(b, 8));
}

// Independent FMA chains per input row (the latency of one chain would bound the GEMV):
// four for one row, two each for more.
template <int M>
inline constexpr int kChains = M == 1 ? 4 : 2;

template <int M>
inline __m256 sum_chains(const __m256* a) {
  __m256 s = _mm256_add_ps(a[0], a[1]);
  if constexpr (kChains<M> == 4) s = _mm256_add_ps(s, _mm256_add_ps(a[2], a[3]));
  return s;
}

// The group of each 32-input half of a row, in order: with groups that are a multiple of 32 a half
// never straddles two groups (with groups of 32 the low nibbles of a chunk are one group, the high
// ones the next).
class HalfGroups {
 public:
  explicit HalfGroups(std::int64_t group) : per_group_(group / 32), left_(per_group_) {}
  // The group of the next half.
  std::int64_t next() {
    const std::int64_t g = g_;
    if (--left_ == 0) {
      ++g_;
      left_ = per_group_;
    }
    return g;
  }

 private:
  std::int64_t per_group_, left_, g_ = 0;
};

// sum of a[i] * b[i], i < n.
float dot(const float* a, const float* b, std::int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Groups of a multiple of 64: whole chunks per group, the int32 products of a group summed before its scale
// (the last group may be shorter).
template <int M>
void gemv_int4_m(const std::uint8_t* nibbles, const float* scales, std::int64_t group, std::int64_t k, std::int64_t r0,
                 std::int64_t r1, const Int8Blocks& x, float* y, std::int64_t ldy) {
  const std::int64_t chunks = k / 64, groups = (k + group - 1) / group, per_group = group / 64;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const float* sr = scales + r * groups;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (std::int64_t g = 0; g < groups; ++g) {
      __m256 gacc[M];
      for (int i = 0; i < M; ++i) gacc[i] = _mm256_setzero_ps();
      const std::int64_t c_end = std::min(chunks, (g + 1) * per_group);
      for (std::int64_t c = g * per_group; c < c_end; ++c) {
        prefetch_ahead(wr + c * 32);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
        const __m256i lo = _mm256_and_si256(b, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
        for (int i = 0; i < M; ++i) {
          const std::int8_t* xq = x.codes + i * k + c * 64;
          // Unsigned nibble (0..15) x signed code (-127..127): pairs stay far from int16's limit.
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
                                             _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32))));
          const __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
          gacc[i] = _mm256_fmadd_ps(d, _mm256_broadcast_ss(x.steps + i * chunks + c), gacc[i]);
        }
      }
      const __m256 s = _mm256_broadcast_ss(sr + g);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(gacc[i], s, acc[i]);
    }
    for (int i = 0; i < M; ++i) y[i * ldy + r] = hsum(acc[i]) - 8.0f * dot(sr, x.offsets + i * groups, groups);
  }
}

// Groups of a multiple of 32 that is not one of 64 (32, 96, ...): the two halves of a chunk can belong to
// different groups, so each half's int32 products get their own scale (step x group scale) and their own
// accumulator (two FMA chains per input row, as many as the whole-chunk kernel's group and row chains).
template <int M>
void gemv_int4_halves_m(const std::uint8_t* nibbles, const float* scales, std::int64_t group, std::int64_t k, std::int64_t r0,
                        std::int64_t r1, const Int8Blocks& x, float* y, std::int64_t ldy) {
  const std::int64_t chunks = k / 64, groups = (k + group - 1) / group;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const float* sr = scales + r * groups;
    __m256 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    HalfGroups halves(group);
    for (std::int64_t c = 0; c < chunks; ++c) {
      prefetch_ahead(wr + c * 32);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      const __m256i lo = _mm256_and_si256(b, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
      const float s_lo = sr[halves.next()];
      const float s_hi = sr[halves.next()];
      for (int i = 0; i < M; ++i) {
        const std::int8_t* xq = x.codes + i * k + c * 64;
        const __m256i p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))), ones);
        const __m256i p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32))), ones);
        const float step = x.steps[i * chunks + c];
        acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_lo), _mm256_set1_ps(step * s_lo), acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_hi), _mm256_set1_ps(step * s_hi), acc[i][1]);
      }
    }
    for (int i = 0; i < M; ++i) {
      y[i * ldy + r] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) - 8.0f * dot(sr, x.offsets + i * groups, groups);
    }
  }
}

// Groups of exactly 32: the same products as gemv_int4_halves_m, with the halves' factors (step x scale)
// made eight at a time (four chunks: one vector multiply of eight scales by the four steps, each twice)
// and read back by broadcast loads, instead of a scalar multiply and a broadcast per half.
template <int M>
void gemv_int4_g32_m(const std::uint8_t* nibbles, const float* scales, std::int64_t k, std::int64_t r0, std::int64_t r1,
                     const Int8Blocks& x, float* y, std::int64_t ldy) {
  const std::int64_t chunks = k / 64, groups = k / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i twice = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  alignas(32) float factor[M][8];
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const float* sr = scales + r * groups;
    __m256 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    const auto chunk = [&](std::int64_t c, const float* f_lo, const float* f_hi, std::int64_t f_stride) {
      prefetch_ahead(wr + c * 32);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      const __m256i lo = _mm256_and_si256(b, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
      for (int i = 0; i < M; ++i) {
        const std::int8_t* xq = x.codes + i * k + c * 64;
        const __m256i p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))), ones);
        const __m256i p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32))), ones);
        acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_lo), _mm256_broadcast_ss(f_lo + i * f_stride), acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p_hi), _mm256_broadcast_ss(f_hi + i * f_stride), acc[i][1]);
      }
    };
    std::int64_t c = 0;
    for (; c + 4 <= chunks; c += 4) {
      prefetch_ahead(sr + 2 * c);  // the scales are a second stream, a quarter of the codes' bytes
      const __m256 s = _mm256_loadu_ps(sr + 2 * c);
      for (int i = 0; i < M; ++i) {
        const __m256 steps = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(x.steps + i * chunks + c)), twice);
        _mm256_store_ps(factor[i], _mm256_mul_ps(s, steps));
      }
      for (int q = 0; q < 4; ++q) chunk(c + q, &factor[0][2 * q], &factor[0][2 * q + 1], 8);
    }
    for (; c < chunks; ++c) {
      for (int i = 0; i < M; ++i) {
        factor[i][0] = x.steps[i * chunks + c] * sr[2 * c];
        factor[i][1] = x.steps[i * chunks + c] * sr[2 * c + 1];
      }
      chunk(c, &factor[0][0], &factor[0][1], 8);
    }
    for (int i = 0; i < M; ++i) {
      y[i * ldy + r] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) - 8.0f * dot(sr, x.offsets + i * groups, groups);
    }
  }
}

template <int M>
void gemv_int4_fp8_table_m(const std::uint8_t* nibbles, const std::uint8_t* tables, float table_scale, std::int64_t group,
                           std::int64_t k, std::int64_t r0, std::int64_t r1, const float* x, float* y, std::int64_t ldy) {
  const std::int64_t groups = (k + group - 1) / group;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const float out_scale = table_scale * 256.0f;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const std::uint8_t* tr = tables + r * groups * 16;
    // Independent accumulators: one FMA chain would wait on its latency.
    __m256 acc[M][4];
    for (int i = 0; i < M; ++i) {
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
    }
    HalfGroups halves(group);
    for (std::int64_t c = 0; c < k / 64; ++c) {
      prefetch_ahead(wr + c * 32);
      // Each half's table (the same one unless a group boundary falls between the halves).
      const __m256i table_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tr + halves.next() * 16)));
      const __m256i table_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tr + halves.next() * 16)));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      const __m256i lo = _mm256_shuffle_epi8(table_lo, _mm256_and_si256(b, low4));
      const __m256i hi = _mm256_shuffle_epi8(table_hi, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
      __m256 w[8];
      e4m3x16_times_2m8(_mm256_castsi256_si128(lo), w[0], w[1]);
      e4m3x16_times_2m8(_mm256_extracti128_si256(lo, 1), w[2], w[3]);
      e4m3x16_times_2m8(_mm256_castsi256_si128(hi), w[4], w[5]);
      e4m3x16_times_2m8(_mm256_extracti128_si256(hi, 1), w[6], w[7]);
      for (int i = 0; i < M; ++i) {
        const float* xr = x + i * k + c * 64;
        for (int t = 0; t < 8; ++t) acc[i][t % 4] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * t), w[t], acc[i][t % 4]);
      }
    }
    for (int i = 0; i < M; ++i) {
      y[i * ldy + r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]))) * out_scale;
    }
  }
}

template <int M>
void gemv_e2m1_m(const std::uint8_t* nibbles, const std::uint8_t* scale_codes, const float* values_half, std::int64_t block,
                 std::int64_t k, std::int64_t r0, std::int64_t r1, const float* x, float* y, std::int64_t ldy) {
  const std::int64_t nb = k / block;
  const int vectors_per_block = static_cast<int>(block / 8);  // 2 or 4
  const int blocks_per_chunk = 8 / vectors_per_block;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  // 2 x E2M1 by code: 0, .5, 1, 1.5, 2, 3, 4, 6 and their negatives.
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2,
                                       -3, -4, -6, -8, -12);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const std::uint8_t* sc = scale_codes + r * nb;
    __m256 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (std::int64_t c = 0; c < k / 64; ++c) {
      prefetch_ahead(wr + c * 32);
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      __m256 w[8];
      i8x32_to_f32(_mm256_shuffle_epi8(lut, _mm256_and_si256(b, low4)), w);
      i8x32_to_f32(_mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4)), w + 4);
      for (int q = 0; q < blocks_per_chunk; ++q) {
        const __m256 s = _mm256_broadcast_ss(values_half + sc[c * blocks_per_chunk + q]);
        for (int i = 0; i < M; ++i) {
          const float* xr = x + i * k + c * 64 + q * block;
          __m256 t = _mm256_mul_ps(_mm256_loadu_ps(xr), w[q * vectors_per_block]);
          for (int v = 1; v < vectors_per_block; ++v) t = _mm256_fmadd_ps(_mm256_loadu_ps(xr + 8 * v), w[q * vectors_per_block + v], t);
          acc[i][q & 1] = _mm256_fmadd_ps(t, s, acc[i][q & 1]);
        }
      }
    }
    for (int i = 0; i < M; ++i) y[i * ldy + r] = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
  }
}

template <int M>
void gemv_int8_m(const std::int8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                 std::int64_t r1, const float* x, float* y, std::int64_t ldy) {
  const std::int64_t nb = (k + block - 1) / block;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int8_t* wr = codes + r * k;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < nb; ++b) {
      __m256 bacc[M][kChains<M>];
      for (int i = 0; i < M; ++i) {
        for (int j = 0; j < kChains<M>; ++j) bacc[i][j] = _mm256_setzero_ps();
      }
      const std::int64_t end = std::min(k, (b + 1) * block);
      std::int64_t p = b * block;
      for (; p + 32 <= end; p += 32) {
        prefetch_ahead(wr + p);
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + p));
        __m256 w[4];
        i8x32_to_f32(v, w);
        for (int i = 0; i < M; ++i) {
          for (int t = 0; t < 4; ++t) {
            constexpr int n = kChains<M>;
            bacc[i][t % n] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + p + 8 * t), w[t], bacc[i][t % n]);
          }
        }
      }
      for (; p < end; p += 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + p));
        const __m256 w0 = i8x8_to_f32(v), w1 = i8x8_to_f32(_mm_srli_si128(v, 8));
        for (int i = 0; i < M; ++i) {
          bacc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + p), w0, bacc[i][0]);
          bacc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + p + 8), w1, bacc[i][1]);
        }
      }
      const __m256 s = _mm256_broadcast_ss(scales + r * nb + b);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(sum_chains<M>(bacc[i]), s, acc[i]);
    }
    for (int i = 0; i < M; ++i) y[i * ldy + r] = hsum(acc[i]);
  }
}

template <int M>
void gemv_e4m3_m(const std::uint8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                 std::int64_t r1, const float* x, float* y, std::int64_t ldy) {
  const std::int64_t nb = (k + block - 1) / block;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = codes + r * k;
    __m256 acc[M];
    for (int i = 0; i < M; ++i) acc[i] = _mm256_setzero_ps();
    for (std::int64_t b = 0; b < nb; ++b) {
      __m256 bacc[M][kChains<M>];
      for (int i = 0; i < M; ++i) {
        for (int j = 0; j < kChains<M>; ++j) bacc[i][j] = _mm256_setzero_ps();
      }
      const std::int64_t end = std::min(k, (b + 1) * block);
      std::int64_t p = b * block;
      for (; p + 32 <= end; p += 32) {
        prefetch_ahead(wr + p);
        __m256 w[4];
        e4m3x16_times_2m8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + p)), w[0], w[1]);
        e4m3x16_times_2m8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + p + 16)), w[2], w[3]);
        for (int i = 0; i < M; ++i) {
          for (int t = 0; t < 4; ++t) {
            constexpr int n = kChains<M>;
            bacc[i][t % n] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + p + 8 * t), w[t], bacc[i][t % n]);
          }
        }
      }
      for (; p < end; p += 16) {
        __m256 w0, w1;
        e4m3x16_times_2m8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + p)), w0, w1);
        for (int i = 0; i < M; ++i) {
          bacc[i][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + p), w0, bacc[i][0]);
          bacc[i][1] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * k + p + 8), w1, bacc[i][1]);
        }
      }
      const __m256 s = _mm256_set1_ps(scales[r * nb + b] * 256.0f);
      for (int i = 0; i < M; ++i) acc[i] = _mm256_fmadd_ps(sum_chains<M>(bacc[i]), s, acc[i]);
    }
    for (int i = 0; i < M; ++i) y[i * ldy + r] = hsum(acc[i]);
  }
}

// MR input rows x NR weight rows of the W8A8 product over the whole k32.
template <int MR, int NR>
void int8_tile(const std::int8_t* w, std::int64_t k32, const std::int8_t* x, const float* factor, float* y, std::int64_t ldy) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
  }
  for (std::int64_t p = 0; p < k32; p += 32) {
    __m256i wv[NR];
    for (int j = 0; j < NR; ++j) {
      if constexpr (MR < 4) prefetch_ahead(w + j * k32 + p);  // decode streams the weight; prefill finds it in the cache
      wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * k32 + p));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i * k32 + p));
      const __m256i ax = _mm256_abs_epi8(xv);  // -128 becomes 0x80, which is 128 read unsigned
      for (int j = 0; j < NR; ++j) {
        // |x| (unsigned) times sign(x) * w (w in -127..127): each pair at most 2 * 128 * 127 < 2^15.
        const __m256i t = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[j], xv));
        acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(t, ones));
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = static_cast<float>(hsum_epi32(acc[i][j])) * factor[j];
  }
}

template <int MR, int NR = 2>
void int8_rows(const std::int8_t* w, std::int64_t k32, std::int64_t r0, std::int64_t r1, const std::int8_t* x, const float* factor,
               float* y, std::int64_t ldy) {
  std::int64_t r = r0;
  for (; r + NR <= r1; r += NR) int8_tile<MR, NR>(w + r * k32, k32, x, factor + r, y + r, ldy);
  for (; r < r1; ++r) int8_tile<MR, 1>(w + r * k32, k32, x, factor + r, y + r, ldy);
}

}  // namespace

void gemv_int4(const std::uint8_t* nibbles, const float* scales, std::int64_t group, std::int64_t k, std::int64_t r0,
               std::int64_t r1, const Int8Blocks& x, int m, float* y, std::int64_t ldy) {
  if (group == 32) {
    switch (m) {
      case 1: return gemv_int4_g32_m<1>(nibbles, scales, k, r0, r1, x, y, ldy);
      case 2: return gemv_int4_g32_m<2>(nibbles, scales, k, r0, r1, x, y, ldy);
      case 3: return gemv_int4_g32_m<3>(nibbles, scales, k, r0, r1, x, y, ldy);
      default: return gemv_int4_g32_m<4>(nibbles, scales, k, r0, r1, x, y, ldy);
    }
  }
  if (group % 64 != 0) {
    switch (m) {
      case 1: return gemv_int4_halves_m<1>(nibbles, scales, group, k, r0, r1, x, y, ldy);
      case 2: return gemv_int4_halves_m<2>(nibbles, scales, group, k, r0, r1, x, y, ldy);
      case 3: return gemv_int4_halves_m<3>(nibbles, scales, group, k, r0, r1, x, y, ldy);
      default: return gemv_int4_halves_m<4>(nibbles, scales, group, k, r0, r1, x, y, ldy);
    }
  }
  switch (m) {
    case 1: return gemv_int4_m<1>(nibbles, scales, group, k, r0, r1, x, y, ldy);
    case 2: return gemv_int4_m<2>(nibbles, scales, group, k, r0, r1, x, y, ldy);
    case 3: return gemv_int4_m<3>(nibbles, scales, group, k, r0, r1, x, y, ldy);
    default: return gemv_int4_m<4>(nibbles, scales, group, k, r0, r1, x, y, ldy);
  }
}

void gemv_int4_fp8_table(const std::uint8_t* nibbles, const std::uint8_t* tables, float table_scale, std::int64_t group,
                         std::int64_t k, std::int64_t r0, std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (m) {
    case 1: return gemv_int4_fp8_table_m<1>(nibbles, tables, table_scale, group, k, r0, r1, x, y, ldy);
    case 2: return gemv_int4_fp8_table_m<2>(nibbles, tables, table_scale, group, k, r0, r1, x, y, ldy);
    case 3: return gemv_int4_fp8_table_m<3>(nibbles, tables, table_scale, group, k, r0, r1, x, y, ldy);
    default: return gemv_int4_fp8_table_m<4>(nibbles, tables, table_scale, group, k, r0, r1, x, y, ldy);
  }
}

void gemv_e2m1(const std::uint8_t* nibbles, const std::uint8_t* scale_codes, const float* code_values_half, std::int64_t block,
               std::int64_t k, std::int64_t r0, std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (m) {
    case 1: return gemv_e2m1_m<1>(nibbles, scale_codes, code_values_half, block, k, r0, r1, x, y, ldy);
    case 2: return gemv_e2m1_m<2>(nibbles, scale_codes, code_values_half, block, k, r0, r1, x, y, ldy);
    case 3: return gemv_e2m1_m<3>(nibbles, scale_codes, code_values_half, block, k, r0, r1, x, y, ldy);
    default: return gemv_e2m1_m<4>(nibbles, scale_codes, code_values_half, block, k, r0, r1, x, y, ldy);
  }
}

void gemv_int8(const std::int8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
               std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (m) {
    case 1: return gemv_int8_m<1>(codes, scales, block, k, r0, r1, x, y, ldy);
    case 2: return gemv_int8_m<2>(codes, scales, block, k, r0, r1, x, y, ldy);
    case 3: return gemv_int8_m<3>(codes, scales, block, k, r0, r1, x, y, ldy);
    default: return gemv_int8_m<4>(codes, scales, block, k, r0, r1, x, y, ldy);
  }
}

void gemv_e4m3(const std::uint8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
               std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (m) {
    case 1: return gemv_e4m3_m<1>(codes, scales, block, k, r0, r1, x, y, ldy);
    case 2: return gemv_e4m3_m<2>(codes, scales, block, k, r0, r1, x, y, ldy);
    case 3: return gemv_e4m3_m<3>(codes, scales, block, k, r0, r1, x, y, ldy);
    default: return gemv_e4m3_m<4>(codes, scales, block, k, r0, r1, x, y, ldy);
  }
}

// 2:4 rows, 32 inputs (16 kept values) at a time: the kept values decoded into two vectors of 8, the
// input gathered to match by the 2-bit positions (index 4 * group + position into 16 inputs: one
// permute of each 8-input half, the half chosen by bit 3 of the index).
template <int Type, int M>
void gemv_sparse24_m(const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, const float* x, float* y, std::int64_t ldy) {
  constexpr std::int64_t eb = Type == 0 ? 2 : 1;
  const std::int64_t chunks = k / 32;
  const __m256i shift_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shift_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i three = _mm256_set1_epi32(3);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* vr = values + r * (k / 2) * eb;
    const std::uint32_t* pr = positions + r * chunks;
    __m256 acc[M][2];
    for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (std::int64_t c = 0; c < chunks; ++c) {
      prefetch_ahead(vr + c * 16 * eb);
      const __m256i word = _mm256_set1_epi32(static_cast<int>(pr[c]));
      const __m256i idx0 = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, shift_lo), three), base);
      const __m256i idx1 = _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(word, shift_hi), three), base);
      const __m256 high0 = _mm256_castsi256_ps(_mm256_slli_epi32(idx0, 28));  // sign = bit 3: the upper 8 inputs
      const __m256 high1 = _mm256_castsi256_ps(_mm256_slli_epi32(idx1, 28));
      __m256 v0, v1;
      if constexpr (Type == 0) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + c * 32));
        v0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
        v1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
      } else if constexpr (Type == 1) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + c * 16));
        v0 = i8x8_to_f32(b);
        v1 = i8x8_to_f32(_mm_srli_si128(b, 8));
      } else {
        e4m3x16_times_2m8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vr + c * 16)), v0, v1);
      }
      for (int i = 0; i < M; ++i) {
        const float* xc = x + i * k + c * 32;
        const __m256 g0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), idx0),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), idx0), high0);
        const __m256 g1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 16), idx1),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 24), idx1), high1);
        acc[i][0] = _mm256_fmadd_ps(g0, v0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(g1, v1, acc[i][1]);
      }
    }
    const float scale = Type == 0 ? 1.0f : Type == 1 ? scales[r] : scales[r] * 256.0f;
    for (int i = 0; i < M; ++i) y[i * ldy + r] = hsum(_mm256_add_ps(acc[i][0], acc[i][1])) * scale;
  }
}

template <int Type>
void gemv_sparse24_type(const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0,
                        std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (m) {
    case 1: return gemv_sparse24_m<Type, 1>(values, positions, scales, k, r0, r1, x, y, ldy);
    case 2: return gemv_sparse24_m<Type, 2>(values, positions, scales, k, r0, r1, x, y, ldy);
    case 3: return gemv_sparse24_m<Type, 3>(values, positions, scales, k, r0, r1, x, y, ldy);
    default: return gemv_sparse24_m<Type, 4>(values, positions, scales, k, r0, r1, x, y, ldy);
  }
}

void gemv_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k,
                   std::int64_t r0, std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy) {
  switch (type) {
    case 0: return gemv_sparse24_type<0>(values, positions, scales, k, r0, r1, x, m, y, ldy);
    case 1: return gemv_sparse24_type<1>(values, positions, scales, k, r0, r1, x, m, y, ldy);
    default: return gemv_sparse24_type<2>(values, positions, scales, k, r0, r1, x, m, y, ldy);
  }
}

// 4 input rows x 2 weight rows per tile: the best of 2x4, 3x3, 3x4, 4x3 and 4x2 measured with
// bench/qlinear_bench on the development machine (AVX2, 16 registers).
constexpr int kMR = 4, kNR = 2;

void quantize_int8(const float* x, std::int64_t n, float scale, std::int8_t* codes) {
  const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  // packs interleave the 128-bit lanes: put the 4-byte groups back in input order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  std::int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i q[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    }
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; i < n; ++i) {
    const float v = std::nearbyint(x[i] * scale);
    codes[i] = static_cast<std::int8_t>(v >= 127.0f ? 127.0f : v >= -128.0f ? v : -128.0f);
  }
}

void int8_gemm(const std::int8_t* w, std::int64_t k32, std::int64_t r0, std::int64_t r1, const std::int8_t* x, std::int64_t m,
               const float* factor, float* y, std::int64_t ldy) {
  // Weight rows in panels that stay in the L2 cache while every input row passes over them.
  const std::int64_t panel = std::max<std::int64_t>(2, (256 * 1024) / std::max<std::int64_t>(k32, 1) / 2 * 2);
  for (std::int64_t p0 = r0; p0 < r1; p0 += panel) {
    const std::int64_t p1 = std::min(r1, p0 + panel);
    std::int64_t i = 0;
    for (; i + kMR <= m; i += kMR) int8_rows<kMR, kNR>(w, k32, p0, p1, x + i * k32, factor, y + i * ldy, ldy);
    // Fewer than kMR input rows (decode): one weight row at a time; two weight streams at once
    // read the memory slower than one (measured: 1 row 8.7 GB/s, 2 rows 6.8 GB/s, 2 threads).
    switch (m - i) {
      case 1: int8_rows<1, 1>(w, k32, p0, p1, x + i * k32, factor, y + i * ldy, ldy); break;
      case 2: int8_rows<2, 1>(w, k32, p0, p1, x + i * k32, factor, y + i * ldy, ldy); break;
      case 3: int8_rows<3, 1>(w, k32, p0, p1, x + i * k32, factor, y + i * ldy, ldy); break;
      default: break;
    }
  }
}

void dequantize_int4(const std::uint8_t* nibbles, const float* scales, std::int64_t group, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, float* out) {
  const std::int64_t groups = (k + group - 1) / group;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i eight = _mm256_set1_epi8(8);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const float* sr = scales + r * groups;
    float* o = out + (r - r0) * k;
    HalfGroups halves(group);
    for (std::int64_t c = 0; c < k / 64; ++c) {
      const __m256 s_lo = _mm256_broadcast_ss(sr + halves.next());
      const __m256 s_hi = _mm256_broadcast_ss(sr + halves.next());
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      __m256 w[8];
      i8x32_to_f32(_mm256_sub_epi8(_mm256_and_si256(b, low4), eight), w);
      i8x32_to_f32(_mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), low4), eight), w + 4);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(o + c * 64 + 8 * t, _mm256_mul_ps(w[t], t < 4 ? s_lo : s_hi));
    }
  }
}

void dequantize_int4_fp8_table(const std::uint8_t* nibbles, const std::uint8_t* tables, float table_scale, std::int64_t group,
                               std::int64_t k, std::int64_t r0, std::int64_t r1, float* out) {
  const std::int64_t groups = (k + group - 1) / group;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256 s = _mm256_set1_ps(table_scale * 256.0f);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    const std::uint8_t* tr = tables + r * groups * 16;
    float* o = out + (r - r0) * k;
    HalfGroups halves(group);
    for (std::int64_t c = 0; c < k / 64; ++c) {
      const __m256i table_lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tr + halves.next() * 16)));
      const __m256i table_hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tr + halves.next() * 16)));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      const __m256i lo = _mm256_shuffle_epi8(table_lo, _mm256_and_si256(b, low4));
      const __m256i hi = _mm256_shuffle_epi8(table_hi, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
      __m256 w[8];
      e4m3x16_times_2m8(_mm256_castsi256_si128(lo), w[0], w[1]);
      e4m3x16_times_2m8(_mm256_extracti128_si256(lo, 1), w[2], w[3]);
      e4m3x16_times_2m8(_mm256_castsi256_si128(hi), w[4], w[5]);
      e4m3x16_times_2m8(_mm256_extracti128_si256(hi, 1), w[6], w[7]);
      for (int t = 0; t < 8; ++t) _mm256_storeu_ps(o + c * 64 + 8 * t, _mm256_mul_ps(w[t], s));
    }
  }
}

void dequantize_e2m1(const std::uint8_t* nibbles, const std::uint8_t* scale_codes, const float* code_values_half, std::int64_t block,
                     std::int64_t k, std::int64_t r0, std::int64_t r1, float* out) {
  const std::int64_t nb = k / block;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2,
                                       -3, -4, -6, -8, -12);
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = nibbles + r * (k / 2);
    float* o = out + (r - r0) * k;
    for (std::int64_t c = 0; c < k / 64; ++c) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + c * 32));
      __m256 w[8];
      i8x32_to_f32(_mm256_shuffle_epi8(lut, _mm256_and_si256(b, low4)), w);
      i8x32_to_f32(_mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4)), w + 4);
      for (int t = 0; t < 8; ++t) {
        const std::int64_t col = c * 64 + 8 * t;
        const __m256 s = _mm256_broadcast_ss(code_values_half + scale_codes[r * nb + col / block]);
        _mm256_storeu_ps(o + col, _mm256_mul_ps(w[t], s));
      }
    }
  }
}

void dequantize_int8(const std::int8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, float* out) {
  const std::int64_t nb = (k + block - 1) / block;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::int8_t* wr = codes + r * k;
    float* o = out + (r - r0) * k;
    for (std::int64_t p = 0; p < k; p += 16) {
      const __m256 s = _mm256_broadcast_ss(scales + r * nb + p / block);
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + p));
      _mm256_storeu_ps(o + p, _mm256_mul_ps(i8x8_to_f32(v), s));
      _mm256_storeu_ps(o + p + 8, _mm256_mul_ps(i8x8_to_f32(_mm_srli_si128(v, 8)), s));
    }
  }
}

void dequantize_e4m3(const std::uint8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, float* out) {
  const std::int64_t nb = (k + block - 1) / block;
  for (std::int64_t r = r0; r < r1; ++r) {
    const std::uint8_t* wr = codes + r * k;
    float* o = out + (r - r0) * k;
    for (std::int64_t p = 0; p < k; p += 16) {
      const __m256 s = _mm256_set1_ps(scales[r * nb + p / block] * 256.0f);
      __m256 w0, w1;
      e4m3x16_times_2m8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + p)), w0, w1);
      _mm256_storeu_ps(o + p, _mm256_mul_ps(w0, s));
      _mm256_storeu_ps(o + p + 8, _mm256_mul_ps(w1, s));
    }
  }
}

}  // namespace mopt::kernels::avx2
