// Normally distributed test values from a fixed seed (never all zero).
#pragma once

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace mopt::testing {

inline std::vector<float> random_values(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace mopt::testing
