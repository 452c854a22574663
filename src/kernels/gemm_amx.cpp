#include "kernels/gemm_amx.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

#include "core/cpu_features.h"
#include "core/thread_pool.h"
#include "kernels/avx512_bf16_util.h"

namespace mopt::kernels::amx {

namespace {

using avx512::f32x32_to_bf16_pairs;
using avx512::transpose_16x16;

constexpr std::int64_t kGroup = 16;  // columns of a B tile, rows of an A or C tile
constexpr std::int64_t kDepth = 32;  // bf16 values per tile row

// The tile configuration: eight tiles of 16 rows x 64 bytes (C: 16 x 16 f32; A: 16 x 32 bf16;
// B: 16 pairs x 16 columns). Tiles 0-3 hold a 32 x 32 block of C, 4-5 two A tiles, 6-7 two B tiles.
struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

// Loads the configuration on the calling thread once and never releases it: LDTILECFG and TILERELEASE
// per item cost more than a small product's tiles. This holds only while nothing else on mopt's
// threads touches the tiles (no other AMX code is linked: OpenBLAS's bf16 GEMM, which releases them,
// is never called); the cost is the tile state (8 KiB) saved with each such thread on a switch.
void load_tile_config() {
  thread_local bool loaded = false;
  if (loaded) return;
  loaded = true;
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

__mmask16 first_n(std::int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : n <= 0 ? 0u : (1u << n) - 1u);
}

// 32 f32 of src, the first n of them (zeros after), as 16 dwords of bf16 pairs; zeros when n <= 0.
__m512i pairs_of(const float* src, std::int64_t n) { return n <= 0 ? _mm512_setzero_si512() : f32x32_to_bf16_pairs(src, n); }

// Rows lo and hi (16 f32 each) -> 16 dwords lo_bf16 | hi_bf16 << 16.
__m512i interleave_rows(__m512 lo, __m512 hi) {
  const __m512i both = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // lo's 16 bf16, then hi's
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2,
                                         17, 1, 16, 0);
  return _mm512_permutexvar_epi16(index, both);
}

// op(A) rows [i0, i0 + 16) into `out`, their A tiles (16 rows x 32 values, 1 KiB) one after another
// along k: A [m, k] untransposed.
void pack_a_rows(std::int64_t i0, std::int64_t m, std::int64_t k, std::int64_t kp, const float* a, std::int64_t lda, std::uint16_t* out) {
  for (std::int64_t i = 0; i < kGroup; ++i) {
    for (std::int64_t c = 0; c < kp; c += kDepth) {
      _mm512_storeu_si512(out + c * kGroup + i * kDepth, i0 + i < m ? pairs_of(a + (i0 + i) * lda + c, k - c) : _mm512_setzero_si512());
    }
  }
}

// The same from A [k, m] (op(A) = Aᵀ), for op(A)'s columns [c, c + 32) of every row: 16 x 16 f32
// blocks transposed, then rounded. (Per 32 rows of A: reading whole rows keeps the loads in few pages;
// a 16-column strip down all of A's rows would touch a page per row or two.)
void pack_a_columns(std::int64_t c, std::int64_t m, std::int64_t mp, std::int64_t k, std::int64_t kp, const float* a, std::int64_t lda,
                    std::uint16_t* out) {
  __m512i lo[16], hi[16];
  for (std::int64_t i0 = 0; i0 < mp; i0 += kGroup) {
    const __mmask16 cols = first_n(m - i0);
    for (std::int64_t t = 0; t < 16; ++t) {
      lo[t] = c + t < k ? _mm512_castps_si512(_mm512_maskz_loadu_ps(cols, a + (c + t) * lda + i0)) : _mm512_setzero_si512();
      hi[t] = c + 16 + t < k ? _mm512_castps_si512(_mm512_maskz_loadu_ps(cols, a + (c + 16 + t) * lda + i0)) : _mm512_setzero_si512();
    }
    transpose_16x16(lo);
    transpose_16x16(hi);
    for (std::int64_t i = 0; i < kGroup; ++i) {
      const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_castsi512_ps(hi[i]), _mm512_castsi512_ps(lo[i])));
      _mm512_storeu_si512(out + i0 * kp + c * kGroup + i * kDepth, v);
    }
  }
}

// One 32 x 32 block of C from 32 packed A rows and two B column groups. The tiles always sum from
// zero and C is added once after (never loaded into the tiles, whose every step would round at C's
// magnitude): an element's bits do not depend on whether its block is whole or at an edge.
void block_32x32(const std::uint16_t* ap, std::int64_t kp, const std::uint32_t* b0, const std::uint32_t* b1, float* c, std::int64_t ldc,
                 std::int64_t rows, std::int64_t cols, bool accumulate) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (std::int64_t d = 0; d < kp; d += kDepth) {
    _tile_loadd(4, ap + d * kGroup, 64);
    _tile_loadd(5, ap + 16 * kp + d * kGroup, 64);
    _tile_loadd(6, b0 + d / 2 * kGroup, 64);
    _tile_loadd(7, b1 + d / 2 * kGroup, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  if (rows == 32 && cols == 32 && !accumulate) {
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(2, c + 16 * ldc, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
    return;
  }
  alignas(64) float buf[32 * 32];
  _tile_stored(0, buf, 128);
  _tile_stored(1, buf + 16, 128);
  _tile_stored(2, buf + 16 * 32, 128);
  _tile_stored(3, buf + 16 * 32 + 16, 128);
  const __mmask16 lo = first_n(cols), hi = first_n(cols - 16);
  for (std::int64_t i = 0; i < rows; ++i) {
    float* row = c + i * ldc;
    __m512 v0 = _mm512_load_ps(buf + i * 32), v1 = _mm512_load_ps(buf + i * 32 + 16);
    if (accumulate) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(lo, row), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(hi, row + 16), v1);
    }
    _mm512_mask_storeu_ps(row, lo, v0);
    _mm512_mask_storeu_ps(row + 16, hi, v1);
  }
}

}  // namespace

