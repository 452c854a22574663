// Every fast kernel against its plain reference, on random inputs.
#include <cblas.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <string>
#include <random>
#include <mutex>

#include "core/convert.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/gemm_simd.h"
#include "kernels/linear.h"
#include "kernels/ops.h"
#include "kernels/ops_simd.h"
#include "core/cpu_features.h"
#include "support/random_values.h"

namespace mopt::kernels {
namespace {

using testing::random_values;

double max_relative(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, ref = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
    ref = std::max(ref, static_cast<double>(std::fabs(b[i])));
  }
  return diff / ref;
}

TEST(Gemm, MatchesReference) {
  const std::int64_t m = 37, k = 129, n = 53;
  const auto x = random_values(static_cast<std::size_t>(m * k), 1);
  const auto w = random_values(static_cast<std::size_t>(n * k), 2);
  std::vector<float> fast(static_cast<std::size_t>(m * n)), ref(fast.size());
  gemm_f32(x.data(), m, k, w.data(), n, fast.data());
  ref::gemm_f32(x.data(), m, k, w.data(), n, ref.data());
  EXPECT_LE(max_relative(fast, ref), 1e-5);
  gemm_f32(x.data(), m, k, w.data(), n, fast.data(), true);  // accumulate: twice the product
  for (auto& r : ref) r *= 2;
  EXPECT_LE(max_relative(fast, ref), 1e-5);
}

// Products large enough that the pool splits them into blocks of rows of x by blocks of weight rows
// (tails in both): the same bits under 1, 2, 3 and 4 threads (the blocks depend on the shape alone),
// into a strided y, accumulating or not, the columns past n untouched; as one OpenBLAS call over the
// whole product computes them to rounding; and gemm_f32_rows with weight rows written by a callback.
TEST(Gemm, SplitProductsAreTheSameAtEveryThreadCount) {
  const int threads = compute_threads();
  const std::int64_t m = 300, k = 100, n = 200, ldy = 211;
  const auto x = random_values(static_cast<std::size_t>(m * k), 3);
  const auto w = random_values(static_cast<std::size_t>(n * k), 4);
  const auto y0 = random_values(static_cast<std::size_t>(m * ldy), 5);
  for (const bool accumulate : {false, true}) {
    std::vector<float> whole = y0, first;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data(), k, w.data(), k, accumulate ? 1.0f : 0.0f, whole.data(), ldy);
    for (const int t : {1, 2, 3, 4}) {
      set_compute_threads(t);
      std::vector<float> split = y0;
      gemm_f32_strided(x.data(), m, k, w.data(), n, split.data(), ldy, accumulate);
      if (first.empty()) first = split;
      EXPECT_EQ(split, first) << "threads " << t << ", accumulate " << accumulate;
    }
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t j = 0; j < ldy; ++j) {
        const auto at = static_cast<std::size_t>(i * ldy + j);
        if (j >= n) ASSERT_EQ(first[at], y0[at]);
        else ASSERT_NEAR(first[at], whole[at], 1e-5f * (1 + std::fabs(whole[at])));
      }
    }
  }
  std::vector<float> whole(static_cast<std::size_t>(m * n)), ref(whole.size()), first;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data(), k, w.data(), k, 0.0f, whole.data(), n);
  ref::gemm_f32(x.data(), m, k, w.data(), n, ref.data());
  for (const int t : {1, 2, 3, 4}) {
    set_compute_threads(t);
    std::vector<float> rows(whole.size());
    int calls = 0;
    std::mutex mutex;
    gemm_f32_rows(x.data(), m, k, [&](std::int64_t r0, std::int64_t count, float* out) {
      EXPECT_LE(count, 64);
      std::copy(w.begin() + r0 * k, w.begin() + (r0 + count) * k, out);
      std::lock_guard<std::mutex> lock(mutex);
      ++calls;
    }, n, rows.data());
    EXPECT_EQ(calls, 4);  // 200 rows: 64 at a time, each once
    if (first.empty()) first = rows;
    EXPECT_EQ(rows, first) << "threads " << t;
  }
  EXPECT_LE(max_relative(first, whole), 1e-5);
  EXPECT_LE(max_relative(first, ref), 1e-5);
  set_compute_threads(threads);
}

