// The AVX-512 GEMV of the 2:4 sparse Linear (its AVX2 twin is in qlinear_simd.h). Called only
// after the CPU check (AVX-512 F); layout as kernels/sparse24.h; k % 32 == 0; m <= 4 input rows
// `k` apart, y rows `ldy` apart; type 0 bf16, 1 int8, 2 e4m3 (f32 row scales).
#pragma once

#include <cstdint>

namespace mopt::kernels {
// The block layouts of INT4 and W8A8 (sparse24.h): rows per block, and bytes per 32 inputs of a block
// (64 of positions, then 128 of kept nibbles or 256 of kept int8 codes).
inline constexpr std::int64_t kBlockRows = 16;
inline constexpr std::int64_t kInt4ChunkBytes = 192;
inline constexpr std::int64_t kW8a8ChunkBytes = 320;
}  // namespace mopt::kernels

namespace mopt::kernels::avx512 {

void gemv_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0,
                   std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// Rows [r0, r1) decoded into f32 rows of k (zeros included), the same values as the plain decoding.
void dequantize_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k,
                         std::int64_t r0, std::int64_t r1, float* out);

// INT4 rows [r0, r1) (Sparse24Linear's int4 stream and block scales, k % 64 == 0, block % 64 == 0)
// decoded into f32 rows of k, as the plain decoding (AVX-512 F).
void dequantize_sparse24_int4(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                              std::int64_t r1, float* out);

// W8A8 (after the check for AVX-512 BW, VBMI and VNNI; k % 32 == 0): Sparse24Linear's W8A8 block
// stream, offsets and factors (per row of the padded blocks); y[i * ldy + r] = (sum_t x_u8[i * k +
// column(t)] * value(t) - offsets[r]) * factors[r] for weight rows [r0, min(r1, out)) (r0 a multiple
// of kBlockRows) and input rows [0, m), the input given as int8 codes biased by 128 (unsigned bytes).
void gemm_sparse24_w8a8(const std::uint8_t* stream, const std::int32_t* offsets, const float* factors, std::int64_t k, std::int64_t r0,
                        std::int64_t r1, std::int64_t out, const std::uint8_t* x_u8, std::int64_t m, float* y, std::int64_t ldy);

// INT4 (the same check, k % 64 == 0, block % 64 == 0, m <= 4): Sparse24Linear's int4 stream and block
// scales, the input as quantize_int8_per64 rounds it (codes [m, k], steps [m, k / 64]); y[i * ldy + r]
// for weight rows [r0, min(r1, out)), r0 a multiple of kBlockRows (the blocks that hold them run whole).
void gemv_sparse24_int4(const std::uint8_t* stream, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0, std::int64_t r1,
                        std::int64_t out, const std::int8_t* x_codes, const float* x_steps, int m, float* y, std::int64_t ldy);

}  // namespace mopt::kernels::avx512
