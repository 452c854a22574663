#include "kernels/linalg.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "core/thread_pool.h"

namespace mopt::kernels {

namespace {

// The block of the factorization and of the inverse's products: 128 columns of doubles.
constexpr std::int64_t kBlock = 128;

std::int64_t blocks_of(std::int64_t n) { return (n + kBlock - 1) / kBlock; }

// Unblocked factorization of the diagonal block a[k0:k1, k0:k1] (leading dimension n) whose updates
// from the columns left of k0 are already applied.
bool factor_diagonal_block(double* a, std::int64_t n, std::int64_t k0, std::int64_t k1) {
  for (std::int64_t j = k0; j < k1; ++j) {
    double* row_j = a + j * n;
    double d = row_j[j];
    for (std::int64_t p = k0; p < j; ++p) d -= row_j[p] * row_j[p];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double root = std::sqrt(d);
    row_j[j] = root;
    for (std::int64_t i = j + 1; i < k1; ++i) {
      double* row_i = a + i * n;
      double s = row_i[j];
      for (std::int64_t p = k0; p < j; ++p) s -= row_i[p] * row_j[p];
      row_i[j] = s / root;
    }
  }
  return true;
}

}  // namespace

bool cholesky_lower(double* a, std::int64_t n) {
  start_thread_pool();  // OpenBLAS single-threaded on every thread
  const auto ld = static_cast<blasint>(n);
  // Right-looking: factor a diagonal block, solve the panel below it, update the trailing lower triangle.
  for (std::int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const std::int64_t k1 = std::min(n, k0 + kBlock), kb = k1 - k0;
    if (!factor_diagonal_block(a, n, k0, k1)) return false;
    if (k1 == n) break;
    const double* lkk = a + k0 * n + k0;
    const std::int64_t rest_blocks = blocks_of(n - k1);
    // Panel: a[k1:, k0:k1] = a[k1:, k0:k1] · L_kk^-T, one block of rows per item.
    parallel_for(rest_blocks, [&](std::int64_t b) {
      const std::int64_t i0 = k1 + b * kBlock, rows = std::min(kBlock, n - i0);
      cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, static_cast<blasint>(rows), static_cast<blasint>(kb),
                  1.0, lkk, ld, a + i0 * n + k0, ld);
    });
    // Trailing lower triangle: a[I, J] -= P_I · P_J^T for the panel's row blocks I >= J.
    std::vector<std::pair<std::int64_t, std::int64_t>> tiles;
    for (std::int64_t bi = 0; bi < rest_blocks; ++bi) {
      for (std::int64_t bj = 0; bj <= bi; ++bj) tiles.emplace_back(bi, bj);
    }
    parallel_for(static_cast<std::int64_t>(tiles.size()), [&](std::int64_t t) {
      const auto [bi, bj] = tiles[static_cast<std::size_t>(t)];
      const std::int64_t i0 = k1 + bi * kBlock, j0 = k1 + bj * kBlock;
      const auto ni = static_cast<blasint>(std::min(kBlock, n - i0)), nj = static_cast<blasint>(std::min(kBlock, n - j0));
      if (bi == bj) {
        cblas_dsyrk(CblasRowMajor, CblasLower, CblasNoTrans, ni, static_cast<blasint>(kb), -1.0, a + i0 * n + k0, ld, 1.0,
                    a + i0 * n + i0, ld);
      } else {
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ni, nj, static_cast<blasint>(kb), -1.0, a + i0 * n + k0, ld,
                    a + j0 * n + k0, ld, 1.0, a + i0 * n + j0, ld);
      }
    });
  }
  for (std::int64_t r = 0; r < n; ++r) std::fill(a + r * n + r + 1, a + (r + 1) * n, 0.0);
  return true;
}

