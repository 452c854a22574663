// AVX2 kernels of the quantized Linear (qlinear.h), over rows [r0, r1) of
// the weight. Called only after the CPU check; layouts as PackedLinear::Layout.
// x rows are `k` apart, y rows `ldy` apart; m <= 4 rows in the GEMVs.
#pragma once

#include <cstdint>

namespace mopt::kernels::avx2 {

// Input of the INT4 GEMV: x rounded to int8 per 64 inputs.
struct Int8Blocks {
  const std::int8_t* codes;  // [m, k]
  const float* steps;        // [m, k/64] (amax/127 of each 64)
  const float* offsets;      // [m, groups]: sum over the group's inputs of step * code, for the -8 bias
};

// INT4 (biased nibbles) with f32 group scales [rows, groups], groups = ceil(k / group); k % 64 == 0 and
// group % 32 == 0 (with groups of 32 the low nibbles of a chunk take one scale, the high ones the next).
void gemv_int4(const std::uint8_t* nibbles, const float* scales, std::int64_t group, std::int64_t k, std::int64_t r0,
               std::int64_t r1, const Int8Blocks& x, int m, float* y, std::int64_t ldy);

// INT4 through per-block tables of 16 E4M3 codes ([rows, groups, 16]) times `table_scale`, f32 input;
// group % 32 == 0 as for gemv_int4.
void gemv_int4_fp8_table(const std::uint8_t* nibbles, const std::uint8_t* tables, float table_scale, std::int64_t group,
                         std::int64_t k, std::int64_t r0, std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// E2M1 with one scale code per `block` (16 or 32) inputs and `code_values_half` (what each code
// stands for, halved: the kernel works on 2 x E2M1, which is an integer), f32 input.
void gemv_e2m1(const std::uint8_t* nibbles, const std::uint8_t* scale_codes, const float* code_values_half, std::int64_t block,
               std::int64_t k, std::int64_t r0, std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// int8 codes [rows, k] with f32 scales per `block` inputs ([rows, ceil(k/block)]), f32 input.
void gemv_int8(const std::int8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
               std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// E4M3 codes [rows, k] with f32 scales per `block` inputs, f32 input.
void gemv_e4m3(const std::uint8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
               std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// 2:4 sparse weight rows (kernels/sparse24.h's layout; type 0 bf16, 1 int8, 2 e4m3 with f32 row
// scales), k % 32 == 0, f32 input.
void gemv_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k,
                   std::int64_t r0, std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// codes[i] = clamp(round-half-even(x[i] * scale), -128, 127) (W8A8's input; NaN gives -128).
void quantize_int8(const float* x, std::int64_t n, float scale, std::int8_t* codes);

// W8A8: int8 weight rows [rows, k32] (codes in -127..127) times int8 input rows [m, k32] (any code),
// k32 % 32 == 0; y[i, r] = (sum of products) * factor[r]. Any m (a GEMM for many rows).
void int8_gemm(const std::int8_t* w, std::int64_t k32, std::int64_t r0, std::int64_t r1, const std::int8_t* x, std::int64_t m,
               const float* factor, float* y, std::int64_t ldy);

// Rows [r0, r1) of the weight decoded to f32 into out [(r1 - r0), k]: the same values, bit for bit,
// as the plain decoding (one rounding: code value times scale).
void dequantize_int4(const std::uint8_t* nibbles, const float* scales, std::int64_t group, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, float* out);
void dequantize_int4_fp8_table(const std::uint8_t* nibbles, const std::uint8_t* tables, float table_scale, std::int64_t group,
                               std::int64_t k, std::int64_t r0, std::int64_t r1, float* out);
void dequantize_e2m1(const std::uint8_t* nibbles, const std::uint8_t* scale_codes, const float* code_values_half, std::int64_t block,
                     std::int64_t k, std::int64_t r0, std::int64_t r1, float* out);
void dequantize_int8(const std::int8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, float* out);
void dequantize_e4m3(const std::uint8_t* codes, const float* scales, std::int64_t block, std::int64_t k, std::int64_t r0,
                     std::int64_t r1, float* out);

}  // namespace mopt::kernels::avx2
