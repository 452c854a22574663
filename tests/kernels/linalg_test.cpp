// matmul_f64, gram_upper_f32, the blocked Cholesky factorization and the inverse from it against
// their plain references on random inputs, and the same bits under 1, 2 and 3 threads.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/linalg.h"
#include "support/random_values.h"

namespace mopt::kernels {
namespace {

using testing::random_values;

std::vector<double> random_doubles(std::size_t n, std::uint32_t seed) {
  const std::vector<float> f = random_values(n, seed);
  std::vector<double> d(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) d[i] = f[i] + 1e-3 * f[(i * 7 + 1) % f.size()];  // bits below f32's
  return d;
}

// A symmetric positive definite matrix: B Bᵀ / n + 0.1 I for a random B [n, n + 5].
std::vector<double> random_spd(std::int64_t n, std::uint32_t seed) {
  const std::int64_t k = n + 5;
  const std::vector<double> b = random_doubles(static_cast<std::size_t>(n * k), seed);
  std::vector<double> a(static_cast<std::size_t>(n * n));
  ref::matmul_f64(false, true, n, n, k, b.data(), k, b.data(), k, a.data(), n, false);
  for (auto& v : a) v /= static_cast<double>(n);
  for (std::int64_t i = 0; i < n; ++i) a[static_cast<std::size_t>(i * n + i)] += 0.1;
  return a;
}

// Runs f under 1, 2 and 3 threads and checks it gives the same bits each time.
template <class F>
std::vector<double> same_at_every_thread_count(const F& f, const char* what) {
  const int threads = compute_threads();
  std::vector<double> first;
  for (const int t : {1, 2, 3}) {
    set_compute_threads(t);
    const std::vector<double> r = f();
    if (first.empty()) first = r;
    EXPECT_EQ(r, first) << what << " under " << t << " threads";
  }
  set_compute_threads(threads);
  return first;
}

TEST(Linalg, MatmulF64MatchesReferenceInEveryTranspose) {
  const std::int64_t m = 150, n = 140, k = 120, pad = 3;  // over the split threshold, with tails
  for (const bool ta : {false, true}) {
    for (const bool tb : {false, true}) {
      const std::int64_t lda = (ta ? m : k) + pad, ldb = (tb ? k : n) + pad, ldc = n + pad;
      const auto a = random_doubles(static_cast<std::size_t>((ta ? k : m) * lda), 21);
      const auto b = random_doubles(static_cast<std::size_t>((tb ? n : k) * ldb), 22);
      const auto c0 = random_doubles(static_cast<std::size_t>(m * ldc), 23);
      for (const bool acc : {false, true}) {
        std::vector<double> want = c0;
        ref::matmul_f64(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, want.data(), ldc, acc);
        const std::vector<double> got = same_at_every_thread_count(
            [&] {
              std::vector<double> c = c0;
              matmul_f64(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, acc);
              return c;
            },
            "matmul_f64");
        for (std::int64_t i = 0; i < m; ++i) {
          for (std::int64_t j = 0; j < ldc; ++j) {
            const auto at = static_cast<std::size_t>(i * ldc + j);
            if (j >= n) {
              ASSERT_EQ(got[at], c0[at]) << "wrote past column n";
            } else {
              ASSERT_NEAR(got[at], want[at], 1e-12 * (1 + std::fabs(want[at]))) << ta << tb << acc << " " << i << "," << j;
            }
          }
        }
      }
    }
  }
}

TEST(Linalg, GramUpperMatchesReferenceAndLeavesTheLowerTriangle) {
  for (const std::int64_t cols : {std::int64_t{5}, std::int64_t{300}, std::int64_t{1100}}) {  // one tile; 128-tiles with a tail; 256-tiles
    const std::int64_t rows = 37;
    const std::vector<float> x = random_values(static_cast<std::size_t>(rows * cols), 31);
    const float sentinel = -12345.0f;
    const std::vector<double> got = same_at_every_thread_count(
        [&] {
          std::vector<float> g(static_cast<std::size_t>(cols * cols), sentinel);
          gram_upper_f32(x.data(), rows, cols, g.data());
          return std::vector<double>(g.begin(), g.end());
        },
        "gram_upper_f32");
    for (std::int64_t i = 0; i < cols; ++i) {
      for (std::int64_t j = 0; j < cols; ++j) {
        const double v = got[static_cast<std::size_t>(i * cols + j)];
        if (j < i) {
          ASSERT_EQ(v, sentinel) << "wrote below the diagonal at " << i << "," << j;
          continue;
        }
        double s = 0.0;
        for (std::int64_t t = 0; t < rows; ++t) s += static_cast<double>(x[static_cast<std::size_t>(t * cols + i)]) * x[static_cast<std::size_t>(t * cols + j)];
        ASSERT_NEAR(v, s, 1e-4 * (1 + std::fabs(s))) << cols << ": " << i << "," << j;
      }
    }
  }
}

TEST(Linalg, CholeskyAndInverseMatchReferences) {
  for (const std::int64_t n : {std::int64_t{1}, std::int64_t{7}, std::int64_t{128}, std::int64_t{129}, std::int64_t{300}}) {
    const std::vector<double> a = random_spd(n, static_cast<std::uint32_t>(40 + n));
    std::vector<double> want_l = a;
    ASSERT_TRUE(ref::cholesky_lower(want_l.data(), n));
    const std::vector<double> l = same_at_every_thread_count(
        [&] {
          std::vector<double> f = a;
          EXPECT_TRUE(cholesky_lower(f.data(), n));
          return f;
        },
        "cholesky_lower");
    for (std::size_t i = 0; i < l.size(); ++i) ASSERT_NEAR(l[i], want_l[i], 1e-10 * (1 + std::fabs(want_l[i]))) << "n " << n << " at " << i;
    for (std::int64_t r = 0; r < n; ++r) {
      for (std::int64_t c = r + 1; c < n; ++c) ASSERT_EQ(l[static_cast<std::size_t>(r * n + c)], 0.0);
    }

    std::vector<double> want_inv(a.size());
    ref::inverse_from_cholesky(want_l.data(), n, want_inv.data());
    const std::vector<double> inv = same_at_every_thread_count(
        [&] {
          std::vector<double> r(a.size());
          inverse_from_cholesky(l.data(), n, r.data());
          return r;
        },
        "inverse_from_cholesky");
    double scale = 0.0;
    for (const double v : want_inv) scale = std::max(scale, std::fabs(v));
    for (std::size_t i = 0; i < inv.size(); ++i) ASSERT_NEAR(inv[i], want_inv[i], 1e-10 * scale) << "n " << n << " at " << i;
    // And it is the inverse: A · A^-1 = I.
    std::vector<double> product(a.size());
    ref::matmul_f64(false, false, n, n, n, a.data(), n, inv.data(), n, product.data(), n, false);
    for (std::int64_t r = 0; r < n; ++r) {
      for (std::int64_t c = 0; c < n; ++c) ASSERT_NEAR(product[static_cast<std::size_t>(r * n + c)], r == c ? 1.0 : 0.0, 1e-9) << r << "," << c;
    }
  }
}

TEST(Linalg, CholeskyRefusesIndefiniteAndNaN) {
  for (const std::int64_t n : {std::int64_t{3}, std::int64_t{200}}) {
    std::vector<double> a = random_spd(n, 50);
    std::vector<double> indefinite = a;
    indefinite[static_cast<std::size_t>((n - 1) * n + n - 1)] = -1.0;  // the last pivot, in the last block
    EXPECT_FALSE(cholesky_lower(indefinite.data(), n));
    EXPECT_FALSE(ref::cholesky_lower(indefinite.data(), n));
    std::vector<double> with_nan = a;
    with_nan[static_cast<std::size_t>(n / 2 * n)] = std::numeric_limits<double>::quiet_NaN();
    EXPECT_FALSE(cholesky_lower(with_nan.data(), n));
  }
}

}  // namespace
}  // namespace mopt::kernels