// The bf16 product against its definition (both operands rounded to bf16, exact products):
// shapes with tails in every dimension (rows past a tile of 6, columns past a panel of 64, odd
// inputs and inputs past a pass of 256), from bf16 rows and from f32 rows.
TEST(Gemm, Bf16ProductsMatchTheirDefinition) {
  if (!bf16_gemm_available()) GTEST_SKIP() << "this CPU has no AVX-512 BF16 (" << describe(cpu_features()) << ")";
  struct Shape { std::int64_t m, k, n; };
  for (const Shape s : {Shape{1, 64, 64}, Shape{5, 129, 53}, Shape{13, 300, 130}, Shape{40, 513, 200}, Shape{7, 2, 65}}) {
    const auto x = random_values(static_cast<std::size_t>(s.m * s.k), 11, 2.0f);
    const auto w = random_values(static_cast<std::size_t>(s.n * s.k), 12, 0.5f);
    std::vector<std::uint16_t> wb(w.size());
    for (std::size_t i = 0; i < w.size(); ++i) wb[i] = f32_to_bf16(w[i]);
    std::vector<float> ref(static_cast<std::size_t>(s.m * s.n)), from_bf16(ref.size(), -1.0f), from_f32(ref.size(), -1.0f);
    ref::gemm_bf16_products(x.data(), s.m, s.k, w.data(), s.n, ref.data());
    gemm_bf16(x.data(), s.m, s.k, wb.data(), s.k, s.n, from_bf16.data());
    gemm_bf16(x.data(), s.m, s.k, [&](std::int64_t r0, std::int64_t rows, float* out) {
      std::copy(w.begin() + r0 * s.k, w.begin() + (r0 + rows) * s.k, out);
    }, s.n, from_f32.data());
    EXPECT_LE(max_relative(from_bf16, ref), 1e-5) << s.m << "x" << s.k << "x" << s.n;
    EXPECT_LE(max_relative(from_f32, ref), 1e-5) << s.m << "x" << s.k << "x" << s.n;
    // And the rounding is what it claims: the f32 product differs by more than the sums' rounding.
    std::vector<float> exact(ref.size());
    ref::gemm_f32(x.data(), s.m, s.k, w.data(), s.n, exact.data());
    if (s.k > 2) EXPECT_GT(max_relative(exact, ref), 1e-5);
  }
}

// Precision::bf16 runs the bf16 kernels only where they can run, as MOPT_BF16_PRODUCTS says when it
// is set, and --version says which way it went.
TEST(Gemm, Bf16KernelsChosenOnlyWhereTheyRun) {
  const std::string described = describe_gemm();
  // Training's bf16 products: AMX only where the CPU has it and MOPT_ISA does not hide it (and Linux
  // granted the tile state), and --version says which.
  if (amx_bf16_products()) EXPECT_TRUE(cpu_features().amx_bf16);
  EXPECT_NE(described.find(amx_bf16_products() ? "train --precision bf16: amx_bf16 tiles" : "(no amx_bf16)"), std::string::npos) << described;
  if (!bf16_gemm_available()) {
    EXPECT_FALSE(bf16_kernels_chosen());
    EXPECT_NE(described.find("bf16 products: f32 (no avx512_bf16)"), std::string::npos) << described;
    return;
  }
  const char* forced = std::getenv("MOPT_BF16_PRODUCTS");
  if (forced != nullptr && std::string(forced) == "kernels") EXPECT_TRUE(bf16_kernels_chosen());
  if (forced != nullptr && std::string(forced) == "f32") EXPECT_FALSE(bf16_kernels_chosen());
  EXPECT_NE(described.find(bf16_kernels_chosen() ? "bf16 products: avx512_bf16" : "bf16 products: f32"), std::string::npos)
      << described;
  const double ratio = avx512::bf16_tile_over_fma_tile();
  EXPECT_GT(ratio, 0.1) << "the tile measurement";
  EXPECT_LT(ratio, 10.0) << "the tile measurement";
}

// MOPT_BF16_PRODUCTS takes kernels or f32; anything else is an error that names the variable.
TEST(Gemm, Bf16ProductsOverrideIsParsed) {
  EXPECT_EQ(parse_bf16_products(nullptr), std::nullopt);
  EXPECT_EQ(parse_bf16_products("kernels"), std::optional<bool>(true));
  EXPECT_EQ(parse_bf16_products("f32"), std::optional<bool>(false));
  for (const char* bad : {"bf16", "", "KERNELS"}) {
    try {
      parse_bf16_products(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("MOPT_BF16_PRODUCTS"), std::string::npos) << e.what();
    }
  }
}

