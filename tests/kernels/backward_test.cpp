// The backward kernels against finite differences of plain f64 forwards (and matmul_f32 against its
// reference), on random inputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numbers>
#include <random>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/backward.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "support/random_values.h"

namespace mopt::kernels {
namespace {

using testing::random_values;
using Vec = std::vector<double>;

Vec widen(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

double dot(const Vec& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Checks the analytic gradients `grads` (f32) of a scalar function f of several inputs (the f64
// forward, evaluated at the f32 inputs widened) by central differences: along a random direction
// through all inputs at once, and coordinate by coordinate at `samples` random places of each input.
void check_gradients(const std::function<double(const std::vector<Vec>&)>& f, const std::vector<std::vector<float>>& inputs,
                     const std::vector<std::vector<float>>& grads, int samples = 24, double tolerance = 2e-4) {
  std::vector<Vec> x;
  for (const auto& in : inputs) x.push_back(widen(in));
  double grad_scale = 0;
  for (const auto& g : grads) {
    for (const float v : g) grad_scale = std::max(grad_scale, static_cast<double>(std::fabs(v)));
  }
  ASSERT_GT(grad_scale, 0.0) << "every gradient is zero: the check would prove nothing";
  const double eps = 1e-4;
  // A random direction.
  {
    std::vector<Vec> plus = x, minus = x;
    double analytic = 0;
    for (std::size_t t = 0; t < x.size(); ++t) {
      const auto u = random_values(x[t].size(), 100 + static_cast<std::uint32_t>(t));
      for (std::size_t i = 0; i < x[t].size(); ++i) {
        plus[t][i] += eps * u[i];
        minus[t][i] -= eps * u[i];
        analytic += static_cast<double>(u[i]) * grads[t][i];
      }
    }
    const double numeric = (f(plus) - f(minus)) / (2 * eps);
    EXPECT_NEAR(analytic, numeric, tolerance * (std::fabs(numeric) + grad_scale)) << "directional derivative";
  }
  std::mt19937 rng(7);
  for (std::size_t t = 0; t < x.size(); ++t) {
    std::uniform_int_distribution<std::size_t> pick(0, x[t].size() - 1);
    for (int s = 0; s < samples; ++s) {
      const std::size_t i = pick(rng);
      std::vector<Vec> plus = x, minus = x;
      plus[t][i] += eps;
      minus[t][i] -= eps;
      const double numeric = (f(plus) - f(minus)) / (2 * eps);
      EXPECT_NEAR(grads[t][i], numeric, tolerance * grad_scale) << "input " << t << " element " << i;
    }
  }
}

// ---- f64 forwards ----

Vec rmsnorm64(const Vec& x, const Vec& w, std::int64_t rows, std::int64_t dim, double eps) {
  Vec y(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (std::int64_t i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const double s = 1.0 / std::sqrt(ss / static_cast<double>(dim) + eps);
    for (std::int64_t i = 0; i < dim; ++i) y[r * dim + i] = w[i] * x[r * dim + i] * s;
  }
  return y;
}

// Attention of the packed sequences, as attention_saving defines it.
Vec attention64(const Vec& q, const Vec& k, const Vec& v, const std::vector<std::int64_t>& bounds, std::int64_t heads,
                std::int64_t kv_heads, std::int64_t d, std::int64_t window, Vec* lse = nullptr) {
  const std::int64_t rows = bounds.back(), group = heads / kv_heads, qs = heads * d, ks = kv_heads * d;
  Vec out(static_cast<std::size_t>(rows * qs));
  if (lse) lse->assign(static_cast<std::size_t>(rows * heads), 0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(static_cast<float>(d)));
  for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
    const std::int64_t o = bounds[s], n = bounds[s + 1] - o;
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t kh = h / group;
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t first = window > 0 ? std::max<std::int64_t>(0, i - window + 1) : 0;
        Vec sc(static_cast<std::size_t>(i + 1));
        double m = -1e300;
        for (std::int64_t j = first; j <= i; ++j) {
          double t = 0;
          for (std::int64_t c = 0; c < d; ++c) t += q[(o + i) * qs + h * d + c] * k[(o + j) * ks + kh * d + c];
          sc[j] = t * scale;
          m = std::max(m, sc[j]);
        }
        double total = 0;
        for (std::int64_t j = first; j <= i; ++j) total += std::exp(sc[j] - m);
        if (lse) (*lse)[(o + i) * heads + h] = m + std::log(total);
        for (std::int64_t j = first; j <= i; ++j) {
          const double p = std::exp(sc[j] - m) / total;
          for (std::int64_t c = 0; c < d; ++c) out[(o + i) * qs + h * d + c] += p * v[(o + j) * ks + kh * d + c];
        }
      }
    }
  }
  return out;
}

// ---- tests ----

TEST(Backward, RmsnormMatchesFiniteDifferences) {
  const std::int64_t rows = 70, dim = 24;  // rows over one block of the weight's sum
  const float eps = 1e-5f;
  const auto x = random_values(static_cast<std::size_t>(rows * dim), 1);
  const auto w = random_values(static_cast<std::size_t>(dim), 2);
  const auto dy = random_values(x.size(), 3);
  std::vector<float> y(x.size()), rstd(static_cast<std::size_t>(rows)), ref(x.size());
  rmsnorm_saving(x.data(), w.data(), rows, dim, eps, y.data(), rstd.data());
  rmsnorm(x.data(), w.data(), rows, dim, eps, ref.data());
  EXPECT_EQ(y, ref);  // the inference kernel's values, to the bit
  std::vector<float> dx(x.size(), 0.0f), dw(static_cast<std::size_t>(dim), 0.0f);
  rmsnorm_backward(x.data(), w.data(), rstd.data(), dy.data(), rows, dim, dx.data(), dw.data());
  const Vec dyd = widen(dy);
  check_gradients(
      [&](const std::vector<Vec>& in) {
        const Vec out = rmsnorm64(in[0], in[1], rows, dim, eps);
        double s = 0;
        for (std::size_t i = 0; i < out.size(); ++i) s += out[i] * dyd[i];
        return s;
      },
      {x, w}, {dx, dw});
  // Both gradients add to what is there.
  std::vector<float> dx2 = dx, dw2 = dw;
  rmsnorm_backward(x.data(), w.data(), rstd.data(), dy.data(), rows, dim, dx2.data(), dw2.data());
  for (std::size_t i = 0; i < dx.size(); ++i) EXPECT_FLOAT_EQ(dx2[i], 2 * dx[i]);
  for (std::size_t i = 0; i < dw.size(); ++i) EXPECT_NEAR(dw2[i], 2 * dw[i], 1e-5 * std::fabs(dw[i]) + 1e-6);
}

TEST(Backward, RopeInverseIsTheTranspose) {
  // RoPE is a rotation: its gradient is the inverse rotation. <dy, R x> = <R⁻¹ dy, x>, and R⁻¹ R x = x.
  const std::int64_t rows = 40, heads = 3, d = 16;
  const auto x = random_values(static_cast<std::size_t>(rows * heads * d), 4);
  const auto dy = random_values(x.size(), 5);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(rows));
  for (std::int64_t r = 0; r < rows; ++r) pos[static_cast<std::size_t>(r)] = static_cast<std::int32_t>((r * 37) % 500);
  std::vector<float> inv(d / 2);
  for (std::size_t i = 0; i < inv.size(); ++i) inv[i] = 1.0f / std::pow(10000.0f, 2.0f * static_cast<float>(i) / d);
  std::vector<float> rx = x, rdy = dy;
  apply_rope(rx.data(), rows, heads, d, pos.data(), inv);
  apply_rope_inverse(rdy.data(), rows, heads, d, pos.data(), inv);
  double lhs = 0, rhs = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    lhs += static_cast<double>(dy[i]) * rx[i];
    rhs += static_cast<double>(rdy[i]) * x[i];
  }
  EXPECT_NEAR(lhs, rhs, 1e-5 * std::fabs(lhs) + 1e-4);
  apply_rope_inverse(rx.data(), rows, heads, d, pos.data(), inv);
  for (std::size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(rx[i], x[i], 1e-5f * (1 + std::fabs(x[i])));
}

TEST(Backward, SiluMulMatchesFiniteDifferences) {
  const std::int64_t n = 300;
  const auto g = random_values(n, 6, 3.0f), u = random_values(n, 7), dh = random_values(n, 8);
  std::vector<float> dg(n), du(n);
  silu_mul_backward(g.data(), u.data(), dh.data(), n, dg.data(), du.data());
  check_gradients(
      [&](const std::vector<Vec>& in) {
        double s = 0;
        for (std::int64_t i = 0; i < n; ++i) s += in[0][i] / (1 + std::exp(-in[0][i])) * in[1][i] * dh[i];
        return s;
      },
      {g, u}, {dg, du}, 40);
}

struct AttentionCase {
  std::vector<std::int64_t> bounds;
  std::int64_t heads, kv_heads, d, window;
};

class AttentionBackward : public ::testing::TestWithParam<AttentionCase> {};

// Random q [rows, heads, d], k and v [rows, kv_heads, d], and an output gradient.
struct AttentionInputs {
  std::vector<float> q, k, v, dout;
};
AttentionInputs attention_inputs(const AttentionCase& c) {
  const std::int64_t rows = c.bounds.back();
  const auto q = random_values(static_cast<std::size_t>(rows * c.heads * c.d), 11);
  return {q, random_values(static_cast<std::size_t>(rows * c.kv_heads * c.d), 12), random_values(static_cast<std::size_t>(rows * c.kv_heads * c.d), 13),
          random_values(q.size(), 14)};
}

TEST_P(AttentionBackward, MatchesFiniteDifferences) {
  const auto& c = GetParam();
  const std::int64_t rows = c.bounds.back(), qs = c.heads * c.d, ks = c.kv_heads * c.d;
  const AttentionInputs in = attention_inputs(c);
  const std::vector<float>& q = in.q;
  const std::vector<float>& k = in.k;
  const std::vector<float>& v = in.v;
  const std::vector<float>& dout = in.dout;
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(rows * c.heads));
  attention_saving(q.data(), k.data(), v.data(), c.bounds, c.heads, c.kv_heads, c.d, c.window, out.data(), lse.data());
  // The forward: the f64 definition, and the inference kernel sequence by sequence.
  Vec lse64;
  const Vec out64 = attention64(widen(q), widen(k), widen(v), c.bounds, c.heads, c.kv_heads, c.d, c.window, &lse64);
  std::vector<float> infer(q.size());
  for (std::size_t s = 0; s + 1 < c.bounds.size(); ++s) {
    const std::int64_t o = c.bounds[s], n = c.bounds[s + 1] - o;
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
    attention(q.data() + o * qs, n, pos.data(), k.data() + o * ks, v.data() + o * ks, n, c.heads, c.kv_heads, c.d, c.window,
              infer.data() + o * qs);
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    ASSERT_NEAR(out[i], out64[i], 1e-5) << i;
    ASSERT_NEAR(out[i], infer[i], 1e-5) << i;
  }
  for (std::size_t i = 0; i < lse.size(); ++i) ASSERT_NEAR(lse[i], lse64[i], 1e-5 * (1 + std::fabs(lse64[i]))) << i;

