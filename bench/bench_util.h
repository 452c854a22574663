// Small timing helpers shared by the benchmarks.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace mopt::bench {

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// n values in [-1, 1] in steps of 0.001 from a seeded LCG: the same on every machine.
inline std::vector<float> random_floats(std::size_t n, unsigned seed) {
  std::vector<float> v(n);
  unsigned s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(static_cast<int>(s >> 8) % 2001 - 1000) / 1000.0f;
  }
  return v;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// One Linear kernel under test: run(m, copy) multiplies m input rows with copy `copy` of its weight;
// the copies together exceed the caches, so decode streams the weight from memory as in a model.
struct KernelVariant {
  std::string name;
  std::uint64_t bytes;
  std::function<void(std::int64_t m, std::size_t copy)> run;
  std::size_t copies;
};

// Copies of a weight of `bytes` that together exceed 256 MiB.
inline std::size_t copies_for(std::uint64_t bytes) { return static_cast<std::size_t>((std::uint64_t{256} << 20) / bytes + 1); }

// Seconds per decode call (1 row, over every copy twice) and per prefill call (`rows` rows), for
// each variant and each of `repeats` rounds, the variants interleaved within a round.
inline void time_variants(const std::vector<KernelVariant>& variants, std::int64_t rows, int repeats, std::vector<std::vector<double>>& decode,
                          std::vector<std::vector<double>>& prefill) {
  decode.assign(variants.size(), {});
  prefill.assign(variants.size(), {});
  for (int r = 0; r < repeats; ++r) {
    for (std::size_t v = 0; v < variants.size(); ++v) {
      const std::size_t calls = 2 * variants[v].copies;
      auto t0 = std::chrono::steady_clock::now();
      for (std::size_t i = 0; i < calls; ++i) variants[v].run(1, i % variants[v].copies);
      decode[v].push_back(seconds_since(t0) / static_cast<double>(calls));
      t0 = std::chrono::steady_clock::now();
      variants[v].run(rows, 0);
      prefill[v].push_back(seconds_since(t0));
    }
  }
}

}  // namespace mopt::bench