// The VNNI int8 product is exact: every code (-128 included) on both sides, against int32 sums.
TEST(Gemm, Int8PanelsAreExact) {
  if (!vnni_gemm_available()) GTEST_SKIP() << "this CPU has no AVX-512 VNNI (" << describe(cpu_features()) << ")";
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> code(-128, 127);
  struct Shape { std::int64_t m, k, n; };
  for (const Shape s : {Shape{1, 32, 64}, Shape{4, 131, 70}, Shape{9, 1000, 129}, Shape{64, 64, 5}}) {
    std::vector<std::int8_t> w(static_cast<std::size_t>(s.n * s.k)), x(static_cast<std::size_t>(s.m * s.k));
    for (auto& v : w) v = static_cast<std::int8_t>(code(rng));
    for (auto& v : x) v = static_cast<std::int8_t>(code(rng));
    w[0] = x[0] = -128;
    std::vector<float> factor(static_cast<std::size_t>(s.n));
    for (std::size_t j = 0; j < factor.size(); ++j) factor[j] = 0.001f * static_cast<float>(j + 1);
    const Int8Panels panels(w.data(), s.k, s.n, s.k);
    std::vector<float> y(static_cast<std::size_t>(s.m * s.n), -1.0f);
    panels.multiply(x.data(), s.m, factor.data(), y.data());
    for (std::int64_t i = 0; i < s.m; ++i) {
      for (std::int64_t j = 0; j < s.n; ++j) {
        std::int32_t acc = 0;
        for (std::int64_t p = 0; p < s.k; ++p) acc += std::int32_t{x[static_cast<std::size_t>(i * s.k + p)]} * w[static_cast<std::size_t>(j * s.k + p)];
        ASSERT_EQ(y[static_cast<std::size_t>(i * s.n + j)], static_cast<float>(acc) * factor[static_cast<std::size_t>(j)]) << i << "," << j;
      }
    }
  }
}

// Both paths (GEMV for few rows, widened tiles + GEMM for many) and all three
// weight dtypes, with a bias, against widening everything and the reference GEMM.
TEST(Linear, EveryPathAndDtypeMatchesReference) {
  const std::int64_t k = 200, n = 77;  // k not a multiple of the vector width
  const Tensor w32 = Tensor::from_f32(random_values(static_cast<std::size_t>(n * k), 3, 0.1f), {n, k});
  const Tensor bias = Tensor::from_f32(random_values(static_cast<std::size_t>(n), 4), {n});
  for (const DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    const Tensor w = w32.to(dtype);
    for (const std::int64_t m : std::vector<std::int64_t>{1, 3, kGemvMaxRows, kGemvMaxRows + 1, kWideGemvMaxRows, kWideGemvMaxRows + 1, 40}) {
      const auto x = random_values(static_cast<std::size_t>(m * k), 5 + static_cast<std::uint32_t>(m));
      std::vector<float> fast(static_cast<std::size_t>(m * n)), ref(fast.size());
      linear_forward(x.data(), m, w, &bias, fast.data());
      ref::linear_forward(x.data(), m, w, &bias, ref.data());
      EXPECT_LE(max_relative(fast, ref), 1e-5) << dtype_name(dtype) << " rows " << m;
    }
  }
}

// Precision::bf16: bf16 and f16 weights take the bf16 products where the CPU has them (their
// definition: both operands rounded to bf16), f32 weights and the GEMV keep f32.
TEST(Linear, Bf16PrecisionMatchesItsDefinition) {
  const std::int64_t k = 200, n = 77;
  const Tensor w32 = Tensor::from_f32(random_values(static_cast<std::size_t>(n * k), 13, 0.1f), {n, k});
  for (const DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    const Tensor w = w32.to(dtype);
    const std::vector<float> wf = w.to_f32();
    for (const std::int64_t m : std::vector<std::int64_t>{kGemvMaxRows, kGemvMaxRows + 1, 40}) {
      const auto x = random_values(static_cast<std::size_t>(m * k), 17 + static_cast<std::uint32_t>(m));
      std::vector<float> fast(static_cast<std::size_t>(m * n)), ref(fast.size());
      linear_forward(x.data(), m, w, nullptr, fast.data(), Precision::bf16);
      const bool bf16 = bf16_kernels_chosen() && dtype != DType::F32 && m > kGemvMaxRows;
      if (bf16) ref::gemm_bf16_products(x.data(), m, k, wf.data(), n, ref.data());
      else ref::gemm_f32(x.data(), m, k, wf.data(), n, ref.data());
      EXPECT_LE(max_relative(fast, ref), 1e-5) << dtype_name(dtype) << " rows " << m << (bf16 ? " (bf16 products)" : " (f32)");
    }
  }
}

