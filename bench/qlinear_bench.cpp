// The Linear kernels alone, side by side in one run, on a Llama-3.2-1B MLP
// shape: decode (1 row) as a share of the memory-read bandwidth measured in
// the same run, and prefill (512 rows) in GFLOP/s and against bf16. INT4 and
// W4A8 run at groups 32, 64 and 128 side by side; the last line compares the
// INT4 groups' decode in GB/s of weight bytes (codes and scales) read.
//
//   build/bench/qlinear_bench [--out 8192] [--in 2048] [--rows 512] [--repeats 7] [--only int4]
//   (--only: just the kernels whose name begins so, beside bf16)
#include <fmt/format.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/startup_settings.h"
#include "bench_util.h"
#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/tensor.h"
#include "eval/bench.h"
#include "kernels/linear.h"
#include "kernels/qlinear.h"

using mopt::bench::median;
using mopt::bench::copies_for;
using namespace mopt;
using kernels::QuantizedWeightSource;
using kernels::QuantizedWeightType;

namespace {

QuantizedWeightSource source(QuantizedWeightType type, std::int64_t out, std::int64_t in, std::int64_t block, bool w8a8 = false) {
  std::mt19937 rng(7);
  QuantizedWeightSource s;
  s.type = type;
  s.out = out;
  s.in = in;
  s.block = block;
  const bool nibbles = type == QuantizedWeightType::int4 || type == QuantizedWeightType::int4_fp8_table || type == QuantizedWeightType::e2m1;
  s.codes.resize(static_cast<std::size_t>(nibbles ? out * in / 2 : out * in));
  for (auto& c : s.codes) {
    c = static_cast<std::uint8_t>(rng());
    if (type == QuantizedWeightType::e4m3 && (c & 0x7F) == 0x7F) c = 0x30;
    if (type == QuantizedWeightType::int8 && c == 0x80) c = 0x81;
  }
  const std::int64_t nb = (in + block - 1) / block;
  if (type == QuantizedWeightType::e2m1) {
    s.scale_codes.assign(static_cast<std::size_t>(out * nb), 0x30);
    for (int c = 0; c < 256; ++c) s.scale_code_values.push_back((c & 0x7F) == 0x7F ? 0.0f : e4m3_to_f32(static_cast<std::uint8_t>(c)) * 0.01f);
  } else if (type == QuantizedWeightType::int4_fp8_table) {
    s.block_tables.resize(static_cast<std::size_t>(out * nb * 16));
    for (auto& c : s.block_tables) c = static_cast<std::uint8_t>(0x20 + rng() % 0x40);
    s.table_scale = 0.01f;
  } else {
    s.scales.assign(static_cast<std::size_t>(out * nb), 0.01f);
  }
  s.int8_activations = w8a8;
  s.input_amax = 3.0f;
  return s;
}

}  // namespace

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);  // the libraries set up as mopt sets them
  std::int64_t out = 8192, in = 2048, rows = 512;
  int repeats = 7;
  std::string only;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--only")) only = argv[i + 1];
    else if (!std::strcmp(argv[i], "--out")) out = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--in")) in = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--rows")) rows = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--repeats")) repeats = std::atoi(argv[i + 1]);
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensor bf16 = Tensor::zeros(DType::BF16, {out, in});
  for (std::int64_t i = 0; i < out * in; ++i) bf16.mutable_data<std::uint16_t>()[i] = f32_to_bf16(normal(rng) * 0.02f);
  std::vector<float> x(static_cast<std::size_t>(rows * in));
  for (auto& v : x) v = normal(rng);
  std::vector<float> y(static_cast<std::size_t>(rows * out));

  // Each variant cycles through copies of its weight that together exceed the caches, so decode
  // streams from memory as it does in a model.
  std::vector<Tensor> bf16_copies(copies_for(bf16.nbytes()), bf16);
  for (std::size_t c = 1; c < bf16_copies.size(); ++c) bf16_copies[c] = bf16.to(DType::F32).to(DType::BF16);
  std::vector<std::vector<kernels::PackedLinear>> q;
  const auto add = [&](const QuantizedWeightSource& src) {
    std::vector<kernels::PackedLinear> copies;
    const kernels::PackedLinear first(src, "bench");
    if (!only.empty() && first.describe().rfind(only, 0) != 0) return;
    if (!first.vectorized()) fmt::print("note: {} runs the plain loop: {}\n", first.describe(), first.plain_reason());
    for (std::size_t c = 0; c < copies_for(first.bytes()); ++c) copies.emplace_back(src, "bench");
    q.push_back(std::move(copies));
  };
  for (const std::int64_t group : {32, 64, 128}) add(source(QuantizedWeightType::int4, out, in, group));
  for (const std::int64_t group : {32, 64, 128}) add(source(QuantizedWeightType::int4_fp8_table, out, in, group));
  add(source(QuantizedWeightType::int8, out, in, in));
  add(source(QuantizedWeightType::int8, out, in, in, true));
  add(source(QuantizedWeightType::e4m3, out, in, in));
  add(source(QuantizedWeightType::e2m1, out, in, 16));
  add(source(QuantizedWeightType::e2m1, out, in, 32));
  std::vector<bench::KernelVariant> variants;
  variants.push_back({"bf16", bf16.nbytes(),
                      [&](std::int64_t m, std::size_t c) { kernels::linear_forward(x.data(), m, bf16_copies[c], nullptr, y.data()); },
                      bf16_copies.size()});
  for (auto& l : q) {
    variants.push_back({l[0].describe(), l[0].bytes(), [&l, &x, &y](std::int64_t m, std::size_t c) { l[c].forward(x.data(), m, y.data()); },
                        l.size()});
  }
  const double bandwidth = eval::measure_read_bandwidth();
  fmt::print("cpu: {}; memory read bandwidth {:.1f} GB/s; weight [{}, {}]; medians of {} runs, variants interleaved\n",
             describe(cpu_features()), bandwidth / 1e9, out, in, repeats);
  std::vector<std::vector<double>> decode, prefill;
  bench::time_variants(variants, rows, repeats, decode, prefill);
  fmt::print("{:<18} {:>10} {:>12} {:>10} {:>9} {:>14} {:>10}\n", "kernel", "MB", "decode GB/s", "roofline", "decode x", "prefill GFLOP/s", "prefill x");
  const double flops = 2.0 * static_cast<double>(rows * out * in);
  for (std::size_t v = 0; v < variants.size(); ++v) {
    const double d = median(decode[v]), p = median(prefill[v]);
    fmt::print("{:<18} {:>10.1f} {:>12.1f} {:>9.0f}% {:>8.2f}x {:>14.1f} {:>9.2f}x\n", variants[v].name, variants[v].bytes / 1e6,
               variants[v].bytes / d / 1e9, 100.0 * variants[v].bytes / d / bandwidth, median(decode[0]) / d, flops / p / 1e9,
               median(prefill[0]) / p);
  }
  // INT4's decode per weight byte read, each group against group 128 (a group of 32 reads 8 scale bytes per
  // 32 code bytes, 128 two per 32: GB/s counts them all).
  std::string line;
  double g128 = 0;
  for (std::size_t v = 0; v < variants.size(); ++v) {
    if (variants[v].name == "int4 g128") g128 = variants[v].bytes / median(decode[v]);
  }
  for (std::size_t v = 0; v < variants.size() && g128 > 0; ++v) {
    if (variants[v].name.rfind("int4 g", 0) != 0 || variants[v].name.find("via") != std::string::npos) continue;
    const double rate = variants[v].bytes / median(decode[v]);
    line += fmt::format("{}{}: {:.1f} GB/s ({:.0f}% of g128)", line.empty() ? "" : ", ", variants[v].name, rate / 1e9, 100.0 * rate / g128);
  }
  if (!line.empty()) fmt::print("int4 decode per weight byte: {}\n", line);
  return 0;
}
