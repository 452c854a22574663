// y[m, n] = x[m, k] · Wᵀ (+ bias) for a weight W [n, k] kept in its checkpoint
// dtype (f32, f16 or bf16) and widened on use.
//  - few rows (decode): a GEMV that widens W in registers, threads over rows of W;
//  - many rows (prefill): with Precision::f32, W widened tile by tile into f32 and multiplied by
//    the BLAS; with Precision::bf16 where bf16_kernels_chosen(), bf16 and f16 weights run the bf16
//    kernels (gemm.h; f32 weights always take the f32 path).
#pragma once

#include <algorithm>
#include <cstdint>

#include "core/tensor.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"

namespace mopt::kernels {

void linear_forward(const float* x, std::int64_t m, const Tensor& weight, const Tensor* bias, float* y,
                    Precision precision = Precision::f32);

// y[i, j] += bias[j] for m rows of n (bias in any float dtype; nothing when null).
void add_bias(float* y, std::int64_t m, std::int64_t n, const Tensor* bias);

namespace ref {
// Widens the whole weight and multiplies with the reference GEMM.
void linear_forward(const float* x, std::int64_t m, const Tensor& weight, const Tensor* bias, float* y);
}

// Rows at or below which linear_forward takes the GEMV path.
inline constexpr std::int64_t kGemvMaxRows = 4;
// 16-bit weights take it up to this many rows (batched decode): each weight row is read from memory
// once for all of them, 1.5x the widened tiles for the f32 GEMM at 8 rows, 0.85x at 16
// (bench/sparse24_bench --rows, Sapphire Rapids).
inline constexpr std::int64_t kWideGemvMaxRows = 8;

// A GEMV of at most kGemvMaxRows input rows, gemv(i0, rows, r0, r1) for input rows [i0, i0 + rows) and
// weight rows [r0, r1), run for m input rows over the pool: one call per range where m fits, else
// passes of kGemvMaxRows input rows over each 16 weight rows, which stay in cache between passes.
// Ranges start at multiples of 16 rows (parallel_ranges cuts at multiples of the grain).
template <class Gemv>
void gemv_passes(std::int64_t n, std::int64_t m, const Gemv& gemv) {
  parallel_ranges(n, 16, [&](std::int64_t r0, std::int64_t r1) {
    if (m <= kGemvMaxRows) return gemv(std::int64_t{0}, static_cast<int>(m), r0, r1);
    for (std::int64_t rb = r0; rb < r1; rb += 16) {
      for (std::int64_t i0 = 0; i0 < m; i0 += kGemvMaxRows) gemv(i0, static_cast<int>(std::min(kGemvMaxRows, m - i0)), rb, std::min(rb + 16, r1));
    }
  });
}

}  // namespace mopt::kernels
