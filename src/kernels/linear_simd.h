// Vectorized dot products of f32 activations with a weight row widened in
// registers (AVX2 + FMA + F16C). Called only after the CPU check.
#pragma once

#include <cstdint>

namespace mopt::kernels::avx2 {
float dot_f32(const float* x, const void* w_row, std::int64_t k);
float dot_bf16(const float* x, const void* w_row, std::int64_t k);
float dot_f16(const float* x, const void* w_row, std::int64_t k);
}  // namespace mopt::kernels::avx2