  std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
  attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(), c.bounds, c.heads, c.kv_heads, c.d, c.window,
                     dq.data(), dk.data(), dv.data());
  check_gradients(
      [&](const std::vector<Vec>& in) {
        const Vec o = attention64(in[0], in[1], in[2], c.bounds, c.heads, c.kv_heads, c.d, c.window);
        return dot(o, dout);
      },
      {q, k, v}, {dq, dk, dv}, 16);
}

// With bf16 products (mixed-precision training: Q·Kᵀ, P·V and the backward's four products on
// bf16-rounded operands, f32 sums), the same outputs and gradients to bf16's rounding.
TEST_P(AttentionBackward, Bf16ProductsStayCloseToF32) {
  const auto& c = GetParam();
  const std::int64_t rows = c.bounds.back();
  const AttentionInputs in = attention_inputs(c);
  const std::vector<float>& q = in.q;
  const std::vector<float>& k = in.k;
  const std::vector<float>& v = in.v;
  const std::vector<float>& dout = in.dout;
  std::vector<std::vector<float>> results[2];
  for (const bool bf16 : {false, true}) {
    std::vector<float> out(q.size()), lse(static_cast<std::size_t>(rows * c.heads));
    std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
    attention_saving(q.data(), k.data(), v.data(), c.bounds, c.heads, c.kv_heads, c.d, c.window, out.data(), lse.data(), bf16);
    attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(), c.bounds, c.heads, c.kv_heads, c.d, c.window,
                       dq.data(), dk.data(), dv.data(), bf16);
    results[bf16 ? 1 : 0] = {out, lse, dq, dk, dv};
  }
  const char* names[] = {"out", "lse", "dq", "dk", "dv"};
  for (std::size_t t = 0; t < 5; ++t) {
    const auto& f32 = results[0][t];
    const auto& b16 = results[1][t];
    double num = 0, den = 0;
    for (std::size_t i = 0; i < f32.size(); ++i) {
      ASSERT_TRUE(std::isfinite(b16[i])) << names[t] << " " << i;
      num += (static_cast<double>(b16[i]) - f32[i]) * (static_cast<double>(b16[i]) - f32[i]);
      den += static_cast<double>(f32[i]) * f32[i];
    }
    const double error = std::sqrt(num / den);
    EXPECT_LT(error, 2e-2) << names[t];
    EXPECT_GT(error, 1e-6) << names[t] << ": the products were not rounded to bf16";
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBackward,
                         ::testing::Values(AttentionCase{{0, 5, 12}, 4, 2, 8, 0},      // two sequences, grouped heads
                                           AttentionCase{{0, 9, 20}, 2, 2, 4, 3},      // a window shorter than the sequences
                                           AttentionCase{{0, 150}, 2, 1, 4, 0},        // over one block of 128 queries
                                           AttentionCase{{0, 3, 140}, 3, 1, 4, 50}));  // blocks and a window

