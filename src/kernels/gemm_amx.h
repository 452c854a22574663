// Products on bf16 operands with AMX tiles (TDPBF16PS: Intel Sapphire Rapids and later), the kernels of
// kernels::Bf16Operand (gemm.h). Compiled with -mamx-tile -mamx-bf16 and AVX-512 BF16; called only
// where amx_bf16_ready() holds.
//
// Layouts. op(B) [k, n] is packed once into "VNNI pairs": for each group of 16 columns, k/2 rows of
// 16 dwords, dword (p, j) = op(B)[2p][j] | op(B)[2p + 1][j] << 16 in bf16 (k rounded up to 32, n to
// 32, zeros past them), which is the layout of TDPBF16PS's B tile (16 pairs x 16 columns per 1 KiB).
// op(A) [m, k] (m rounded up to 32, k to 32) is packed per product into A tiles, 16 rows x 32 bf16
// values (1 KiB), each 16 rows' tiles one after another along k: contiguous tile loads ran ~20%
// faster than 16 rows read from bf16 rows of the whole k. Every value is rounded to bf16 to nearest even (VCVTNE2PS2BF16,
// which also flushes f32 denormals to zero); the tiles sum the products in f32.
#pragma once

#include <cstdint>

namespace mopt::kernels::amx {

// The tile configuration is loaded once per thread and kept: nothing else on mopt's threads may use
// (or release) the tiles.
//
// Whether this process may use the AMX tiles: the CPU has AMX-TILE and AMX-BF16, the operating system
// enables their state, and Linux granted this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
// asked once). False elsewhere, and under MOPT_ISA=avx2 or scalar.
bool amx_bf16_ready();

constexpr std::int64_t round_up_32(std::int64_t v) { return (v + 31) / 32 * 32; }

// The dwords pack_b needs for op(B) [k, n]: round_up_32(n) / 16 groups x round_up_32(k) / 2 x 16.
constexpr std::int64_t packed_b_dwords(std::int64_t k, std::int64_t n) { return round_up_32(n) * round_up_32(k) / 2; }

// Packs op(B) [k, n] (B [k, n] with rows ldb apart, or transposed: B [n, k]) into `out`
// (packed_b_dwords(k, n) of them), on the pool.
void pack_b(bool transpose_b, std::int64_t k, std::int64_t n, const float* b, std::int64_t ldb, std::uint32_t* out);

// C[m, n] = op(A) · op(B), plus C when `accumulate`, with op(B) packed by pack_b; op(A) is A [m, k] or,
// transposed, Aᵀ of A [k, m]. b_pairs: the pairs per column group of that packing (round_up_32(its
// k) / 2): a packing of a larger op(B) [K >= k, N >= n] serves its leading k x n block (its rows past
// k meet op(A)'s zero padding, so they must be finite). On the pool; every element's sum runs in the
// same order whatever the thread count.
void multiply(bool transpose_a, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const std::uint32_t* packed_b,
              std::int64_t b_pairs, float* c, std::int64_t ldc, bool accumulate);

}  // namespace mopt::kernels::amx