void inverse_from_cholesky(const double* l, std::int64_t n, double* inverse) {
  if (n == 0) return;
  start_thread_pool();
  const auto ld = static_cast<blasint>(n);
  // X = L^-1, lower triangular: columns [c0, c1) solve L[c0:, c0:] X[c0:, c0:c1] = I (rows above c0 are zero).
  std::vector<double> x(static_cast<std::size_t>(n * n), 0.0);
  const std::int64_t blocks = blocks_of(n);
  parallel_for(blocks, [&](std::int64_t b) {
    const std::int64_t c0 = b * kBlock, cb = std::min(kBlock, n - c0);
    for (std::int64_t j = 0; j < cb; ++j) x[static_cast<std::size_t>((c0 + j) * n + c0 + j)] = 1.0;
    cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, static_cast<blasint>(n - c0), static_cast<blasint>(cb), 1.0,
                l + c0 * n + c0, ld, x.data() + c0 * n + c0, ld);
  });
  // inverse = X^T X. Block (I, J), I <= J: X[t, I] is zero above row I's start and X[t, J] above J's,
  // so the sum runs over rows t >= J's start.
  std::vector<std::pair<std::int64_t, std::int64_t>> tiles;
  for (std::int64_t bi = 0; bi < blocks; ++bi) {
    for (std::int64_t bj = bi; bj < blocks; ++bj) tiles.emplace_back(bi, bj);
  }
  parallel_for(static_cast<std::int64_t>(tiles.size()), [&](std::int64_t t) {
    const auto [bi, bj] = tiles[static_cast<std::size_t>(t)];
    const std::int64_t i0 = bi * kBlock, j0 = bj * kBlock;
    const auto ni = static_cast<blasint>(std::min(kBlock, n - i0)), nj = static_cast<blasint>(std::min(kBlock, n - j0));
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ni, nj, static_cast<blasint>(n - j0), 1.0, x.data() + j0 * n + i0, ld,
                x.data() + j0 * n + j0, ld, 0.0, inverse + i0 * n + j0, ld);
  });
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t c = 0; c < r; ++c) inverse[r * n + c] = inverse[c * n + r];
  }
}

namespace ref {

bool cholesky_lower(double* a, std::int64_t n) {
  for (std::int64_t j = 0; j < n; ++j) {
    long double d = a[j * n + j];
    for (std::int64_t p = 0; p < j; ++p) d -= static_cast<long double>(a[j * n + p]) * a[j * n + p];
    if (!(d > 0.0L) || !std::isfinite(static_cast<double>(d))) return false;
    const long double root = std::sqrt(d);
    a[j * n + j] = static_cast<double>(root);
    for (std::int64_t i = j + 1; i < n; ++i) {
      long double s = a[i * n + j];
      for (std::int64_t p = 0; p < j; ++p) s -= static_cast<long double>(a[i * n + p]) * a[j * n + p];
      a[i * n + j] = static_cast<double>(s / root);
    }
  }
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t c = r + 1; c < n; ++c) a[r * n + c] = 0.0;
  }
  return true;
}

void inverse_from_cholesky(const double* l, std::int64_t n, double* inverse) {
  std::vector<long double> y(static_cast<std::size_t>(n)), z(static_cast<std::size_t>(n));
  for (std::int64_t c = 0; c < n; ++c) {
    // L y = e_c, then L^T z = y: z is column c of the inverse.
    for (std::int64_t i = 0; i < n; ++i) {
      long double s = i == c ? 1.0L : 0.0L;
      for (std::int64_t p = 0; p < i; ++p) s -= static_cast<long double>(l[i * n + p]) * y[static_cast<std::size_t>(p)];
      y[static_cast<std::size_t>(i)] = s / l[i * n + i];
    }
    for (std::int64_t i = n - 1; i >= 0; --i) {
      long double s = y[static_cast<std::size_t>(i)];
      for (std::int64_t p = i + 1; p < n; ++p) s -= static_cast<long double>(l[p * n + i]) * z[static_cast<std::size_t>(p)];
      z[static_cast<std::size_t>(i)] = s / l[i * n + i];
    }
    for (std::int64_t i = 0; i < n; ++i) inverse[i * n + c] = static_cast<double>(z[static_cast<std::size_t>(i)]);
  }
}

}  // namespace ref

}  // namespace mopt::kernels
