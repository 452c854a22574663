// AVX-512 pieces of the GEMM library (gemm.h), compiled with their own
// instruction-set flags and called only after the run-time CPU check.
//
// bf16 products: a panel of up to 64 weight rows is packed so that one
// 512-bit load holds, for 16 consecutive output columns, the weights of two
// consecutive inputs ([k/2][64][2] bf16: column c's pair of inputs 2p and
// 2p+1 at dword p * 64 + c); each input row's pair (x[2p], x[2p+1]) is
// broadcast and VDPBF16PS adds both products into the column's f32
// accumulator. Rows of x need no packing and the accumulators hold whole
// output columns, so nothing is reduced horizontally.
//
// int8 products (W8A8): the same panel with four inputs per dword
// ([k/4][64][4] int8) and VPDPBUSD, which multiplies unsigned by signed bytes:
// x is offset by 128 into 0..255 and 128 * (sum of the weight row) is taken
// away again, so every code (-128 included) is exact.
#pragma once

#include <cstdint>

namespace mopt::kernels::avx512 {

inline constexpr std::int64_t kPanelColumns = 64;
// Input rows are packed in blocks of 6 (a tile: 6 rows x 64 columns = 24 accumulators), the six
// rows' dwords side by side: [pairs (or quads)][6].
inline constexpr std::int64_t kRowBlock = 6;

// `rows` <= 6 input rows x [rows, k] f32 (ldx apart) -> one block [k_even / 2][6] of bf16 pairs,
// round to nearest even; missing rows and the odd input are zeros.
void pack_rows_bf16(const float* x, std::int64_t ldx, std::int64_t rows, std::int64_t k, std::uint32_t* block);
// `rows` <= 6 int8 input rows -> one block [k4 / 4][6] of their codes offset by 128 (unsigned);
// missing rows and inputs are the code 0 (128).
void pack_rows_uint8(const std::int8_t* x, std::int64_t ldx, std::int64_t rows, std::int64_t k, std::uint32_t* block);

// Packs `rows` <= 64 rows of a weight (f32 or bf16, rows ldw elements apart), inputs [0, k), into
// panel [k_even / 2][64] dwords; missing rows and the odd input are zeros. f32 rounds to nearest even.
void pack_panel_bf16(const std::uint16_t* w, std::int64_t ldw, std::int64_t rows, std::int64_t k, std::uint32_t* panel);
void pack_panel_f32(const float* w, std::int64_t ldw, std::int64_t rows, std::int64_t k, std::uint32_t* panel);

// y[i, c] (+)= sum over pairs p in [pair0, pair0 + pairs) of x[i, 2p..2p+1] · panel[p - pair0][c], for
// i < m, c < cols: xp holds ceil(m / 6) blocks of pairs_total pairs (pack_rows_bf16), panel the
// panel's pairs from pair0 on; y rows ldy apart. `accumulate` adds to y instead of overwriting it.
void gemm_bf16_panel(const std::uint32_t* xp, std::int64_t pairs_total, std::int64_t m, std::int64_t pair0, std::int64_t pairs,
                     const std::uint32_t* panel, std::int64_t cols, float* y, std::int64_t ldy, bool accumulate);

// Packs `rows` <= 64 int8 weight rows (ldw bytes apart), inputs [0, k), into panel [k4 / 4][64]
// dwords (k4 = k rounded up to 4; missing rows and inputs are zeros), and writes each packed column's
// 128 * sum of its codes into column_offsets[64].
void pack_panel_int8(const std::int8_t* w, std::int64_t ldw, std::int64_t rows, std::int64_t k, std::uint32_t* panel,
                     std::int32_t* column_offsets);

// y[i, c] = (sum over inputs of x[i, :] · w[c, :]) * factor[c] for i < m, c < cols, with x packed by
// pack_rows_uint8 (ceil(m / 6) blocks of quads_total) and the panel from pack_panel_int8, in passes
// over quads [quad0, quad0 + quads) (panel: that pass's slice) from the first to the last: until
// the last, y holds int32 sums (as their bits), then the results.
void gemm_int8_panel(const std::uint32_t* xp, std::int64_t quads_total, std::int64_t m, std::int64_t quad0, std::int64_t quads,
                     const std::uint32_t* panel, const std::int32_t* column_offsets, const float* factor, std::int64_t cols,
                     float* y, std::int64_t ldy);

// The bf16 tile's rate over an f32 FMA tile of the same shape (6 rows x 64 columns), both with
// their operands in L1, on the calling thread: the best of a few runs of about 0.2 ms each.
// VDPBF16PS does twice an FMA's products, but its rate differs by CPU: ~2x the f32 rate on AMD Zen 4,
// 0.7x on an Emerald Rapids Xeon (measured), where the f32 GEMM is the faster way.
double bf16_tile_over_fma_tile();

}  // namespace mopt::kernels::avx512
