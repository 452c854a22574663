// The AVX-512 GEMV of the 2:4 sparse Linear (its AVX2 twin is in qlinear_simd.h). Called only
// after the CPU check (AVX-512 F); layout as kernels/sparse24.h; k % 32 == 0; m <= 4 input rows
// `k` apart, y rows `ldy` apart; type 0 bf16, 1 int8, 2 e4m3 (f32 row scales).
#pragma once

#include <cstdint>

namespace mopt::kernels::avx512 {

void gemv_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k, std::int64_t r0,
                   std::int64_t r1, const float* x, int m, float* y, std::int64_t ldy);

// Rows [r0, r1) decoded into f32 rows of k (zeros included), the same values as the plain decoding.
void dequantize_sparse24(int type, const std::uint8_t* values, const std::uint32_t* positions, const float* scales, std::int64_t k,
                         std::int64_t r0, std::int64_t r1, float* out);

}  // namespace mopt::kernels::avx512