TEST(Backward, CrossEntropyMatchesFiniteDifferences) {
  const std::int64_t rows = 6, vocab = 50;
  const auto logits = random_values(static_cast<std::size_t>(rows * vocab), 15, 2.0f);
  const std::vector<std::int32_t> targets = {3, 0, 49, 17, 17, 8};
  std::vector<float> grad = logits;
  const float scale = 0.25f;
  const double loss = cross_entropy_backward(grad.data(), targets.data(), rows, vocab, scale);
  auto f = [&](const std::vector<Vec>& in) {
    double s = 0;
    for (std::int64_t r = 0; r < rows; ++r) {
      double m = -1e300, t = 0;
      for (std::int64_t j = 0; j < vocab; ++j) m = std::max(m, in[0][r * vocab + j]);
      for (std::int64_t j = 0; j < vocab; ++j) t += std::exp(in[0][r * vocab + j] - m);
      s += m + std::log(t) - in[0][r * vocab + targets[static_cast<std::size_t>(r)]];
    }
    return s;
  };
  EXPECT_NEAR(loss, f({widen(logits)}), 1e-7 * loss);  // exponentials in f32
  check_gradients([&](const std::vector<Vec>& in) { return scale * f(in); }, {logits}, {grad}, 40);
  std::vector<std::int32_t> bad = targets;
  bad[2] = 50;
  std::vector<float> copy = logits;
  EXPECT_THROW(cross_entropy_backward(copy.data(), bad.data(), rows, vocab, scale), Error);
}

