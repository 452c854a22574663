// Bulk conversion throughput: the dispatched (vectorized) version against the
// scalar reference, side by side in one run, median of repeated runs.
//
//   build/bench/convert_bench [elements] [repeats]
//
// Prints, per conversion, the median GB/s (bytes read + written) of each
// version and their ratio.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "core/startup_settings.h"
#include "core/convert.h"
#include "core/cpu_features.h"

namespace {

double median_seconds(const std::function<void()>& run, int repeats) {
  std::vector<double> t;
  run();  // warm up: page in the buffers
  for (int i = 0; i < repeats; ++i) {
    const auto start = std::chrono::steady_clock::now();
    run();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);  // the libraries set up as mopt sets them
  const std::size_t n = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : (std::size_t{1} << 24);
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 9;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> f32(n), back(n);
  for (auto& v : f32) v = normal(rng);
  std::vector<std::uint16_t> u16(n);
  std::vector<std::uint8_t> u8(n);
  mopt::convert_f32_to_bf16(f32.data(), u16.data(), n);
  mopt::convert_f32_to_e4m3(f32.data(), u8.data(), n);

  fmt::print("bulk conversions, {} elements, median of {} runs; cpu: {}; dispatched version: {}\n", n, repeats,
             mopt::describe(mopt::cpu_features()), mopt::convert_isa());
  fmt::print("{:<14} {:>12} {:>12} {:>8}\n", "conversion", "ref GB/s", "fast GB/s", "ratio");
  struct Case {
    const char* name;
    std::size_t bytes_per_element;
    std::function<void()> ref;
    std::function<void()> fast;
  };
  const Case cases[] = {
      {"bf16 -> f32", 6, [&] { mopt::ref::convert_bf16_to_f32(u16.data(), back.data(), n); },
       [&] { mopt::convert_bf16_to_f32(u16.data(), back.data(), n); }},
      {"f32 -> bf16", 6, [&] { mopt::ref::convert_f32_to_bf16(f32.data(), u16.data(), n); },
       [&] { mopt::convert_f32_to_bf16(f32.data(), u16.data(), n); }},
      {"f16 -> f32", 6, [&] { mopt::ref::convert_f16_to_f32(u16.data(), back.data(), n); },
       [&] { mopt::convert_f16_to_f32(u16.data(), back.data(), n); }},
      {"f32 -> f16", 6, [&] { mopt::ref::convert_f32_to_f16(f32.data(), u16.data(), n); },
       [&] { mopt::convert_f32_to_f16(f32.data(), u16.data(), n); }},
      {"e4m3 -> f32", 5, [&] { mopt::ref::convert_e4m3_to_f32(u8.data(), back.data(), n); },
       [&] { mopt::convert_e4m3_to_f32(u8.data(), back.data(), n); }},
      {"f32 -> e4m3", 5, [&] { mopt::ref::convert_f32_to_e4m3(f32.data(), u8.data(), n); },
       [&] { mopt::convert_f32_to_e4m3(f32.data(), u8.data(), n); }},
  };
  for (const auto& c : cases) {
    // Alternate the two so drifting machine load hits both alike.
    std::vector<double> ref_t, fast_t;
    for (int round = 0; round < 3; ++round) {
      ref_t.push_back(median_seconds(c.ref, repeats));
      fast_t.push_back(median_seconds(c.fast, repeats));
    }
    std::sort(ref_t.begin(), ref_t.end());
    std::sort(fast_t.begin(), fast_t.end());
    const double bytes = static_cast<double>(n * c.bytes_per_element);
    fmt::print("{:<14} {:>12.2f} {:>12.2f} {:>7.1f}x\n", c.name, bytes / ref_t[1] / 1e9, bytes / fast_t[1] / 1e9,
               ref_t[1] / fast_t[1]);
  }
  return 0;
}
