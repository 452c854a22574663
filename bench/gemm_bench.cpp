// The prefill GEMMs side by side in one run, on the Linear shapes of Llama-3.2-1B
// (m input rows x k inputs -> n outputs), medians of interleaved repeats:
//   bf16 weights: widened to f32 tile by tile and multiplied by OpenBLAS (Precision::f32)
//                 against the AVX-512 BF16 kernels (gemm_bf16 itself, whether or not
//                 Precision::bf16 chooses them on this CPU: --version says which it does);
//   f32 weights:  OpenBLAS sgemm, the ceiling of the f32 path;
//   W8A8:         the AVX2 int8 GEMM against the AVX-512 VNNI panels.
// Usage: gemm_bench [rows=512] [repeats=7]
#include <cblas.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/startup_settings.h"
#include "core/thread_pool.h"
#include "bench_util.h"
#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/tensor.h"
#include "kernels/gemm.h"
#include "kernels/linear.h"
#include "kernels/qlinear_simd.h"

using namespace mopt;
using bench::random_floats;

namespace {

template <class F>
double time_once(F&& f) {
  const auto t = std::chrono::steady_clock::now();
  f();
  return bench::seconds_since(t);
}

}  // namespace

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);  // the libraries set up as mopt sets them
  const std::int64_t m = argc > 1 ? std::atoll(argv[1]) : 512;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 7;
  std::printf("cpu: %s\ngemm: %s\nrows %lld, medians of %d interleaved repeats, GFLOP/s (int8: GOP/s)\n\n", describe(cpu_features()).c_str(),
              kernels::describe_gemm().c_str(), static_cast<long long>(m), repeats);
  struct Shape { const char* name; std::int64_t n, k; };
  const Shape shapes[] = {{"q/o 2048x2048", 2048, 2048}, {"k/v 512x2048", 512, 2048}, {"gate/up 8192x2048", 8192, 2048}, {"down 2048x8192", 2048, 8192}};
  std::printf("%-20s %10s %10s %7s | %10s %10s %7s | %10s %10s %7s\n", "shape", "f32 pool", "f32 blasthr", "ratio", "bf16->f32", "bf16 ours", "ratio", "int8 avx2", "int8 vnni", "ratio");
  for (const Shape& s : shapes) {
    const auto x = random_floats(static_cast<std::size_t>(m * s.k), 1);
    const auto w = random_floats(static_cast<std::size_t>(s.n * s.k), 2);
    const Tensor wf = Tensor::from_f32(w, {s.n, s.k});
    const Tensor wb = wf.to(DType::BF16);
    std::vector<float> y(static_cast<std::size_t>(m * s.n));
    std::vector<std::int8_t> xq(static_cast<std::size_t>(m * s.k)), wq(static_cast<std::size_t>(s.n * s.k));
    for (std::size_t i = 0; i < xq.size(); ++i) xq[i] = static_cast<std::int8_t>(x[i] * 127);
    for (std::size_t i = 0; i < wq.size(); ++i) wq[i] = static_cast<std::int8_t>(w[i] * 127);
    std::vector<float> factor(static_cast<std::size_t>(s.n), 1e-4f);
    const bool bf16 = kernels::bf16_gemm_available(), vnni = kernels::vnni_gemm_available(), avx2 = cpu_features().avx2;
    kernels::Int8Panels panels;
    if (vnni) panels = kernels::Int8Panels(wq.data(), s.k, s.n, s.k);
    std::vector<double> t_f32, t_blas_threads, t_widen, t_bf16, t_avx2, t_vnni;
    for (int r = 0; r < repeats; ++r) {
      // The same product in one OpenBLAS call on OpenBLAS's own threads (which mopt never uses): what
      // the pool's split costs or gains.
      t_blas_threads.push_back(time_once([&] {
        openblas_set_num_threads(compute_threads());
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(s.n), static_cast<blasint>(s.k), 1.0f,
                    x.data(), static_cast<blasint>(s.k), w.data(), static_cast<blasint>(s.k), 0.0f, y.data(), static_cast<blasint>(s.n));
        openblas_set_num_threads(1);
      }));
      t_f32.push_back(time_once([&] { kernels::gemm_f32(x.data(), m, s.k, w.data(), s.n, y.data()); }));
      t_widen.push_back(time_once([&] { kernels::linear_forward(x.data(), m, wb, nullptr, y.data(), kernels::Precision::f32); }));
      if (bf16) {
        const std::uint16_t* wbits = wb.data<std::uint16_t>();
        t_bf16.push_back(time_once([&] { kernels::gemm_bf16(x.data(), m, s.k, wbits, s.k, s.n, y.data()); }));
      }
      if (avx2 && s.k % 32 == 0) {
        t_avx2.push_back(time_once([&] {
          parallel_for(s.n / 64, [&](std::int64_t b) {
            kernels::avx2::int8_gemm(wq.data(), s.k, b * 64, (b + 1) * 64, xq.data(), m, factor.data(), y.data(), s.n);
          });
        }));
      }
      if (vnni) t_vnni.push_back(time_once([&] { panels.multiply(xq.data(), m, factor.data(), y.data()); }));
    }
    const double flop = 2.0 * static_cast<double>(m) * static_cast<double>(s.n) * static_cast<double>(s.k) / 1e9;
    const auto rate = [&](const std::vector<double>& t) { return t.empty() ? 0.0 : flop / bench::median(t); };
    std::printf("%-20s %10.1f %10.1f %6.2fx | %10.1f %10.1f %6.2fx | %10.1f %10.1f %6.2fx\n", s.name, rate(t_f32), rate(t_blas_threads),
                rate(t_f32) / rate(t_blas_threads), rate(t_widen), rate(t_bf16),
                rate(t_widen) > 0 ? rate(t_bf16) / rate(t_widen) : 0.0, rate(t_avx2), rate(t_vnni),
                rate(t_avx2) > 0 ? rate(t_vnni) / rate(t_avx2) : 0.0);
  }
  return 0;
}