TEST(RmsNorm, Definition) {
  const std::vector<float> x = {1, 2, 3, 4, -1, 0, 0, 1};
  const std::vector<float> w = {1, 0.5f, 2, 1};
  std::vector<float> y(8);
  rmsnorm(x.data(), w.data(), 2, 4, 1e-6f, y.data());
  const double rms0 = std::sqrt((1 + 4 + 9 + 16) / 4.0 + 1e-6);
  EXPECT_NEAR(y[2], 2 * 3 / rms0, 1e-6);
  const double rms1 = std::sqrt(2 / 4.0 + 1e-6);
  EXPECT_NEAR(y[4], -1 / rms1, 1e-6);
}

TEST(Rope, RotatesSplitHalfPairs) {
  // One head of 4: pairs (0, 2) and (1, 3); position 1 rotates pair i by inv_freq[i].
  std::vector<float> x = {1, 0, 0, 1};
  const std::vector<float> inv = {0.5f, 0.25f};
  const std::int32_t pos = 1;
  apply_rope(x.data(), 1, 1, 4, &pos, inv);
  EXPECT_NEAR(x[0], std::cos(0.5f), 1e-6);
  EXPECT_NEAR(x[2], std::sin(0.5f), 1e-6);
  EXPECT_NEAR(x[1], -std::sin(0.25f), 1e-6);
  EXPECT_NEAR(x[3], std::cos(0.25f), 1e-6);
}

// A packed batch repeats positions (the table of cos/sin per position) and a lone row does not (cos/sin
// per row): both give the same bits, within f32 rounding of the rotation computed in f64, forward and
// inverse, at positions that do not start at 0 (a batch after a cached prefix).
TEST(Rope, PackedBatchRowsMatchRowByRowAndTheDefinition) {
  std::mt19937 rng(17);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::int64_t heads = 3, d = 16, half = d / 2, seqs = 4, len = 37;
  std::vector<float> inv(static_cast<std::size_t>(half));
  for (std::int64_t i = 0; i < half; ++i) inv[static_cast<std::size_t>(i)] = std::pow(10000.0f, -2.0f * static_cast<float>(i) / static_cast<float>(d));
  std::vector<std::int32_t> pos;
  for (std::int64_t s = 0; s < seqs; ++s) {
    for (std::int64_t t = 0; t < len; ++t) pos.push_back(static_cast<std::int32_t>(5 + s + t));
  }
  const auto rows = static_cast<std::int64_t>(pos.size());
  std::vector<float> x(static_cast<std::size_t>(rows * heads * d));
  for (auto& v : x) v = nd(rng);
  for (const bool inverse : {false, true}) {
    std::vector<float> packed = x, single = x;
    if (inverse) apply_rope_inverse(packed.data(), rows, heads, d, pos.data(), inv);
    else apply_rope(packed.data(), rows, heads, d, pos.data(), inv);
    for (std::int64_t r = 0; r < rows; ++r) {
      float* row = single.data() + r * heads * d;
      if (inverse) apply_rope_inverse(row, 1, heads, d, &pos[static_cast<std::size_t>(r)], inv);
      else apply_rope(row, 1, heads, d, &pos[static_cast<std::size_t>(r)], inv);
    }
    ASSERT_EQ(packed, single) << "inverse " << inverse;
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::size_t b = static_cast<std::size_t>((r * heads + h) * d);
        for (std::int64_t i = 0; i < half; ++i) {
          const double angle = static_cast<double>(static_cast<float>(pos[static_cast<std::size_t>(r)]) * inv[static_cast<std::size_t>(i)]) * (inverse ? -1.0 : 1.0);
          const double a = x[b + static_cast<std::size_t>(i)], c = x[b + static_cast<std::size_t>(i + half)];
          EXPECT_NEAR(packed[b + static_cast<std::size_t>(i)], a * std::cos(angle) - c * std::sin(angle), 1e-5);
          EXPECT_NEAR(packed[b + static_cast<std::size_t>(i + half)], c * std::cos(angle) + a * std::sin(angle), 1e-5);
        }
      }
    }
  }
}

