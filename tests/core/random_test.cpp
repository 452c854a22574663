// The seeded streams: splitmix64 is the published reference generator (Vigna's splitmix64.c from
// state 0 gives e220a8397b1dcdaf, 6e789e6aa1b965f4, 06c45d188009454f), and the shuffle is a
// permutation fixed by its seed.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "core/random.h"

namespace mopt {
namespace {

TEST(Random, Splitmix64IsTheReferenceStream) {
  std::uint64_t state = 0;
  EXPECT_EQ(splitmix64(state), 0xe220a8397b1dcdafull);
  EXPECT_EQ(splitmix64(state), 0x6e789e6aa1b965f4ull);
  EXPECT_EQ(splitmix64(state), 0x06c45d188009454full);
}

TEST(Random, SeededShuffleIsAPermutationFixedBySeed) {
  std::vector<int> a(50), b, c;
  std::iota(a.begin(), a.end(), 0);
  b = a;
  c = a;
  seeded_shuffle(a, 7);
  seeded_shuffle(b, 7);
  seeded_shuffle(c, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int> identity(50);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(a, identity);
  // Fisher-Yates from the back: the last element is swapped with index splitmix64(seed) % size.
  std::vector<int> d = identity;
  seeded_shuffle(d, 7);
  std::uint64_t state = 7;
  EXPECT_EQ(d[49], static_cast<int>(splitmix64(state) % 50));
  std::vector<int> empty, one = {5};
  seeded_shuffle(empty, 1);
  seeded_shuffle(one, 1);
  EXPECT_EQ(one, std::vector<int>{5});
}

}  // namespace
}  // namespace mopt