TEST(Backward, EmbeddingAndBiasAddInOrder) {
  const std::int64_t rows = 7, dim = 130;
  const std::vector<std::int32_t> tokens = {2, 0, 2, 5, 1, 2, 0};
  const auto dy = random_values(static_cast<std::size_t>(rows * dim), 16);
  std::vector<float> table(static_cast<std::size_t>(6 * dim), 1.0f), expected = table;
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < dim; ++c) expected[static_cast<std::size_t>(tokens[r] * dim + c)] += dy[static_cast<std::size_t>(r * dim + c)];
  }
  embedding_backward(tokens.data(), rows, dy.data(), dim, table.data());
  EXPECT_EQ(table, expected);
  std::vector<float> bias(static_cast<std::size_t>(dim), 0.5f);
  bias_backward(dy.data(), rows, dim, bias.data());
  for (std::int64_t c = 0; c < dim; ++c) {
    double s = 0.5;
    for (std::int64_t r = 0; r < rows; ++r) s += dy[static_cast<std::size_t>(r * dim + c)];
    EXPECT_NEAR(bias[static_cast<std::size_t>(c)], s, 1e-5);
  }
}

using Product = std::function<void(bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const float* b,
                                   std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate)>;

// `product` of [m, k] by [k, n] in every transpose, written and accumulated, on random operands with
// padded leading dimensions, at 1, 2 and 3 threads: within tol * (1 + |want|) of `reference`, the same
// bits at every thread count, nothing written past column n. Returns the largest difference from the
// exact f32 product (ref::matmul_f32).
double check_products(std::int64_t m, std::int64_t n, std::int64_t k, unsigned seed, const Product& product, const Product& reference, double tol) {
  const int threads = compute_threads();
  const std::int64_t ld_pad = 3;
  double from_exact = 0;
  for (const bool ta : {false, true}) {
    for (const bool tb : {false, true}) {
      const std::int64_t lda = (ta ? m : k) + ld_pad, ldb = (tb ? k : n) + ld_pad, ldc = n + ld_pad;
      const auto a = random_values(static_cast<std::size_t>((ta ? k : m) * lda), seed);
      const auto b = random_values(static_cast<std::size_t>((tb ? n : k) * ldb), seed + 1);
      const auto c0 = random_values(static_cast<std::size_t>(m * ldc), seed + 2);
      for (const bool acc : {false, true}) {
        std::vector<float> want = c0, exact = c0;
        reference(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, want.data(), ldc, acc);
        ref::matmul_f32(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, exact.data(), ldc, acc);
        std::vector<float> first;
        for (const int t : {1, 2, 3}) {
          set_compute_threads(t);
          std::vector<float> c = c0;
          product(ta, tb, m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, acc);
          for (std::int64_t i = 0; i < m; ++i) {
            for (std::int64_t j = 0; j < ldc; ++j) {
              const auto at = static_cast<std::size_t>(i * ldc + j);
              if (j >= n) {
                EXPECT_EQ(c[at], c0[at]) << "wrote past column n";
                continue;
              }
              EXPECT_NEAR(c[at], want[at], tol * (1 + std::fabs(want[at]))) << ta << tb << acc << " " << i << "," << j << " k " << k;
              from_exact = std::max(from_exact, static_cast<double>(std::fabs(c[at] - exact[at])));
            }
          }
          if (first.empty()) first = c;
          EXPECT_EQ(c, first) << "threads " << t << " transposes " << ta << tb << " accumulate " << acc;
          if (::testing::Test::HasFailure()) {
            set_compute_threads(threads);
            return from_exact;
          }
        }
      }
    }
  }
  set_compute_threads(threads);
  return from_exact;
}