// The reference: every (query, head) computed directly in f64.
std::vector<float> attention_ref(const std::vector<float>& q, std::int64_t n_q, const std::vector<std::int32_t>& pos,
                                 const std::vector<float>& k, const std::vector<float>& v, std::int64_t n_k, std::int64_t heads,
                                 std::int64_t kv_heads, std::int64_t d, std::int64_t window) {
  std::vector<float> out(static_cast<std::size_t>(n_q * heads * d));
  for (std::int64_t i = 0; i < n_q; ++i) {
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t kh = h / (heads / kv_heads);
      std::vector<double> s;
      std::vector<std::int64_t> js;
      for (std::int64_t j = 0; j < n_k; ++j) {
        if (j > pos[static_cast<std::size_t>(i)] || (window > 0 && pos[static_cast<std::size_t>(i)] - j >= window)) continue;
        double dot = 0;
        for (std::int64_t t = 0; t < d; ++t) dot += static_cast<double>(q[static_cast<std::size_t>((i * heads + h) * d + t)]) * k[static_cast<std::size_t>((j * kv_heads + kh) * d + t)];
        s.push_back(dot / std::sqrt(static_cast<double>(d)));
        js.push_back(j);
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double total = 0;
      for (auto& e : s) total += (e = std::exp(e - mx));
      for (std::int64_t t = 0; t < d; ++t) {
        double acc = 0;
        for (std::size_t a = 0; a < js.size(); ++a) acc += s[a] / total * v[static_cast<std::size_t>((js[a] * kv_heads + kh) * d + t)];
        out[static_cast<std::size_t>((i * heads + h) * d + t)] = static_cast<float>(acc);
      }
    }
  }
  return out;
}