bool amx_bf16_ready() {
  static const bool ready = [] {
    if (!cpu_features().amx_bf16) return false;
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  return ready;
}

void pack_b(bool transpose_b, std::int64_t k, std::int64_t n, const float* b, std::int64_t ldb, std::uint32_t* out) {
  const std::int64_t kp = round_up_32(k), groups = round_up_32(n) / kGroup, pairs = kp / 2;
  parallel_for(groups, [&](std::int64_t g) {
    const std::int64_t j0 = g * kGroup;
    std::uint32_t* dst = out + g * pairs * kGroup;
    if (!transpose_b) {
      // Rows 2p and 2p + 1 of B, 16 columns each.
      const __mmask16 cols = first_n(n - j0);
      for (std::int64_t p = 0; p < pairs; ++p) {
        const __m512 lo = 2 * p < k ? _mm512_maskz_loadu_ps(cols, b + 2 * p * ldb + j0) : _mm512_setzero_ps();
        const __m512 hi = 2 * p + 1 < k ? _mm512_maskz_loadu_ps(cols, b + (2 * p + 1) * ldb + j0) : _mm512_setzero_ps();
        _mm512_storeu_si512(dst + p * kGroup, interleave_rows(lo, hi));
      }
      return;
    }
    // B [n, k]: 16 rows of B give 16 columns of op(B); their pairs, transposed 16 x 16 at a time.
    __m512i r[16];
    for (std::int64_t c = 0; c < kp; c += kDepth) {
      for (std::int64_t t = 0; t < 16; ++t) r[t] = j0 + t < n ? pairs_of(b + (j0 + t) * ldb + c, k - c) : _mm512_setzero_si512();
      transpose_16x16(r);
      for (std::int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(dst + (c / 2 + p) * kGroup, r[p]);
    }
  });
}

void multiply(bool transpose_a, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const std::uint32_t* packed_b,
              std::int64_t b_pairs, float* c, std::int64_t ldc, bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum: zeros, or C unchanged
    for (std::int64_t i = 0; i < m && !accumulate; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  const std::int64_t kp = round_up_32(k), mp = round_up_32(m), pairs = b_pairs;
  // op(A) rounded once, in A tiles (per thread that calls: a product inside a pool item runs alone).
  thread_local std::vector<std::uint16_t> a_packed;
  // Grown, never shrunk nor cleared: resize() would zero what it adds on every product.
  if (a_packed.size() < static_cast<std::size_t>(mp * kp)) a_packed.resize(static_cast<std::size_t>(mp * kp));
  std::uint16_t* ap = a_packed.data();
  if (transpose_a) parallel_for(kp / kDepth, [&](std::int64_t d) { pack_a_columns(d * kDepth, m, mp, k, kp, a, lda, ap); });
  else parallel_for(mp / kGroup, [&](std::int64_t g) { pack_a_rows(g * kGroup, m, k, kp, a, lda, ap + g * kGroup * kp); });
  // Items: a chunk of columns (op(B)'s chunk at most ~1 MiB, kept in L2 while every row block reads
  // it) x 32 rows (their A, in L1 while every column of the chunk uses it); at least ~8 per thread.
  const std::int64_t row_blocks = mp / 32, np = round_up_32(n);
  std::int64_t chunk_cols = std::clamp<std::int64_t>((std::int64_t{1} << 20) / (kp * 2) / 32 * 32, 32, np);
  const std::int64_t wanted = 8 * std::int64_t{compute_threads()};
  if (row_blocks * ((np + chunk_cols - 1) / chunk_cols) < wanted) {
    const std::int64_t chunks_wanted = (wanted + row_blocks - 1) / row_blocks;
    chunk_cols = std::max<std::int64_t>(32, round_up_32((np + chunks_wanted - 1) / chunks_wanted));
  }
  const std::int64_t chunks = (n + chunk_cols - 1) / chunk_cols;
  parallel_for(chunks * row_blocks, [&](std::int64_t item) {
    const std::int64_t j_begin = item / row_blocks * chunk_cols, i0 = item % row_blocks * 32;
    const std::int64_t j_end = std::min(n, j_begin + chunk_cols), rows = std::min<std::int64_t>(32, m - i0);
    load_tile_config();
    for (std::int64_t j0 = j_begin; j0 < j_end; j0 += 32) {
      const std::uint32_t* b0 = packed_b + j0 / kGroup * pairs * kGroup;
      block_32x32(ap + i0 * kp, kp, b0, b0 + pairs * kGroup, c + i0 * ldc + j0, ldc, rows, std::min<std::int64_t>(32, j_end - j0), accumulate);
    }
  });
}

}  // namespace mopt::kernels::amx