// matmul_f32 in every transpose, split by the pool into blocks (a product over the split threshold,
// with tails), against the plain loops; and the same bits at 1, 2 and 3 threads.
TEST(Backward, MatmulMatchesReferenceInEveryTranspose) { check_products(150, 140, 120, 17, matmul_f32, ref::matmul_f32, 1e-4); }

// A long sum into a small C (a weight gradient's shape) is cut into chunks, the last one shorter,
// summed apart and added in order: the same checks, and the same bits at every thread count.
TEST(Backward, MatmulSplitSumMatchesReference) {
  EXPECT_EQ(matmul_sum_chunks(150, 140, 120), 1);
  EXPECT_EQ(matmul_sum_chunks(150, 70, 3001), 8);
  EXPECT_EQ(matmul_sum_chunks(704, 256, 4096), 4);  // tiny-kjv's gate/up dW over a step's 4096 tokens
  check_products(150, 70, 3001, 19, matmul_f32, ref::matmul_f32, 1e-4);
}

// The products on bf16 operands (mixed-precision training) in every transpose, with tails in m, n and
// k (AMX pads to 32) and whole 32 x 32 blocks, written or accumulated, against their definition
// (operands rounded, sums in double), the same bits at 1, 2 and 3 threads; and a Bf16Operand reused
// for several products. AMX where the CPU has it (the test says which), else the rounded operands
// through OpenBLAS (MOPT_ISA=avx2 or scalar: kernels.avx2, kernels.plain_loops).
TEST(Backward, Bf16OperandsMatchTheirDefinition) {
  std::printf("bf16 operands on %s\n", amx_bf16_products() ? "AMX tiles" : "OpenBLAS (rounded copies)");
  struct Shape {
    std::int64_t m, n, k;
  };
  for (const Shape sh : {Shape{150, 140, 120}, Shape{64, 96, 96}, Shape{33, 17, 5}, Shape{96, 64, 600}}) {
    const double from_exact = check_products(sh.m, sh.n, sh.k, 27, matmul_bf16_operands, ref::matmul_bf16_operands, 2e-5);
    // The operands were rounded: the f32 product differs by far more than the summation order.
    EXPECT_GT(from_exact, 1e-3) << sh.m << "x" << sh.n << "x" << sh.k;
  }
  // One operand, two products (the LM head's chunks), the second accumulated into the first's result.
  const std::int64_t m = 40, n = 70, k = 50;
  const auto a = random_values(static_cast<std::size_t>(2 * m * k), 31), b = random_values(static_cast<std::size_t>(n * k), 32);
  Bf16Operand operand;
  operand.assign(true, k, n, b.data(), k);
  EXPECT_EQ(operand.k(), k);
  EXPECT_EQ(operand.n(), n);
  std::vector<float> got(static_cast<std::size_t>(m * n)), want(got.size());
  operand.multiply(false, m, a.data(), k, got.data(), n, false);
  operand.multiply(false, m, a.data() + m * k, k, got.data(), n, true);
  ref::matmul_bf16_operands(false, true, m, n, k, a.data(), k, b.data(), k, want.data(), n, false);
  ref::matmul_bf16_operands(false, true, m, n, k, a.data() + m * k, k, b.data(), k, want.data(), n, true);
  for (std::size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 2e-5 * (1 + std::fabs(want[i]))) << i;
  // Leading blocks of one operand (attention's growing key prefixes): op(B) = Bᵀ of B [90, 50] and B
  // [90, 50] itself, used for k_used x n_used blocks with tails, against the block alone.
  const std::int64_t big = 90, width = 50;
  const auto w = random_values(static_cast<std::size_t>(big * width), 33);
  for (const bool transposed : {true, false}) {
    const std::int64_t kk = transposed ? width : big, nn = transposed ? big : width;
    Bf16Operand leading;
    leading.assign(transposed, kk, nn, w.data(), width);
    for (const auto& [k_used, n_used] : {std::pair<std::int64_t, std::int64_t>{kk, nn}, {kk - 7, nn - 21}, {1, 16}, {kk / 2, nn}}) {
      const auto x = random_values(static_cast<std::size_t>(m * k_used), 34);
      std::vector<float> c(static_cast<std::size_t>(m * n_used)), r(c.size());
      leading.multiply_leading(false, m, k_used, n_used, x.data(), k_used, c.data(), n_used, false);
      ref::matmul_bf16_operands(false, transposed, m, n_used, k_used, x.data(), k_used, w.data(), width, r.data(), n_used, false);
      for (std::size_t i = 0; i < c.size(); ++i) ASSERT_NEAR(c[i], r[i], 2e-5 * (1 + std::fabs(r[i]))) << transposed << " " << k_used << "x" << n_used << " " << i;
    }
  }
  // An element's bits do not depend on whether its 32 x 32 block is whole or at an edge, also when
  // added to a C much larger than the product (n = 32 against n = 31, the same columns).
  {
    const std::int64_t rows = 32, depth = 256;
    const auto x = random_values(static_cast<std::size_t>(rows * depth), 35), y = random_values(static_cast<std::size_t>(depth * 32), 36);
    std::vector<float> whole = random_values(static_cast<std::size_t>(rows * 32), 37);
    for (float& e : whole) e += 1000.0f;
    std::vector<float> edge = whole;
    matmul_bf16_operands(false, false, rows, 32, depth, x.data(), depth, y.data(), 32, whole.data(), 32, true);
    matmul_bf16_operands(false, false, rows, 31, depth, x.data(), depth, y.data(), 32, edge.data(), 32, true);
    for (std::int64_t i = 0; i < rows; ++i) {
      for (std::int64_t j = 0; j < 31; ++j) ASSERT_EQ(whole[static_cast<std::size_t>(i * 32 + j)], edge[static_cast<std::size_t>(i * 32 + j)]) << i << "," << j;
    }
  }
  Bf16Operand small;
  small.assign(false, 4, 4, w.data(), width);
  std::vector<float> out(16);
  EXPECT_THROW(small.multiply_leading(false, 1, 5, 4, w.data(), 5, out.data(), 4, false), Error);
}

}  // namespace
}  // namespace mopt::kernels
