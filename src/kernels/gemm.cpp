#include "kernels/gemm.h"

#include <cblas.h>

namespace mopt::kernels {

void gemm_f32_strided(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y,
                      std::int64_t ldy, bool accumulate) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(n),
              static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k), w, static_cast<blasint>(k), accumulate ? 1.0f : 0.0f, y,
              static_cast<blasint>(ldy));
}

void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate) {
  gemm_f32_strided(x, m, k, w, n, y, n, accumulate);
}

namespace ref {
void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate) {
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < k; ++p) s += static_cast<double>(x[i * k + p]) * static_cast<double>(w[j * k + p]);
      y[i * n + j] = static_cast<float>(accumulate ? y[i * n + j] + s : s);
    }
  }
}
}  // namespace ref

}  // namespace mopt::kernels
