// The scalar conversions: exhaustive round trips over every code of every
// format of 8 bits or less (and of the 16-bit floats), and the exact values
// and rounding boundaries the formats' definitions give.
#include "core/convert.h"

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/error.h"

namespace mopt {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

bool same_bits(float a, float b) { return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b); }

TEST(ConvertExhaustive, E4M3EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float v = e4m3_to_f32(code);
    if ((c & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(std::signbit(v), (c & 0x80) != 0);
    } else {
      EXPECT_TRUE(std::isfinite(v)) << c;
    }
    EXPECT_EQ(f32_to_e4m3(v), code) << "code " << c << " value " << v;
  }
}

TEST(ConvertExhaustive, E5M2EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float v = e5m2_to_f32(code);
    const int magnitude = c & 0x7F;
    if (magnitude > 0x7C) {
      // NaN codes: decode to NaN, re-encode to the canonical quiet NaN of that sign.
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(f32_to_e5m2(v), (c & 0x80) | 0x7F) << c;
    } else if (magnitude == 0x7C) {
      EXPECT_TRUE(std::isinf(v)) << c;
      EXPECT_EQ(f32_to_e5m2(v, Saturation::none), code);
      EXPECT_EQ(f32_to_e5m2(v, Saturation::finite), (c & 0x80) | 0x7B);  // saturates to ±57344
    } else {
      EXPECT_EQ(f32_to_e5m2(v), code) << c;
      EXPECT_EQ(f32_to_e5m2(v, Saturation::none), code) << c;
    }
  }
}

TEST(ConvertExhaustive, E2M1EveryCodeRoundTrips) {
  const float expected[16] = {0, 0.5f, 1, 1.5f, 2, 3, 4, 6, -0.0f, -0.5f, -1, -1.5f, -2, -3, -4, -6};
  for (int c = 0; c < 16; ++c) {
    const float v = e2m1_to_f32(static_cast<std::uint8_t>(c));
    EXPECT_TRUE(same_bits(v, expected[c])) << c;
    EXPECT_EQ(f32_to_e2m1(v), c) << c;
  }
}

TEST(ConvertExhaustive, E8M0EveryCodeRoundTrips) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float v = e8m0_to_f32(code);
    if (c == 0xFF) {
      EXPECT_TRUE(std::isnan(v));
    } else {
      EXPECT_EQ(v, std::ldexp(1.0f, c - 127)) << c;
    }
    for (const auto r : {E8M0Rounding::toward_zero, E8M0Rounding::up, E8M0Rounding::nearest_even}) {
      EXPECT_EQ(f32_to_e8m0(v, r), code) << c;
    }
  }
}

TEST(ConvertExhaustive, Int4EveryCodeRoundTrips) {
  for (int c = 0; c < 16; ++c) {
    const float v = int4_to_f32(static_cast<std::uint8_t>(c));
    EXPECT_EQ(v, static_cast<float>(c < 8 ? c : c - 16));
    EXPECT_EQ(f32_to_int4(v), c);
  }
}

TEST(ConvertExhaustive, Int8AndUint8EveryCodeRoundTrips) {
  for (int c = -128; c < 128; ++c) EXPECT_EQ(f32_to_int<std::int8_t>(static_cast<float>(c)), c);
  for (int c = 0; c < 256; ++c) EXPECT_EQ(f32_to_int<std::uint8_t>(static_cast<float>(c)), c);
}

TEST(ConvertExhaustive, Bf16AndF16EveryCodeRoundTrips) {
  for (std::uint32_t c = 0; c < 65536; ++c) {
    const auto code = static_cast<std::uint16_t>(c);
    const float b = bf16_to_f32(code);
    const float h = f16_to_f32(code);
    if (std::isnan(b)) {
      EXPECT_EQ(f32_to_bf16(b), code | 0x0040) << c;  // quieted, sign and payload kept
    } else {
      EXPECT_EQ(f32_to_bf16(b), code) << c;
    }
    if (std::isnan(h)) {
      EXPECT_EQ(f32_to_f16(h), code | 0x0200) << c;
    } else {
      EXPECT_EQ(f32_to_f16(h), code) << c;
    }
  }
}