TEST(Attention, BothPathsMatchReferenceWithGqaAndWindow) {
  const std::int64_t heads = 6, kv_heads = 2, d = 16, n_k = 300;
  const auto k = random_values(static_cast<std::size_t>(n_k * kv_heads * d), 11);
  const auto v = random_values(static_cast<std::size_t>(n_k * kv_heads * d), 12);
  for (const std::int64_t window : {0, 37}) {
    // Prefill: all 300 queries (BLAS path, more than one 256-row block).
    {
      const std::int64_t n_q = n_k;
      const auto q = random_values(static_cast<std::size_t>(n_q * heads * d), 13);
      std::vector<std::int32_t> pos(static_cast<std::size_t>(n_q));
      for (std::int64_t i = 0; i < n_q; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(i);
      std::vector<float> out(q.size());
      attention(q.data(), n_q, pos.data(), k.data(), v.data(), n_k, heads, kv_heads, d, window, out.data());
      EXPECT_LE(max_relative(out, attention_ref(q, n_q, pos, k, v, n_k, heads, kv_heads, d, window)), 1e-5) << "prefill window " << window;
    }
    // Prefill after a cached prefix: 200 queries at positions 100..299 (their blocks see keys from 0).
    {
      const std::int64_t n_q = 200;
      const auto q = random_values(static_cast<std::size_t>(n_q * heads * d), 15);
      std::vector<std::int32_t> pos(static_cast<std::size_t>(n_q));
      for (std::int64_t i = 0; i < n_q; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(100 + i);
      std::vector<float> out(q.size());
      attention(q.data(), n_q, pos.data(), k.data(), v.data(), n_k, heads, kv_heads, d, window, out.data());
      EXPECT_LE(max_relative(out, attention_ref(q, n_q, pos, k, v, n_k, heads, kv_heads, d, window)), 1e-5) << "cached prefill window " << window;
    }
    // Decode: two queries at the end (per-query path).
    {
      const std::int64_t n_q = 2;
      const auto q = random_values(static_cast<std::size_t>(n_q * heads * d), 14);
      const std::vector<std::int32_t> pos = {298, 299};
      std::vector<float> out(q.size());
      attention(q.data(), n_q, pos.data(), k.data(), v.data(), n_k, heads, kv_heads, d, window, out.data());
      EXPECT_LE(max_relative(out, attention_ref(q, n_q, pos, k, v, n_k, heads, kv_heads, d, window)), 1e-5) << "decode window " << window;
    }
  }
}

TEST(Attention, CachedBf16AndFp8MatchTheirWidenedValues) {
  const std::int64_t heads = 6, kv_heads = 2, d = 16, n_k = 40;
  const auto k = random_values(static_cast<std::size_t>(n_k * kv_heads * d), 21);
  const auto v = random_values(static_cast<std::size_t>(n_k * kv_heads * d), 22);
  std::vector<std::uint16_t> kb(k.size()), vb(v.size());
  convert_f32_to_bf16(k.data(), kb.data(), k.size());
  convert_f32_to_bf16(v.data(), vb.data(), v.size());
  std::vector<std::uint8_t> k8(k.size()), v8(v.size());
  const float ks = 0.01f, vs = 0.02f;  // code value x scale
  for (std::size_t i = 0; i < k.size(); ++i) {
    k8[i] = f32_to_e4m3(k[i] / ks);
    v8[i] = f32_to_e4m3(v[i] / vs);
  }
  const std::vector<KvRows> keys = {{kb.data(), KvElement::bf16, 1.0f}, {k8.data(), KvElement::e4m3, ks}};
  const std::vector<KvRows> values = {{vb.data(), KvElement::bf16, 1.0f}, {v8.data(), KvElement::e4m3, vs}};
  for (std::size_t t = 0; t < keys.size(); ++t) {
    std::vector<float> kf(k.size()), vf(v.size());
    kv_to_f32(keys[t], 0, static_cast<std::int64_t>(k.size()), kf.data());
    kv_to_f32(values[t], 0, static_cast<std::int64_t>(v.size()), vf.data());
    for (std::size_t i = 0; i < k.size(); ++i) {
      const float expect = t == 0 ? bf16_to_f32(kb[i]) : e4m3_to_f32(k8[i]) * ks;
      ASSERT_EQ(kf[i], expect);
      ASSERT_NEAR(kf[i], k[i], 0.07f * std::fabs(k[i]) + 0.01f);  // the stored value is close to the original
    }
    for (const std::int64_t n_q : {2, 12}) {  // decode reads the cache in place; prefill widens it first
      const auto q = random_values(static_cast<std::size_t>(n_q * heads * d), 23);
      std::vector<std::int32_t> pos(static_cast<std::size_t>(n_q));
      for (std::int64_t i = 0; i < n_q; ++i) pos[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(n_k - n_q + i);
      std::vector<float> out(q.size());
      attention_cached(q.data(), n_q, pos.data(), keys[t], values[t], n_k, heads, kv_heads, d, 0, out.data());
      EXPECT_LE(max_relative(out, attention_ref(q, n_q, pos, kf, vf, n_k, heads, kv_heads, d, 0)), 1e-5) << "type " << t << " n_q " << n_q;
    }
  }
}

TEST(SimdOps, ExpWithinTwoUlpOfStdExp) {
  if (!cpu_features().avx2 || !cpu_features().fma) GTEST_SKIP() << "no AVX2/FMA on this CPU";
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> wide(-100.0f, 100.0f), narrow(-5.0f, 5.0f);
  std::vector<float> x;
  for (int i = 0; i < 20000; ++i) x.push_back(i % 2 ? wide(rng) : narrow(rng));
  for (const float v : {0.0f, -0.0f, 1.0f, -87.33f, -87.34f, 88.72f, 88.73f, -1e30f, 1e30f, INFINITY, -INFINITY}) x.push_back(v);
  x.push_back(NAN);
  std::vector<float> y = x;
  avx2::exp_inplace(y.data(), static_cast<std::int64_t>(y.size()));  // 20012: a tail of 4 too
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float want = std::exp(x[i]);
    if (std::isnan(x[i])) {
      EXPECT_TRUE(std::isnan(y[i]));
    } else if (x[i] < -87.336f) {
      EXPECT_EQ(y[i], 0.0f) << x[i];
      EXPECT_LT(want, 1.1757e-38f);
    } else if (std::isinf(want)) {
      EXPECT_TRUE(std::isinf(y[i]) && y[i] > 0) << x[i];
    } else {
      EXPECT_LE(std::fabs(y[i] - want), 2.0f * (std::nextafter(want, INFINITY) - want)) << "x = " << x[i] << ": " << y[i] << " vs " << want;
    }
  }
  // exp_shifted_sum: the same values less the shift, and their sum.
  std::vector<float> row(std::vector<float>(x.begin(), x.begin() + 1001));
  for (float& v : row) v = std::min(v, 50.0f);
  std::vector<float> got = row;
  const float total = avx2::exp_shifted_sum(got.data(), static_cast<std::int64_t>(got.size()), 50.0f);
  double want_total = 0;
  for (std::size_t i = 0; i < row.size(); ++i) {
    const double e = std::exp(static_cast<double>(row[i] - 50.0f));  // the f32 difference is the input
    want_total += e;
    EXPECT_NEAR(got[i], e, 3e-7 * e + 1e-37);
  }
  EXPECT_NEAR(total, want_total, 1e-6 * want_total);
}

// The AVX-512 exp_shifted_sum gives the AVX2 one's bits: every exponential and the sum, on rows of
// every tail length (1-40), over the whole range with infinities and a NaN.
TEST(SimdOps, Avx512ExpShiftedSumIsTheAvx2OnesBits) {
  if (!cpu_features().avx512f || !cpu_features().avx2 || !cpu_features().fma) GTEST_SKIP() << "no AVX-512F on this CPU";
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> wide(-120.0f, 10.0f), narrow(-6.0f, 0.0f);
  std::vector<float> x;
  for (int i = 0; i < 3000; ++i) x.push_back(i % 3 ? narrow(rng) : wide(rng));
  for (const float v : {0.0f, -0.0f, -87.33f, -87.34f, -1e30f, -INFINITY, NAN}) x.push_back(v);
  std::int64_t checked = 0;
  for (std::int64_t n = 1; n <= 40; ++n) {
    for (std::size_t start = 0; start + static_cast<std::size_t>(n) <= x.size(); start += 97) {
      std::vector<float> a(x.begin() + static_cast<std::ptrdiff_t>(start), x.begin() + static_cast<std::ptrdiff_t>(start) + n), b = a;
      const float sa = avx2::exp_shifted_sum(a.data(), n, 0.5f), sb = avx512::exp_shifted_sum(b.data(), n, 0.5f);
      ASSERT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "n " << n << " start " << start;
      ASSERT_EQ(std::memcmp(&sa, &sb, sizeof(float)), 0) << "n " << n << " start " << start << ": " << sa << " vs " << sb;
      ++checked;
    }
  }
  std::vector<float> a(x.begin(), x.begin() + 3001), b = a;  // a long row: the 16-wide loop, then a tail of 9
  const float sa = avx2::exp_shifted_sum(a.data(), 3001, 1.0f), sb = avx512::exp_shifted_sum(b.data(), 3001, 1.0f);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(&sa, &sb, sizeof(float)), 0) << sa << " vs " << sb;
  EXPECT_GT(sa, 0.0f);
  EXPECT_GT(checked, 1000);
}

TEST(SimdOps, ExpSumInDoubleWithinTwoUlpOfStdExp) {
  if (!cpu_features().avx2 || !cpu_features().fma) GTEST_SKIP() << "no AVX2/FMA on this CPU";
  // One term at a time (the tail path): each e^x within 2 ulp of std::exp in f64.
  std::mt19937 rng(31);
  std::uniform_real_distribution<float> wide(-707.0f, 0.0f), narrow(-3.0f, 0.0f);
  std::vector<float> xs = {0.0f, -0.0f, -1e-30f, -0.34657f, -0.34658f, -1.0f, -707.9f, -708.1f, -745.0f, -1e30f, -INFINITY};
  for (int i = 0; i < 20000; ++i) xs.push_back(i % 2 ? wide(rng) : narrow(rng));
  for (const float x : xs) {
    const double got = avx2::exp_sum_f64(&x, 1, 0.0);
    const double want = std::exp(static_cast<double>(x));
    if (x < -708.0f) {
      EXPECT_EQ(got, 0.0) << x;
    } else {
      EXPECT_LE(std::fabs(got - want), 2.0 * (std::nextafter(want, INFINITY) - want)) << "x = " << x << ": " << got << " vs " << want;
    }
  }
  // Whole rows (the 8-wide loop and every tail length) against the sum of std::exp terms.
  for (const std::int64_t n : {1, 3, 7, 8, 9, 15, 16, 17, 4096, 4099}) {
    auto row = random_values(static_cast<std::size_t>(n), static_cast<std::uint32_t>(40 + n), 8.0f);
    const double shift = 9.0;
    double want = 0;
    for (const float v : row) want += std::exp(static_cast<double>(v) - shift);
    EXPECT_NEAR(avx2::exp_sum_f64(row.data(), n, shift), want, 1e-15 * want * static_cast<double>(n)) << n;
    // The weighted sum, against its definition; a -inf in the first row adds nothing.
    auto other = random_values(static_cast<std::size_t>(n), static_cast<std::uint32_t>(90 + n), 8.0f);
    if (n > 5) row[4] = -INFINITY;
    double sum = 0, weighted = 0, want_sum = 0, want_weighted = 0;
    avx2::exp_sum_weighted_difference(row.data(), other.data(), n, shift, sum, weighted);
    for (std::int64_t i = 0; i < n; ++i) {
      const double e = std::exp(static_cast<double>(row[static_cast<std::size_t>(i)]) - shift);
      want_sum += e;
      if (e > 0) want_weighted += e * (static_cast<double>(row[static_cast<std::size_t>(i)]) - other[static_cast<std::size_t>(i)]);
    }
    EXPECT_NEAR(sum, want_sum, 1e-15 * want_sum * static_cast<double>(n)) << n;
    EXPECT_NEAR(weighted, want_weighted, 1e-14 * want_sum * static_cast<double>(n)) << n;
  }
}

TEST(Ops, LogSumExpAndSoftmaxKlMatchTheirDefinitions) {
  // Against long-double definitions on rows of a vocabulary's size: log Σ e^x, and KL(p ‖ q) as
  // Σ p (log p - log q) term by term.
  for (const std::int64_t n : {1, 2, 13, 4096, 32003}) {
    for (const float spread : {0.5f, 12.0f}) {
      const auto a = random_values(static_cast<std::size_t>(n), static_cast<std::uint32_t>(n) + 1, spread);
      auto b = a;
      const auto noise = random_values(static_cast<std::size_t>(n), static_cast<std::uint32_t>(n) + 2, 0.05f * spread);
      for (std::size_t i = 0; i < b.size(); ++i) b[i] += noise[i] + 3.0f;  // a constant shift changes nothing
      auto lse = [](const std::vector<float>& x) {
        long double m = -INFINITY, s = 0;
        for (const float v : x) m = std::max(m, static_cast<long double>(v));
        for (const float v : x) s += std::exp(static_cast<long double>(v) - m);
        return m + std::log(s);
      };
      const long double la = lse(a), lb = lse(b);
      long double kl = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        const long double pa = static_cast<long double>(a[i]) - la, pb = static_cast<long double>(b[i]) - lb;
        kl += std::exp(pa) * (pa - pb);
      }
      EXPECT_NEAR(log_sum_exp(a.data(), n), static_cast<double>(la), 1e-13 * std::max(1.0, std::fabs(static_cast<double>(la)))) << n;
      double got_la = 0, got_lb = 0;
      const double got = softmax_kl(a.data(), b.data(), n, got_la, got_lb);
      EXPECT_NEAR(got_la, static_cast<double>(la), 1e-13 * std::max(1.0, std::fabs(static_cast<double>(la))));
      EXPECT_NEAR(got_lb, static_cast<double>(lb), 1e-13 * std::max(1.0, std::fabs(static_cast<double>(lb))));
      EXPECT_NEAR(got, static_cast<double>(kl), 1e-12 + 1e-9 * static_cast<double>(kl)) << n << " spread " << spread;
      if (n > 1) EXPECT_GT(got, 0.0);
      EXPECT_NEAR(softmax_kl(a.data(), a.data(), n, got_la, got_lb), 0.0, 1e-14);
    }
  }
  // Rows that are not finite: +inf and NaN give a non-finite result, -inf entries weigh nothing.
  std::vector<float> x = {1.0f, -INFINITY, 2.0f}, y = {0.5f, 1.0f, 2.5f};
  double la = 0, lb = 0;
  const double kl = softmax_kl(x.data(), y.data(), 3, la, lb);
  const double p1 = 1.0 / (1.0 + std::exp(1.0)), p2 = 1.0 - p1;
  const double ly = std::log(std::exp(0.5) + std::exp(1.0) + std::exp(2.5));
  EXPECT_NEAR(kl, p1 * (std::log(p1) - (0.5 - ly)) + p2 * (std::log(p2) - (2.5 - ly)), 1e-12);
  EXPECT_DOUBLE_EQ(log_sum_exp(x.data(), 2), 1.0);
  const std::vector<float> all_minus_inf = {-INFINITY, -INFINITY};
  EXPECT_EQ(log_sum_exp(all_minus_inf.data(), 2), -INFINITY);
  x[1] = INFINITY;
  EXPECT_EQ(log_sum_exp(x.data(), 3), INFINITY);
  EXPECT_FALSE(std::isfinite(softmax_kl(x.data(), y.data(), 3, la, lb)));
  x[1] = NAN;
  EXPECT_TRUE(std::isnan(log_sum_exp(x.data(), 3)));
  EXPECT_TRUE(std::isnan(softmax_kl(y.data(), x.data(), 3, la, lb)));
}

