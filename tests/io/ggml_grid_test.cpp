// The grid of llama.cpp's integer blocks (io/ggml_grid.h): its values are the
// dequantization's, bit for bit; requantizing onto it picks the nearest level
// and keeps the scales.
#include "io/ggml_grid.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/error.h"
#include "io/gguf_writer.h"
#include "support/random_values.h"

namespace mopt::io {
namespace {

using testing::random_values;

constexpr GgmlType kGridTypes[] = {GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K};

// Values of varied magnitude per 32 (as weights have), one outlier, never zero.
std::vector<float> weights(std::size_t n, std::uint32_t seed) {
  std::vector<float> x = random_values(n, seed, 0.02f);
  for (std::size_t i = 0; i < n; ++i) x[i] *= 1.0f + static_cast<float>((i / 32) % 5);
  x[n / 3] = 0.4f;
  return x;
}

std::vector<float> dequantize(GgmlType type, const std::vector<std::byte>& blocks, std::size_t n) {
  std::vector<float> y(n);
  ggml_dequantize(type, blocks, y.data(), n);
  return y;
}

TEST(GgmlGrid, ItsValuesAreTheDequantizationsBitForBit) {
  const std::size_t n = 512;
  const std::vector<float> x = weights(n, 1);
  for (const GgmlType type : kGridTypes) {
    SCOPED_TRACE(static_cast<int>(type));
    EXPECT_TRUE(ggml_has_grid(type));
    const std::vector<std::byte> blocks = ggml_quantize(type, x.data(), n);
    const GgmlGrid g = ggml_grid(type, blocks, n);
    EXPECT_EQ(g.step.size() * static_cast<std::size_t>(g.sub_block), n);
    const std::vector<float> y = dequantize(type, blocks, n);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t sub = i / static_cast<std::size_t>(g.sub_block);
      const int level = g.nearest_level(sub, y[i]);
      ASSERT_GE(level, g.lo);
      ASSERT_LE(level, g.hi);
      ASSERT_EQ(g.value(sub, level), y[i]) << i;
    }
    // Requantizing the dequantized values gives the blocks back, byte for byte.
    EXPECT_EQ(ggml_requantize(type, blocks, y.data(), n, "y"), blocks);
  }
}

TEST(GgmlGrid, RequantizingKeepsTheScalesAndTakesTheNearestLevel) {
  const std::size_t n = 512;
  const std::vector<float> x = weights(n, 2);
  std::vector<float> moved = random_values(n, 3, 0.03f);
  for (std::size_t i = 0; i < n; ++i) moved[i] += x[i];
  for (const GgmlType type : kGridTypes) {
    SCOPED_TRACE(static_cast<int>(type));
    const std::vector<std::byte> blocks = ggml_quantize(type, x.data(), n);
    const GgmlGrid g = ggml_grid(type, blocks, n);
    const std::vector<std::byte> again = ggml_requantize(type, blocks, moved.data(), n, "moved");
    const GgmlGrid g2 = ggml_grid(type, again, n);
    EXPECT_EQ(g2.step, g.step);
    EXPECT_EQ(g2.min, g.min);
    const std::vector<float> y = dequantize(type, again, n);
    std::size_t changed = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t sub = i / static_cast<std::size_t>(g.sub_block);
      float best = std::numeric_limits<float>::infinity();
      for (int l = g.lo; l <= g.hi; ++l) best = std::min(best, std::fabs(moved[i] - g.value(sub, l)));
      ASSERT_LE(std::fabs(moved[i] - y[i]), best * (1.0f + 1e-6f)) << i;
      changed += y[i] != dequantize(type, blocks, n)[i];
    }
    EXPECT_GT(changed, n / 10);  // the moved values did move levels
  }
}

TEST(GgmlGrid, AZeroSubBlockStaysZero) {
  const std::size_t n = 256;
  std::vector<float> x = weights(n, 4);
  for (std::size_t i = 32; i < 64; ++i) x[i] = 0.0f;
  for (const GgmlType type : kGridTypes) {
    SCOPED_TRACE(static_cast<int>(type));
    const std::vector<std::byte> blocks = ggml_quantize(type, x.data(), n);
    const std::vector<float> y = dequantize(type, ggml_requantize(type, blocks, x.data(), n, "x"), n);
    for (std::size_t i = 32; i < 64; ++i) EXPECT_EQ(y[i], 0.0f) << i;
  }
}

TEST(GgmlGrid, BadInputIsOneError) {
  const std::vector<float> x = weights(256, 5);
  const std::vector<std::byte> blocks = ggml_quantize(GgmlType::Q4_K, x.data(), 256);
  EXPECT_FALSE(ggml_has_grid(GgmlType::F16));
  EXPECT_FALSE(ggml_has_grid(GgmlType::NVFP4));
  EXPECT_THROW(ggml_grid(GgmlType::F16, blocks, 256), Error);
  EXPECT_THROW(ggml_grid(GgmlType::Q4_K, blocks, 512), Error);  // too few bytes
  std::vector<float> bad = x;
  bad[17] = std::numeric_limits<float>::quiet_NaN();
  try {
    ggml_requantize(GgmlType::Q4_K, blocks, bad.data(), 256, "blk.0.attn_q.weight");
    ADD_FAILURE() << "NaN accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("blk.0.attn_q.weight: value 17 is nan"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mopt::io