TEST(ConvertE4M3, ValuesFromTheDefinition) {
  EXPECT_EQ(e4m3_to_f32(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x08), 0.015625f);         // min normal 2^-6
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // min subnormal
  EXPECT_EQ(e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(f32_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(f32_to_e4m3(-2.0f), 0xC0);
  // Saturation, not NaN: PyTorch's plain cast would give NaN from 464 up.
  EXPECT_EQ(f32_to_e4m3(449.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(464.0f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(1e30f), 0x7E);
  EXPECT_EQ(f32_to_e4m3(kInf), 0x7E);
  EXPECT_EQ(f32_to_e4m3(-kInf), 0xFE);
  EXPECT_EQ(f32_to_e4m3(kNaN), 0x7F);
  EXPECT_EQ(f32_to_e4m3(-kNaN), 0xFF);
  // Ties to even: 1.0625 lies between 1 (mantissa 0) and 1.125 (mantissa 1).
  EXPECT_EQ(f32_to_e4m3(1.0625f), 0x38);
  EXPECT_EQ(f32_to_e4m3(std::nextafter(1.0625f, 2.0f)), 0x39);
  EXPECT_EQ(f32_to_e4m3(1.1875f), 0x3A);  // between 1.125 (odd) and 1.25 (even)
  // Subnormals: steps of 2^-9, ties to even.
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -10)), 0x00);       // half the smallest: to 0
  EXPECT_EQ(f32_to_e4m3(std::ldexp(3.0f, -10)), 0x02);       // 1.5 steps: to 2
  EXPECT_EQ(f32_to_e4m3(std::ldexp(15.0f, -10)), 0x08);      // 7.5 steps: to the min normal
  EXPECT_EQ(f32_to_e4m3(-std::ldexp(1.0f, -12)), 0x80);      // negative underflow keeps its sign
}

TEST(ConvertE2M1, RoundingTableOfTheFormat) {
  // FORMATS.md 8.4: midpoints 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5; ties to even.
  struct Case {
    float in;
    float out;
  } cases[] = {{0.25f, 0.0f},  {0.26f, 0.5f}, {0.75f, 1.0f}, {0.74f, 0.5f}, {1.25f, 1.0f}, {1.26f, 1.5f},
               {1.75f, 2.0f},  {1.74f, 1.5f}, {2.5f, 2.0f},  {2.51f, 3.0f}, {3.5f, 4.0f},  {3.49f, 3.0f},
               {5.0f, 4.0f},   {5.01f, 6.0f}, {100.0f, 6.0f}, {kInf, 6.0f}, {-0.1f, -0.0f}, {-5.5f, -6.0f}};
  for (const auto& c : cases) {
    const float got = e2m1_to_f32(f32_to_e2m1(c.in));
    EXPECT_TRUE(same_bits(got, c.out)) << c.in << " -> " << got;
  }
  EXPECT_EQ(f32_to_e2m1(kNaN), 0x7);
}

TEST(ConvertE8M0, RoundingModes) {
  EXPECT_EQ(f32_to_e8m0(1.0f), 127);
  EXPECT_EQ(f32_to_e8m0(3.0f, E8M0Rounding::toward_zero), 128);
  EXPECT_EQ(f32_to_e8m0(3.0f, E8M0Rounding::up), 129);
  EXPECT_EQ(f32_to_e8m0(3.0f, E8M0Rounding::nearest_even), 128);  // tie: 1.5 * 2^1, code 128 is even
  EXPECT_EQ(f32_to_e8m0(6.0f, E8M0Rounding::nearest_even), 130);  // tie: 1.5 * 2^2, code 129 odd -> 130
  EXPECT_EQ(f32_to_e8m0(2.9f, E8M0Rounding::nearest_even), 128);
  EXPECT_EQ(f32_to_e8m0(3.1f, E8M0Rounding::nearest_even), 129);
  EXPECT_EQ(f32_to_e8m0(kNaN), 0xFF);
  EXPECT_EQ(f32_to_e8m0(kInf), 0xFE);
  EXPECT_EQ(f32_to_e8m0(0.0f), 0x00);
  EXPECT_EQ(f32_to_e8m0(-4.0f), 129);  // the magnitude
  EXPECT_EQ(f32_to_e8m0(std::numeric_limits<float>::max(), E8M0Rounding::up), 0xFE);  // saturates
}

TEST(ConvertInt, RoundHalfEvenAndSaturate) {
  EXPECT_EQ(f32_to_int<std::int8_t>(2.5f), 2);
  EXPECT_EQ(f32_to_int<std::int8_t>(3.5f), 4);
  EXPECT_EQ(f32_to_int<std::int8_t>(-2.5f), -2);
  EXPECT_EQ(f32_to_int<std::int8_t>(300.0f), 127);
  EXPECT_EQ(f32_to_int<std::int8_t>(-300.0f), -128);
  EXPECT_EQ(f32_to_int<std::int8_t>(kNaN), 0);
  EXPECT_EQ(f32_to_int<std::uint8_t>(-1.0f), 0);
  EXPECT_EQ(f32_to_int<std::int32_t>(3e9f), std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(f32_to_int<std::int64_t>(-kInf), std::numeric_limits<std::int64_t>::min());
  EXPECT_EQ(f32_to_int4(7.5f), 0x7);  // saturates at 7
  EXPECT_EQ(int4_to_f32(f32_to_int4(7.5f)), 7.0f);
  EXPECT_EQ(int4_to_f32(f32_to_int4(-9.0f)), -8.0f);
  EXPECT_EQ(int4_to_f32(f32_to_int4(-2.5f)), -2.0f);
}

TEST(ConvertBf16, RoundsToNearestEvenAndOverflowsToInfinity) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, odd rounds up
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // overflow to +inf
  EXPECT_EQ(f32_to_bf16(-kInf), 0xFF80);
}

TEST(ConvertF16, ValuesFromTheDefinition) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);  // tie at max + half ulp overflows (even is infinity)
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0xFC00), -kInf);
}

