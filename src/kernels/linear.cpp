#include "kernels/linear.h"

#include <algorithm>
#include <vector>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/linear_simd.h"

namespace mopt::kernels {

namespace {

void check_shapes(const Tensor& weight, const Tensor* bias) {
  if (weight.rank() != 2) fail("linear: weight must be 2-D, got {}", shape_string(weight.shape()));
  const DType t = weight.dtype();
  if (t != DType::F32 && t != DType::F16 && t != DType::BF16) fail("linear: weight dtype {} is not f32, f16 or bf16", dtype_name(t));
  if (bias != nullptr && (bias->numel() != static_cast<std::uint64_t>(weight.dim(0)))) {
    fail("linear: bias of {} elements for {} outputs", bias->numel(), weight.dim(0));
  }
}

}  // namespace

void add_bias(float* y, std::int64_t m, std::int64_t n, const Tensor* bias) {
  if (bias == nullptr) return;
  if (bias->dtype() == DType::F32) {
    const float* b = bias->data<float>();
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t j = 0; j < n; ++j) y[i * n + j] += b[j];
    }
    return;
  }
  thread_local std::vector<float> b;  // reused: decoding allocates nothing per token
  b.resize(static_cast<std::size_t>(n));
  convert_to_f32(bias->dtype(), bias->bytes().data(), b.data(), static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) y[i * n + j] += b[static_cast<std::size_t>(j)];
  }
}

namespace {

// One dot product of f32 x with row `row` of the weight, widened on the fly.
using DotFn = float (*)(const float* x, const void* w_row, std::int64_t k);

float dot_scalar_f32(const float* x, const void* w, std::int64_t k) {
  const auto* r = static_cast<const float*>(w);
  float s = 0;
  for (std::int64_t p = 0; p < k; ++p) s += x[p] * r[p];
  return s;
}
float dot_scalar_bf16(const float* x, const void* w, std::int64_t k) {
  const auto* r = static_cast<const std::uint16_t*>(w);
  float s = 0;
  for (std::int64_t p = 0; p < k; ++p) s += x[p] * bf16_to_f32(r[p]);
  return s;
}
float dot_scalar_f16(const float* x, const void* w, std::int64_t k) {
  const auto* r = static_cast<const std::uint16_t*>(w);
  float s = 0;
  for (std::int64_t p = 0; p < k; ++p) s += x[p] * f16_to_f32(r[p]);
  return s;
}

DotFn dot_for(DType t) {
  const bool avx2 = avx2_kernels_available();
  switch (t) {
    case DType::F32: return avx2 ? avx2::dot_f32 : dot_scalar_f32;
    case DType::BF16: return avx2 ? avx2::dot_bf16 : dot_scalar_bf16;
    case DType::F16: return avx2 ? avx2::dot_f16 : dot_scalar_f16;
    default: fail("linear: no dot product for {}", dtype_name(t));
  }
}

}  // namespace

void linear_forward(const float* x, std::int64_t m, const Tensor& weight, const Tensor* bias, float* y, Precision precision) {
  check_shapes(weight, bias);
  const std::int64_t n = weight.dim(0);
  const std::int64_t k = weight.dim(1);
  const auto* w = reinterpret_cast<const std::uint8_t*>(weight.bytes().data());
  const std::int64_t row_bytes = k * dtype_bits(weight.dtype()) / 8;
  if (precision == Precision::bf16 && m > kGemvMaxRows && weight.dtype() != DType::F32 && bf16_kernels_chosen()) {
    if (weight.dtype() == DType::BF16) {
      gemm_bf16(x, m, k, reinterpret_cast<const std::uint16_t*>(w), k, n, y);
    } else {
      const DType t = weight.dtype();
      gemm_bf16(x, m, k, [&](std::int64_t r0, std::int64_t rows, float* out) {
        convert_to_f32(t, w + r0 * row_bytes, out, static_cast<std::size_t>(rows * k));
      }, n, y);
    }
  } else if (weight.dtype() == DType::F32 && m > kGemvMaxRows) {
    gemm_f32(x, m, k, weight.data<float>(), n, y);
  } else if (m <= (weight.dtype() == DType::F32 ? kGemvMaxRows : kWideGemvMaxRows)) {
    const DotFn dot = dot_for(weight.dtype());
    parallel_ranges(n, 16, [&](std::int64_t j0, std::int64_t j1) {
      for (std::int64_t j = j0; j < j1; ++j) {
        for (std::int64_t i = 0; i < m; ++i) y[i * n + j] = dot(x + i * k, w + j * row_bytes, k);
      }
    });
  } else {
    // Each task widens a block of weight rows to f32 and multiplies x with it.
    const DType t = weight.dtype();
    gemm_f32_rows(x, m, k, [&](std::int64_t r0, std::int64_t rows, float* out) {
      convert_to_f32(t, w + r0 * row_bytes, out, static_cast<std::size_t>(rows * k));
    }, n, y);
  }
  add_bias(y, m, n, bias);
}

namespace ref {
void linear_forward(const float* x, std::int64_t m, const Tensor& weight, const Tensor* bias, float* y) {
  check_shapes(weight, bias);
  const std::vector<float> w = weight.to_f32();
  kernels::ref::gemm_f32(x, m, weight.dim(1), w.data(), weight.dim(0), y);
  add_bias(y, m, weight.dim(0), bias);
}
}  // namespace ref

}  // namespace mopt::kernels
