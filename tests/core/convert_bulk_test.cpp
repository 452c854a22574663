// The dispatched (vectorized) bulk conversions against the scalar reference:
// every 16-bit and 8-bit code, random f32 bit patterns (NaN, infinity and
// subnormals included), special values, and lengths that leave a tail.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "core/convert.h"

namespace mopt {
namespace {

std::vector<float> test_floats() {
  std::vector<float> v;
  std::mt19937 rng(1234);
  std::uniform_int_distribution<std::uint32_t> bits;
  for (int i = 0; i < 200000; ++i) v.push_back(std::bit_cast<float>(bits(rng)));
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int i = 0; i < 100000; ++i) v.push_back(normal(rng));
  for (int i = 0; i < 100000; ++i) v.push_back(normal(rng) * 1e-3f);
  const float specials[] = {0.0f, -0.0f, 448.0f, 464.0f, 480.0f, -449.0f, 65504.0f, 65520.0f,
                            std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::quiet_NaN(),
                            std::bit_cast<float>(0x7F800001u), std::bit_cast<float>(0xFFBFFFFFu),
                            std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(), std::ldexp(1.0f, -10), std::ldexp(3.0f, -10),
                            std::bit_cast<float>(0x3F808000u), std::bit_cast<float>(0x3F818000u)};
  for (const float s : specials) v.push_back(s);
  v.push_back(1.0f);  // odd length: the last 5 go through the scalar tail
  return v;
}

template <typename T>
bool equal_bits(const std::vector<T>& a, const std::vector<T>& b, std::size_t* where) {
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] != b[i]) {
      *where = i;
      return false;
    }
  }
  return true;
}

std::vector<std::uint32_t> as_bits(const std::vector<float>& f) {
  std::vector<std::uint32_t> out(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) out[i] = std::bit_cast<std::uint32_t>(f[i]);
  return out;
}

TEST(ConvertBulk, DispatchReportsItsChoice) {
  const std::string isa = convert_isa();
  EXPECT_TRUE(isa == "avx2" || isa == "scalar") << isa;
}

TEST(ConvertBulk, Bf16AndF16DecodeEveryCode) {
  std::vector<std::uint16_t> codes(65536 + 3);
  for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<std::uint16_t>(i * 40503u);
  for (std::size_t i = 0; i < 65536; ++i) codes[i] = static_cast<std::uint16_t>(i);
  std::vector<float> fast(codes.size()), ref(codes.size());
  std::size_t where = 0;
  convert_bf16_to_f32(codes.data(), fast.data(), codes.size());
  ref::convert_bf16_to_f32(codes.data(), ref.data(), codes.size());
  EXPECT_TRUE(equal_bits(as_bits(fast), as_bits(ref), &where)) << "bf16 code " << codes[where];
  convert_f16_to_f32(codes.data(), fast.data(), codes.size());
  ref::convert_f16_to_f32(codes.data(), ref.data(), codes.size());
  EXPECT_TRUE(equal_bits(as_bits(fast), as_bits(ref), &where)) << "f16 code " << codes[where];
}

TEST(ConvertBulk, E4M3DecodeEveryCode) {
  std::vector<std::uint8_t> codes(256 + 7);
  for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<std::uint8_t>(i * 7);
  std::vector<float> fast(codes.size()), ref(codes.size());
  std::size_t where = 0;
  convert_e4m3_to_f32(codes.data(), fast.data(), codes.size());
  ref::convert_e4m3_to_f32(codes.data(), ref.data(), codes.size());
  EXPECT_TRUE(equal_bits(as_bits(fast), as_bits(ref), &where)) << "e4m3 code " << int(codes[where]);
}

TEST(ConvertBulk, EncodeMatchesScalar) {
  const std::vector<float> x = test_floats();
  std::size_t where = 0;
  std::vector<std::uint16_t> fast16(x.size()), ref16(x.size());
  convert_f32_to_bf16(x.data(), fast16.data(), x.size());
  ref::convert_f32_to_bf16(x.data(), ref16.data(), x.size());
  EXPECT_TRUE(equal_bits(fast16, ref16, &where)) << "bf16 of " << std::hex << std::bit_cast<std::uint32_t>(x[where]);
  convert_f32_to_f16(x.data(), fast16.data(), x.size());
  ref::convert_f32_to_f16(x.data(), ref16.data(), x.size());
  EXPECT_TRUE(equal_bits(fast16, ref16, &where)) << "f16 of " << std::hex << std::bit_cast<std::uint32_t>(x[where]);
  std::vector<std::uint8_t> fast8(x.size()), ref8(x.size());
  convert_f32_to_e4m3(x.data(), fast8.data(), x.size());
  ref::convert_f32_to_e4m3(x.data(), ref8.data(), x.size());
  EXPECT_TRUE(equal_bits(fast8, ref8, &where)) << "e4m3 of " << std::hex << std::bit_cast<std::uint32_t>(x[where]);
}

TEST(ConvertBulk, EveryLengthUpToSeventeen) {
  std::vector<float> x(17);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.37f * static_cast<float>(i) - 2.0f;
  for (std::size_t n = 0; n <= x.size(); ++n) {
    std::vector<std::uint8_t> fast(n + 1, 0xAB), ref(n + 1, 0xAB);
    convert_f32_to_e4m3(x.data(), fast.data(), n);
    ref::convert_f32_to_e4m3(x.data(), ref.data(), n);
    EXPECT_EQ(fast, ref) << n;  // includes the guard byte: nothing written past n
  }
}

}  // namespace
}  // namespace mopt
