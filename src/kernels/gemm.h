// f32 matrix products: y[m, n] (+)= x[m, k] · w[n, k]ᵀ, the shape of a Linear
// layer (PyTorch stores weights [out, in]). The fast version calls the BLAS;
// the reference is the plain triple loop it is tested against.
#pragma once

#include <cstdint>

namespace mopt::kernels {

void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate = false);

// The same product with a leading dimension for y (columns [0, n) of rows of ldy floats).
void gemm_f32_strided(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y,
                      std::int64_t ldy, bool accumulate);

namespace ref {
void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate = false);
}

}  // namespace mopt::kernels