TEST(SimdOps, SiluMulMatchesItsDefinition) {
  if (!cpu_features().avx2 || !cpu_features().fma) GTEST_SKIP() << "no AVX2/FMA on this CPU";
  auto g = random_values(1003, 21);
  for (float& v : g) v *= 12.0f;
  g[5] = 95.0f;
  g[6] = -95.0f;
  const auto u = random_values(1003, 22);
  std::vector<float> fast = g;
  avx2::silu_mul(fast.data(), u.data(), static_cast<std::int64_t>(g.size()));
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double want = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
    EXPECT_NEAR(fast[i], want, 4e-7 * std::fabs(want) + 1e-30) << g[i];
  }
}

TEST(SiluMul, Definition) {
  std::vector<float> g = {0.0f, 1.0f, -2.0f};
  const std::vector<float> u = {3.0f, 2.0f, 1.0f};
  silu_mul(g.data(), u.data(), 3);
  EXPECT_FLOAT_EQ(g[0], 0.0f);
  EXPECT_NEAR(g[1], 2.0f / (1.0f + std::exp(-1.0f)), 1e-6);
  EXPECT_NEAR(g[2], -2.0f / (1.0f + std::exp(2.0f)), 1e-6);
}

}  // namespace
}  // namespace mopt::kernels
