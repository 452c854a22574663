// Training's products side by side in one run: the f32 product (OpenBLAS, matmul_f32) against the
// bf16-operand product of mixed-precision training (matmul_bf16_operands: AMX tiles where the CPU has
// them, `mopt --version` says whether), on the Linears of a training step of T tokens — forward
// Y = X·Wᵀ, dX = dY·W, dW += dYᵀ·X — for SmolLM2-135M's and tiny-kjv's shapes, and the LM head's
// forward with the head rounded once (Bf16Operand) per step, and one layer's attention (forward and
// backward: six products, f32 against bf16 operands) at 4 sequences x T/4 tokens. Medians of
// interleaved repeats.
//   train_gemm_bench [tokens=2048] [repeats=7]
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/startup_settings.h"
#include "core/thread_pool.h"
#include "kernels/backward.h"
#include "kernels/gemm.h"

using namespace mopt;
using bench::random_floats;

namespace {

struct Product {
  std::string name;
  bool ta, tb;
  std::int64_t m, n, k;
};

}  // namespace

int main(int argc, char** argv) {
  choose_startup_settings(argv);  // the libraries set up as mopt sets them
  const std::int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 2048;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 7;
  start_thread_pool();
  std::printf("threads %d, bf16 operands on %s, %lld tokens, medians of %d\n", compute_threads(),
              kernels::amx_bf16_products() ? "AMX tiles" : "OpenBLAS (rounded copies)", static_cast<long long>(tokens), repeats);
  // Linear [out, in]: forward m = T, n = out, k = in (W transposed); dX m = T, n = in, k = out;
  // dW m = out, n = in, k = T (dY transposed).
  std::vector<Product> products;
  const auto linear = [&](const char* name, std::int64_t out, std::int64_t in) {
    products.push_back({std::string(name) + " fwd", false, true, tokens, out, in});
    products.push_back({std::string(name) + " dX", false, false, tokens, in, out});
    products.push_back({std::string(name) + " dW", true, false, out, in, tokens});
  };
  linear("smollm2 q/o [576,576]", 576, 576);
  linear("smollm2 k/v [192,576]", 192, 576);
  linear("smollm2 gate/up [1536,576]", 1536, 576);
  linear("smollm2 down [576,1536]", 576, 1536);
  linear("tiny-kjv gate/up [704,256]", 704, 256);
  linear("tiny-kjv down [256,704]", 256, 704);
  linear("tiny-kjv q/o [256,256]", 256, 256);
  std::printf("%-34s %10s %10s %9s %9s %7s\n", "product", "f32 ms", "bf16 ms", "f32 GF/s", "bf16 GF/s", "ratio");
  for (const Product& p : products) {
    const std::int64_t a_size = p.m * p.k, b_size = p.k * p.n;
    const auto a = random_floats(static_cast<std::size_t>(a_size), 1), b = random_floats(static_cast<std::size_t>(b_size), 2);
    std::vector<float> c(static_cast<std::size_t>(p.m * p.n));
    const std::int64_t lda = p.ta ? p.m : p.k, ldb = p.tb ? p.k : p.n;
    std::vector<double> t32, t16;
    for (int r = 0; r < repeats + 1; ++r) {
      auto t = std::chrono::steady_clock::now();
      kernels::matmul_f32(p.ta, p.tb, p.m, p.n, p.k, a.data(), lda, b.data(), ldb, c.data(), p.n, false);
      const double s32 = bench::seconds_since(t);
      t = std::chrono::steady_clock::now();
      kernels::matmul_bf16_operands(p.ta, p.tb, p.m, p.n, p.k, a.data(), lda, b.data(), ldb, c.data(), p.n, false);
      const double s16 = bench::seconds_since(t);
      if (r > 0) {
        t32.push_back(s32);
        t16.push_back(s16);
      }
    }
    const double f = 2.0 * static_cast<double>(p.m * p.n * p.k), m32 = bench::median(t32), m16 = bench::median(t16);
    std::printf("%-34s %10.2f %10.2f %9.1f %9.1f %6.2fx\n", p.name.c_str(), m32 * 1e3, m16 * 1e3, f / m32 / 1e9, f / m16 / 1e9, m32 / m16);
  }
  // The f32 weight gradients dW += dYᵀ·X (a long sum over the step's tokens into a small C): matmul_f32,
  // which cuts such a sum into chunks (kernels::matmul_sum_chunks), against one sum per block of C in
  // about 16 square blocks (matmul_f32's cut before the split; its blocks were thin at this shape).
  std::printf("\nf32 dW over %lld tokens: one sum in square blocks against the split sum\n", static_cast<long long>(tokens));
  std::printf("%-34s %10s %10s %7s %7s\n", "product", "one ms", "split ms", "chunks", "ratio");
  for (const Product& p : products) {
    if (!p.ta) continue;
    const auto a = random_floats(static_cast<std::size_t>(p.m * p.k), 1), b = random_floats(static_cast<std::size_t>(p.k * p.n), 2);
    std::vector<float> c(static_cast<std::size_t>(p.m * p.n), 0.0f);
    const double target = std::max(static_cast<double>(std::int64_t{1} << 20), static_cast<double>(p.m * p.n * p.k) / 16.0);
    const auto round_up = [](std::int64_t v, std::int64_t to) { return (std::max<std::int64_t>(v, 1) + to - 1) / to * to; };
    const std::int64_t mt = std::min(round_up(p.m, 16), round_up(std::max<std::int64_t>(static_cast<std::int64_t>(std::sqrt(target / static_cast<double>(p.k))), 32), 16));
    const std::int64_t nt = std::min(round_up(p.n, 64), round_up(static_cast<std::int64_t>(target / static_cast<double>(mt * p.k)), 64));
    const std::int64_t row_blocks = (p.m + mt - 1) / mt, col_blocks = (p.n + nt - 1) / nt;
    std::vector<double> t_one, t_split;
    for (int r = 0; r < repeats + 1; ++r) {
      auto t = std::chrono::steady_clock::now();
      parallel_for(row_blocks * col_blocks, [&](std::int64_t block) {
        const std::int64_t i0 = block / col_blocks * mt, j0 = block % col_blocks * nt;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(std::min(mt, p.m - i0)), static_cast<blasint>(std::min(nt, p.n - j0)),
                    static_cast<blasint>(p.k), 1.0f, a.data() + i0, static_cast<blasint>(p.m), b.data() + j0, static_cast<blasint>(p.n), 1.0f,
                    c.data() + i0 * p.n + j0, static_cast<blasint>(p.n));
      });
      const double s_one = bench::seconds_since(t);
      t = std::chrono::steady_clock::now();
      kernels::matmul_f32(true, false, p.m, p.n, p.k, a.data(), p.m, b.data(), p.n, c.data(), p.n, true);
      const double s_split = bench::seconds_since(t);
      if (r > 0) {
        t_one.push_back(s_one);
        t_split.push_back(s_split);
      }
    }
    const double m_one = bench::median(t_one), m_split = bench::median(t_split);
    std::printf("%-34s %10.2f %10.2f %7lld %6.2fx\n", p.name.c_str(), m_one * 1e3, m_split * 1e3,
                static_cast<long long>(kernels::matmul_sum_chunks(p.m, p.n, p.k)), m_one / m_split);
  }
  std::printf("\n");
  // The head: logits [chunk, V] = x · headᵀ per chunk of tokens, the head rounded once per step.
  const std::int64_t vocab = 49152, hidden = 576, chunk = (std::int64_t{8} << 20) / vocab;
  const auto head = random_floats(static_cast<std::size_t>(vocab * hidden), 3), x = random_floats(static_cast<std::size_t>(tokens * hidden), 4);
  std::vector<float> logits(static_cast<std::size_t>(chunk * vocab));
  std::vector<double> t32, t16;
  kernels::Bf16Operand operand;
  for (int r = 0; r < repeats + 1; ++r) {
    auto t = std::chrono::steady_clock::now();
    for (std::int64_t c0 = 0; c0 < tokens; c0 += chunk) {
      kernels::matmul_f32(false, true, std::min(chunk, tokens - c0), vocab, hidden, x.data() + c0 * hidden, hidden, head.data(), hidden,
                          logits.data(), vocab, false);
    }
    const double s32 = bench::seconds_since(t);
    t = std::chrono::steady_clock::now();
    operand.assign(true, hidden, vocab, head.data(), hidden);
    for (std::int64_t c0 = 0; c0 < tokens; c0 += chunk) {
      operand.multiply(false, std::min(chunk, tokens - c0), x.data() + c0 * hidden, hidden, logits.data(), vocab, false);
    }
    const double s16 = bench::seconds_since(t);
    if (r > 0) {
      t32.push_back(s32);
      t16.push_back(s16);
    }
  }
  const double f = 2.0 * static_cast<double>(tokens * vocab * hidden), m32 = bench::median(t32), m16 = bench::median(t16);
  std::printf("%-34s %10.2f %10.2f %9.1f %9.1f %6.2fx\n", "smollm2 head fwd (chunks of 170)", m32 * 1e3, m16 * 1e3, f / m32 / 1e9, f / m16 / 1e9,
              m32 / m16);
  // SmolLM2's attention: 9 heads, 3 key/value heads, head_dim 64, 4 causal sequences.
  const std::int64_t heads = 9, kv_heads = 3, d = 64, sequences = 4, per = tokens / sequences;
  std::vector<std::int64_t> bounds;
  for (std::int64_t s = 0; s <= sequences; ++s) bounds.push_back(s * per);
  const std::int64_t rows = per * sequences;
  const auto q = random_floats(static_cast<std::size_t>(rows * heads * d), 5), k = random_floats(static_cast<std::size_t>(rows * kv_heads * d), 6),
             v = random_floats(static_cast<std::size_t>(rows * kv_heads * d), 7), dout = random_floats(q.size(), 8);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(rows * heads)), dq(q.size()), dk(k.size()), dv(v.size());
  t32.clear();
  t16.clear();
  for (int r = 0; r < repeats + 1; ++r) {
    for (const bool bf16 : {false, true}) {
      const auto t = std::chrono::steady_clock::now();
      kernels::attention_saving(q.data(), k.data(), v.data(), bounds, heads, kv_heads, d, 0, out.data(), lse.data(), bf16);
      kernels::attention_backward(q.data(), k.data(), v.data(), out.data(), lse.data(), dout.data(), bounds, heads, kv_heads, d, 0, dq.data(), dk.data(),
                                  dv.data(), bf16);
      if (r > 0) (bf16 ? t16 : t32).push_back(bench::seconds_since(t));
    }
  }
  std::printf("%-34s %10.2f %10.2f %9s %9s %6.2fx\n", "smollm2 attention fwd+bwd, 1 layer", bench::median(t32) * 1e3, bench::median(t16) * 1e3, "-", "-",
              bench::median(t32) / bench::median(t16));
  return 0;
}
