// Vectorized pieces of kernels/ops (AVX2 + FMA). Called only after the CPU check.
#pragma once

#include <cstdint>

namespace mopt::kernels::avx2 {

// e^x for 8 lanes at a time over x[0, n) in place: within 2 ulp of std::exp for x in
// [-87.336, 88.7228]; below, 0 (std::exp gives a subnormal there); above, +inf; NaN stays NaN.
void exp_inplace(float* x, std::int64_t n);
// row[j] = e^(row[j] - shift) for j in [0, n); returns their sum.
float exp_shifted_sum(float* row, std::int64_t n, float shift);
// Σ e^(x[i] - shift) over [0, n) in f64, each term within 2 ulp of std::exp(double(x[i]) - shift);
// shift >= every x[i] (terms below e^-708 count 0).
double exp_sum_f64(const float* x, std::int64_t n, double shift);
// sum = Σ e^(a[i] - shift) and weighted = Σ e^(a[i] - shift) * (a[i] - b[i]) over [0, n) in f64, a term
// whose e^ is 0 adding 0 to `weighted`; shift >= every a[i].
void exp_sum_weighted_difference(const float* a, const float* b, std::int64_t n, double shift, double& sum, double& weighted);
// The largest of x[0, n) (n >= 1; NaN lanes are skipped as std::max skips them on the right).
float max_of(const float* x, std::int64_t n);
// x[i] *= factor.
void scale(float* x, std::int64_t n, float factor);
// ds[i] = p[i] * (ds[i] - delta): the softmax's backward for one row.
void softmax_backward_row(const float* p, std::int64_t n, float delta, float* ds);
// gate[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up.
void silu_mul(float* gate, const float* up, std::int64_t n);
// The gradient of silu(gate) * up: dgate and dup from dh (kernels::silu_mul_backward).
void silu_mul_backward(const float* gate, const float* up, const float* dh, std::int64_t n, float* dgate, float* dup);

}  // namespace mopt::kernels::avx2

namespace mopt::kernels::avx512 {

// avx2::exp_shifted_sum on 16 lanes (AVX-512F), with the same bits: the same exponentials lane by
// lane, summed in the same order.
float exp_shifted_sum(float* row, std::int64_t n, float shift);

}  // namespace mopt::kernels::avx512
