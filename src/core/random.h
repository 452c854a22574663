// The seeded random streams mopt uses where a result must be the same on every platform (the
// standard library's distributions are not): splitmix64, and a Fisher-Yates shuffle driven by it.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace mopt {

// The next value of the splitmix64 stream whose state is `state` (advanced).
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Shuffles v in place (Fisher-Yates from the back, j = splitmix64 % (i + 1)), the same order for the
// same seed everywhere.
template <class T>
void seeded_shuffle(std::vector<T>& v, std::uint64_t seed) {
  std::uint64_t state = seed;
  for (std::size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[static_cast<std::size_t>(splitmix64(state) % i)]);
}

}  // namespace mopt