TEST(ConvertPacking, NibblesEvenElementInLowNibble) {
  const std::vector<std::uint8_t> codes = {0x1, 0x2, 0xF, 0x0, 0x7, 0x8};
  std::vector<std::uint8_t> packed(3);
  pack_nibbles(codes, packed);
  EXPECT_EQ(packed, (std::vector<std::uint8_t>{0x21, 0x0F, 0x87}));
  std::vector<std::uint8_t> back(6);
  unpack_nibbles(packed, back);
  EXPECT_EQ(back, codes);
  std::vector<std::uint8_t> wrong(2);
  EXPECT_THROW(pack_nibbles(codes, wrong), Error);
}

TEST(ConvertGeneric, EveryDTypeThroughF32) {
  // Values every format holds exactly (apart from E8M0, which holds powers of two only).
  const std::vector<float> values = {1.0f, 2.0f, 0.5f, 4.0f, 1.0f, 2.0f};
  for (const DType t : kAllDTypes) {
    std::vector<std::uint8_t> storage(values.size() * 8);
    std::vector<float> back(values.size());
    convert_from_f32(t, values.data(), storage.data(), values.size());
    convert_to_f32(t, storage.data(), back.data(), values.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      const float expected = (t == DType::BOOL) ? 1.0f : (dtype_is_float(t) || values[i] >= 1.0f ? values[i] : 0.0f);
      EXPECT_EQ(back[i], expected) << dtype_name(t) << " element " << i;
    }
  }
  float odd[3] = {1, 2, 3};
  std::uint8_t out[2];
  EXPECT_THROW(convert_from_f32(DType::E2M1, odd, out, 3), Error);
}

// The bounds the quantizers share are the formats' own: the largest E4M3 and E2M1 codes, NVFP4's
// global bound their product, the tiny amax the smallest f16 subnormal.
TEST(ConvertConstants, AreTheFormatsLimits) {
  EXPECT_EQ(kE4M3Max, e4m3_to_f32(0x7E));
  EXPECT_EQ(kE2M1Max, e2m1_to_f32(0x7));
  EXPECT_EQ(kE5M2Max, e5m2_to_f32(0x7B));
  EXPECT_EQ(kNvfp4AmaxBound, 2688.0f);
  EXPECT_EQ(kTinyAmax, f16_to_f32(0x0001));
}

}  // namespace
}  // namespace mopt
