// The 2:4 sparse Linear kernels against the dense kernels of the same format on the same weights
// (the zeros in place), side by side in one run: decode (1 row, the weight streaming from memory)
// and prefill (--rows rows), for bf16, int8 weight-only, FP8 (per-row scales), int8 W8A8 and INT4 g128.
// The decode ratio's bound is the bytes read: 2 -> 1.125 per weight for bf16 (1.78x), 1 -> 0.625 for
// the one-byte formats (1.6x), 0.53 -> 0.41 for INT4 g128 (1.31x).
//
//   build/bench/sparse24_bench [--out 8192] [--in 2048] [--rows 512] [--repeats 7]
//   (default: Llama-3.2-1B's gate/up projection; --out 2048 --in 8192 is its down projection)
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench_util.h"
#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/startup_settings.h"
#include "core/tensor.h"
#include "eval/bench.h"
#include "kernels/linear.h"
#include "kernels/qlinear.h"
#include "kernels/sparse24.h"

using mopt::bench::median;
using mopt::bench::copies_for;
using namespace mopt;

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);
  std::int64_t out = 8192, in = 2048, rows = 512;
  int repeats = 7;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--out")) out = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--in")) in = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--rows")) rows = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--repeats")) repeats = std::atoi(argv[i + 1]);
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  // A random weight pruned 2:4 by magnitude, as bf16 bits, int8 codes and E4M3 codes.
  std::vector<float> w(static_cast<std::size_t>(out * in));
  for (auto& v : w) v = normal(rng) * 0.02f;
  for (std::int64_t g = 0; g < out * in; g += 4) {
    int a = 0, b = 1;
    if (std::fabs(w[g + b]) > std::fabs(w[g + a])) std::swap(a, b);
    for (int t = 2; t < 4; ++t) {
      if (std::fabs(w[g + t]) > std::fabs(w[g + a])) { b = a; a = t; }
      else if (std::fabs(w[g + t]) > std::fabs(w[g + b])) b = t;
    }
    for (int t = 0; t < 4; ++t) {
      if (t != a && t != b) w[g + t] = 0.0f;
    }
  }
  Tensor bf16 = Tensor::zeros(DType::BF16, {out, in});
  for (std::int64_t i = 0; i < out * in; ++i) bf16.mutable_data<std::uint16_t>()[i] = f32_to_bf16(w[i]);
  std::vector<std::uint8_t> i8(w.size()), f8(w.size());
  for (std::size_t i = 0; i < w.size(); ++i) {
    i8[i] = static_cast<std::uint8_t>(static_cast<std::int8_t>(std::clamp(std::nearbyint(w[i] / 0.08f * 127.0f), -127.0f, 127.0f)));
    f8[i] = f32_to_e4m3(w[i] * 5000.0f);
  }
  const std::vector<float> scales_i8(static_cast<std::size_t>(out), 0.08f / 127.0f), scales_f8(static_cast<std::size_t>(out), 1.0f / 5000.0f);
  std::vector<float> x(static_cast<std::size_t>(rows * in));
  for (auto& v : x) v = normal(rng);
  std::vector<float> y(static_cast<std::size_t>(rows * out));

  std::vector<bench::KernelVariant> variants;
  // Dense bf16: distinct copies so decode streams from memory.
  std::vector<Tensor> dense_bf16(copies_for(bf16.nbytes()));
  for (auto& t : dense_bf16) t = bf16.to(DType::F32).to(DType::BF16);
  variants.push_back({"bf16 dense", bf16.nbytes(), [&](std::int64_t m, std::size_t c) { kernels::linear_forward(x.data(), m, dense_bf16[c], nullptr, y.data()); },
                      dense_bf16.size()});
  std::vector<std::vector<kernels::Sparse24Linear>> sparse;
  std::vector<std::vector<kernels::PackedLinear>> dense_q;
  const float input_amax = 4.0f;  // W8A8's static input range (inputs of sd 1)
  // int4: codes = clamp(rint(w / step), -7, 7) with one step for all (groups of 128 keep their own scale entries).
  const std::int64_t int4_block = 128;
  std::vector<std::uint8_t> i4(static_cast<std::size_t>(out * in / 2), 0);
  for (std::size_t i = 0; i < w.size(); ++i) {
    const int q = static_cast<int>(std::clamp(std::nearbyint(w[i] / 0.08f * 7.0f), -7.0f, 7.0f));
    i4[i / 2] |= static_cast<std::uint8_t>((q & 15) << (4 * (i % 2)));
  }
  const std::vector<float> scales_i4(static_cast<std::size_t>(out * ((in + int4_block - 1) / int4_block)), 0.08f / 7.0f);
  const auto add_sparse = [&](kernels::Sparse24Values type, const std::uint8_t* codes, const std::vector<float>& scales, bool w8a8 = false) {
    const auto make = [&] {
      if (type == kernels::Sparse24Values::int4) return kernels::Sparse24Linear::compress_int4(codes, out, in, int4_block, scales, "bench");
      return w8a8 ? kernels::Sparse24Linear::compress_w8a8(codes, out, in, scales, input_amax, "bench")
                  : kernels::Sparse24Linear::compress(type, codes, out, in, scales, "bench");
    };
    std::vector<kernels::Sparse24Linear> copies;
    auto first = make();
    if (!first->plain_reason().empty()) fmt::print("note: {} runs the plain loop: {}\n", first->describe(), first->plain_reason());
    for (std::size_t c = 0; c < copies_for(first->bytes()); ++c) copies.push_back(*make());
    sparse.push_back(std::move(copies));
    auto& l = sparse.back();
    variants.push_back({l[0].describe(), l[0].bytes(), [&l, &x, &y](std::int64_t m, std::size_t c) { l[c].forward(x.data(), m, y.data()); }, l.size()});
  };
  const auto add_dense = [&](kernels::QuantizedWeightType type, const std::vector<std::uint8_t>& codes, const std::vector<float>& scales,
                             bool w8a8 = false) {
    kernels::QuantizedWeightSource s;
    s.int8_activations = w8a8;
    s.input_amax = input_amax;
    s.type = type;
    s.out = out;
    s.in = in;
    s.block = type == kernels::QuantizedWeightType::int4 ? int4_block : in;
    s.codes = codes;
    s.scales = scales;
    std::vector<kernels::PackedLinear> copies;
    const kernels::PackedLinear first(s, "bench");
    for (std::size_t c = 0; c < copies_for(first.bytes()); ++c) copies.emplace_back(s, "bench");
    dense_q.push_back(std::move(copies));
    auto& l = dense_q.back();
    variants.push_back({l[0].describe() + " dense", l[0].bytes(), [&l, &x, &y](std::int64_t m, std::size_t c) { l[c].forward(x.data(), m, y.data()); }, l.size()});
  };
  sparse.reserve(5);
  dense_q.reserve(4);
  add_sparse(kernels::Sparse24Values::bf16, reinterpret_cast<const std::uint8_t*>(bf16.bytes().data()), {});
  add_dense(kernels::QuantizedWeightType::int8, i8, scales_i8);
  add_sparse(kernels::Sparse24Values::int8, i8.data(), scales_i8);
  add_dense(kernels::QuantizedWeightType::e4m3, f8, scales_f8);
  add_sparse(kernels::Sparse24Values::e4m3, f8.data(), scales_f8);
  add_dense(kernels::QuantizedWeightType::int8, i8, scales_i8, true);
  add_sparse(kernels::Sparse24Values::int8, i8.data(), scales_i8, true);
  add_dense(kernels::QuantizedWeightType::int4, i4, scales_i4);
  add_sparse(kernels::Sparse24Values::int4, i4.data(), scales_i4);

  const double bandwidth = eval::measure_read_bandwidth();
  fmt::print("cpu: {}; memory read bandwidth {:.1f} GB/s; weight [{}, {}] pruned 2:4; prefill {} rows; medians of {} runs, variants interleaved\n",
             describe(cpu_features()), bandwidth / 1e9, out, in, rows, repeats);
  std::vector<std::vector<double>> decode, prefill;
  bench::time_variants(variants, rows, repeats, decode, prefill);
  // Each 2:4 variant against the dense one of its format: bf16 (0) for 1, int8 (2) for 3, fp8 (4) for 5, w8a8 (6) for 7, int4 (8) for 9.
  fmt::print("{:<24} {:>8} {:>12} {:>10} {:>12} {:>15} {:>12}\n", "kernel", "MB", "decode us", "roofline", "decode x", "prefill GFLOP/s", "prefill x");
  const double flops = 2.0 * static_cast<double>(rows * out * in);
  for (std::size_t v = 0; v < variants.size(); ++v) {
    const std::size_t base = v % 2 == 0 ? v : v - 1;
    const double d = median(decode[v]), p = median(prefill[v]);
    fmt::print("{:<24} {:>8.1f} {:>12.1f} {:>9.0f}% {:>11.2f}x {:>15.1f} {:>11.2f}x\n", variants[v].name, static_cast<double>(variants[v].bytes) / 1e6, d * 1e6,
               100.0 * static_cast<double>(variants[v].bytes) / d / bandwidth, median(decode[base]) / d, flops / p / 1e9, median(prefill[base]) / p);
  }
  return 0;
}
