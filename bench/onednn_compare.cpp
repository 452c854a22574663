// Our GEMMs against oneDNN's matmul on the same shapes, side by side in one run (issue 22 named
// oneDNN as the expected library; this is the measurement behind using our own kernels instead).
// Built only where oneDNN is installed (Debian: libdnnl-dev; not a dependency of mopt).
//   onednn_compare [rows=512] [repeats=7]
// oneDNN gets its inputs ready in bf16 / u8 (no conversion timed); ours take the f32 input (bf16)
// or the int8 codes (W8A8) as mopt's forward pass hands them over, packing included; the f32
// columns put oneDNN's f32 matmul beside OpenBLAS's sgemm (mopt's f32 path).
#include <dnnl.hpp>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/startup_settings.h"
#include "bench_util.h"
#include "core/convert.h"
#include "kernels/gemm.h"

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
  if (!kernels::bf16_gemm_available() || !kernels::vnni_gemm_available()) {
    std::printf("this CPU lacks AVX-512 BF16 or VNNI: nothing of ours to compare\n");
    return 0;
  }
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream strm(eng);
  std::printf("gemm: %s; oneDNN %d.%d.%d\nrows %lld, medians of %d interleaved repeats; GFLOP/s (int8: GOP/s)\n\n", kernels::describe_gemm().c_str(),
              dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch, static_cast<long long>(m), repeats);
  std::printf("%-20s %12s %12s %7s | %12s %12s %7s | %12s %12s %7s\n", "shape", "oneDNN f32", "OpenBLAS f32", "ratio", "oneDNN bf16",
              "ours bf16", "ratio", "oneDNN s8", "ours s8", "ratio");
  struct Shape { const char* name; std::int64_t n, k; };
  for (const Shape s : {Shape{"q/o 2048x2048", 2048, 2048}, Shape{"k/v 512x2048", 512, 2048}, Shape{"gate/up 8192x2048", 8192, 2048},
                        Shape{"down 2048x8192", 2048, 8192}}) {
    const auto x = random_floats(static_cast<std::size_t>(m * s.k), 1);
    const auto w = random_floats(static_cast<std::size_t>(s.n * s.k), 2);
    std::vector<std::uint16_t> xb(x.size()), wb(w.size());
    for (std::size_t i = 0; i < x.size(); ++i) xb[i] = f32_to_bf16(x[i]);
    for (std::size_t i = 0; i < w.size(); ++i) wb[i] = f32_to_bf16(w[i]);
    std::vector<std::int8_t> xq(x.size()), wq(w.size());
    std::vector<std::uint8_t> xu(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      xq[i] = static_cast<std::int8_t>(x[i] * 127);
      xu[i] = static_cast<std::uint8_t>(static_cast<std::uint8_t>(xq[i]) ^ 0x80u);
    }
    for (std::size_t i = 0; i < w.size(); ++i) wq[i] = static_cast<std::int8_t>(w[i] * 127);
    std::vector<float> y(static_cast<std::size_t>(m * s.n)), factor(static_cast<std::size_t>(s.n), 1e-4f);
    std::vector<std::int32_t> y32(y.size());

    // Weights [n, k] row-major are the {k, n} matrix in tag::ba.
    const dnnl::memory::desc src_bf16({m, s.k}, dt::bf16, tag::ab), wei_bf16({s.k, s.n}, dt::bf16, tag::ba),
        dst_f32({m, s.n}, dt::f32, tag::ab);
    const dnnl::memory::desc src_u8({m, s.k}, dt::u8, tag::ab), wei_s8({s.k, s.n}, dt::s8, tag::ba), dst_s32({m, s.n}, dt::s32, tag::ab);
    const dnnl::memory::desc src_f32({m, s.k}, dt::f32, tag::ab), wei_f32({s.k, s.n}, dt::f32, tag::ba);
    const dnnl::matmul mm_f32(dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_f32, wei_f32, dst_f32), eng));
    dnnl::memory m_xf(src_f32, eng, const_cast<float*>(x.data())), m_wf(wei_f32, eng, const_cast<float*>(w.data()));
    const dnnl::matmul mm_bf16(dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_bf16, wei_bf16, dst_f32), eng));
    const dnnl::matmul mm_s8(dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_u8, wei_s8, dst_s32), eng));
    dnnl::memory m_xb(src_bf16, eng, xb.data()), m_wb(wei_bf16, eng, wb.data()), m_y(dst_f32, eng, y.data());
    dnnl::memory m_xu(src_u8, eng, xu.data()), m_wq(wei_s8, eng, wq.data()), m_y32(dst_s32, eng, y32.data());
    const kernels::Int8Panels panels(wq.data(), s.k, s.n, s.k);

    std::vector<double> t_dnnl_f32, t_blas_f32, t_dnnl_bf16, t_ours_bf16, t_dnnl_s8, t_ours_s8;
    for (int r = 0; r < repeats; ++r) {
      t_dnnl_f32.push_back(time_once([&] {
        mm_f32.execute(strm, {{DNNL_ARG_SRC, m_xf}, {DNNL_ARG_WEIGHTS, m_wf}, {DNNL_ARG_DST, m_y}});
        strm.wait();
      }));
      t_blas_f32.push_back(time_once([&] { kernels::gemm_f32(x.data(), m, s.k, w.data(), s.n, y.data()); }));
      t_dnnl_bf16.push_back(time_once([&] {
        mm_bf16.execute(strm, {{DNNL_ARG_SRC, m_xb}, {DNNL_ARG_WEIGHTS, m_wb}, {DNNL_ARG_DST, m_y}});
        strm.wait();
      }));
      t_ours_bf16.push_back(time_once([&] { kernels::gemm_bf16(x.data(), m, s.k, wb.data(), s.k, s.n, y.data()); }));
      t_dnnl_s8.push_back(time_once([&] {
        mm_s8.execute(strm, {{DNNL_ARG_SRC, m_xu}, {DNNL_ARG_WEIGHTS, m_wq}, {DNNL_ARG_DST, m_y32}});
        strm.wait();
      }));
      t_ours_s8.push_back(time_once([&] { panels.multiply(xq.data(), m, factor.data(), y.data()); }));
    }
    const double flop = 2.0 * static_cast<double>(m) * static_cast<double>(s.n) * static_cast<double>(s.k) / 1e9;
    const auto rate = [&](const std::vector<double>& t) { return flop / bench::median(t); };
    std::printf("%-20s %12.1f %12.1f %6.2fx | %12.1f %12.1f %6.2fx | %12.1f %12.1f %6.2fx\n", s.name, rate(t_dnnl_f32), rate(t_blas_f32),
                rate(t_blas_f32) / rate(t_dnnl_f32), rate(t_dnnl_bf16), rate(t_ours_bf16),
                rate(t_ours_bf16) / rate(t_dnnl_bf16), rate(t_dnnl_s8), rate(t_ours_s8), rate(t_ours_s8) / rate(t_dnnl_s8));
  }
  return 0;
}
