// The 2:4 sparse Linear kernels against their plain twin (each kept value decoded and multiplied in
// input order, f64 sums) and against the dense kernels on the same weights with the zeros in place,
// on random weights in bf16, int8 and E4M3 with random masks (groups with one or no non-zero too),
// for the decode GEMV (1-4 rows) and the prefill tiles. Run by CTest as the CPU allows and with
// MOPT_ISA=scalar / avx2.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "core/tensor.h"
#include "kernels/linear.h"
#include "kernels/qlinear.h"
#include "kernels/sparse24.h"

namespace mopt::kernels {
namespace {

struct Weight {
  std::vector<std::uint8_t> codes;  // dense, zeros where pruned
  std::vector<float> scales;        // per row (int8, e4m3)
};

// A random 2:4 weight: each group keeps two random positions (one in 8 groups keeps one, one in 16 none).
Weight random_24(Sparse24Values type, std::int64_t out, std::int64_t in, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.5f);
  const std::size_t eb = type == Sparse24Values::bf16 ? 2 : 1;
  Weight w;
  w.codes.assign(static_cast<std::size_t>(out * in) * eb, 0);
  for (std::int64_t g = 0; g < out * in; g += 4) {
    const int a = static_cast<int>(rng() % 4);
    const int b = (a + 1 + static_cast<int>(rng() % 3)) % 4;
    const std::uint32_t kind = rng() % 16;
    const int keep = kind == 0 ? 0 : kind < 3 ? 1 : 2;
    for (int s = 0; s < keep; ++s) {
      const std::size_t i = static_cast<std::size_t>(g + (s == 0 ? a : b));
      std::uint8_t* p = w.codes.data() + i * eb;
      switch (type) {
        case Sparse24Values::bf16: {
          const std::uint16_t h = f32_to_bf16(d(rng));
          p[0] = static_cast<std::uint8_t>(h & 0xFF);
          p[1] = static_cast<std::uint8_t>(h >> 8);
          break;
        }
        case Sparse24Values::int8: p[0] = static_cast<std::uint8_t>(static_cast<std::int8_t>(1 + rng() % 254 - 127)); break;
        case Sparse24Values::e4m3: {
          std::uint8_t c;
          do c = static_cast<std::uint8_t>(rng() & 0xFF);
          while ((c & 0x7F) == 0x7F || (c & 0x7F) == 0);
          p[0] = c;
          break;
        }
        case Sparse24Values::int4: ADD_FAILURE() << "INT4 weights are built from int8 ones"; break;
      }
    }
  }
  std::uniform_real_distribution<float> s(0.001f, 0.01f);
  if (type != Sparse24Values::bf16) {
    for (std::int64_t r = 0; r < out; ++r) w.scales.push_back(s(rng));
  }
  return w;
}

// y of the dense kernels on the same weight (bf16 Linear, or a quantized Linear with per-row scales).
std::vector<float> dense_forward(Sparse24Values type, const Weight& w, std::int64_t out, std::int64_t in, const std::vector<float>& x,
                                 std::int64_t m) {
  std::vector<float> y(static_cast<std::size_t>(m * out));
  if (type == Sparse24Values::bf16) {
    Tensor t = Tensor::zeros(DType::BF16, {out, in});
    std::copy(w.codes.begin(), w.codes.end(), reinterpret_cast<std::uint8_t*>(t.mutable_bytes().data()));
    linear_forward(x.data(), m, t, nullptr, y.data());
    return y;
  }
  QuantizedWeightSource s;
  s.type = type == Sparse24Values::int8 ? QuantizedWeightType::int8 : QuantizedWeightType::e4m3;
  s.out = out;
  s.in = in;
  s.block = in;
  s.codes = w.codes;
  s.scales = w.scales;
  PackedLinear(std::move(s), "dense").forward(x.data(), m, y.data());
  return y;
}

double max_relative(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0.0 ? num / den : num;
}

TEST(Sparse24Linear, MatchesItsTwinAndTheDenseKernel) {
  const Sparse24Values types[] = {Sparse24Values::bf16, Sparse24Values::int8, Sparse24Values::e4m3};
  const std::pair<std::int64_t, std::int64_t> shapes[] = {{40, 96}, {33, 256}, {24, 100}};  // 100: the plain loop
  std::uint32_t seed = 1;
  for (const auto type : types) {
    for (const auto& [out, in] : shapes) {
      const Weight w = random_24(type, out, in, seed++);
      const auto sparse = Sparse24Linear::compress(type, w.codes.data(), out, in, w.scales, "w");
      ASSERT_TRUE(sparse.has_value());
      EXPECT_EQ(sparse->plain_reason().empty(), in % 32 == 0 && avx2_kernels_unavailable().empty()) << sparse->plain_reason();
      // The decoded rows are the dense decoding, zeros included.
      std::vector<float> rows(static_cast<std::size_t>(out * in));
      sparse->dequantize_rows(0, out, rows.data());
      for (std::int64_t i = 0; i < out * in; ++i) {
        const std::uint8_t* p = w.codes.data() + i * (type == Sparse24Values::bf16 ? 2 : 1);
        const float scale = w.scales.empty() ? 1.0f : w.scales[static_cast<std::size_t>(i / in)];
        const float want = type == Sparse24Values::bf16 ? bf16_to_f32(static_cast<std::uint16_t>(p[1] << 8 | p[0]))
                           : type == Sparse24Values::int8 ? static_cast<float>(static_cast<std::int8_t>(p[0])) * scale
                                                          : e4m3_to_f32(p[0]) * scale;
        ASSERT_EQ(rows[static_cast<std::size_t>(i)], want) << i;
      }
      // Decode, batched decode in passes (9, 16), tiles (17).
      for (const std::int64_t m : std::vector<std::int64_t>{1, 2, 3, 4, 9, kSparse24GemvMaxRows, kSparse24GemvMaxRows + 1}) {
        SCOPED_TRACE(testing::Message() << sparse->describe() << " [" << out << ", " << in << "] m " << m);
        std::mt19937 rng(seed++);
        std::normal_distribution<float> d(0.0f, 1.0f);
        std::vector<float> x(static_cast<std::size_t>(m * in));
        for (auto& v : x) v = d(rng);
        std::vector<float> y(static_cast<std::size_t>(m * out)), twin(y.size());
        sparse->forward(x.data(), m, y.data());
        ref::sparse24_forward(*sparse, x.data(), m, twin.data());
        EXPECT_LT(max_relative(y, twin), 1e-5);
        EXPECT_LT(max_relative(y, dense_forward(type, w, out, in, x, m)), 1e-5);
      }
    }
  }
}

// W8A8: exact int32 sums, so the kernel, its twin and the dense W8A8 kernel agree bit for bit, for
// decode and prefill shapes (m up to 37: passes of 8 input rows over blocks of 16 weight rows).
TEST(Sparse24Linear, W8A8EqualsItsTwinAndTheDenseKernelExactly) {
  const std::pair<std::int64_t, std::int64_t> shapes[] = {{40, 256}, {33, 384}, {24, 96}};
  std::uint32_t seed = 200;
  for (const auto& [out, in] : shapes) {
    const Weight w = random_24(Sparse24Values::int8, out, in, seed++);
    const float amax = 2.5f;  // inputs of sd 1: some beyond it, clamped
    const auto sparse = Sparse24Linear::compress_w8a8(w.codes.data(), out, in, w.scales, amax, "w");
    ASSERT_TRUE(sparse.has_value());
    EXPECT_EQ(sparse->describe(), "int8 w8a8 2:4");
    const CpuFeatures& f = cpu_features();
    EXPECT_EQ(sparse->plain_reason().empty(), f.avx512bw && f.avx512_vbmi && f.avx512_vnni) << sparse->plain_reason();
    // Blocks of 16 rows: positions and codes 5/8 byte a weight, an offset and a factor a row; the row scales.
    const std::int64_t padded = (out + 15) / 16 * 16;
    EXPECT_EQ(sparse->bytes(), static_cast<std::uint64_t>(padded * in * 5 / 8 + padded * 8 + out * 4));
    QuantizedWeightSource s;
    s.type = QuantizedWeightType::int8;
    s.out = out;
    s.in = in;
    s.block = in;
    s.codes = w.codes;
    s.scales = w.scales;
    s.int8_activations = true;
    s.input_amax = amax;
    const PackedLinear dense(std::move(s), "dense");
    // The decoded rows are the weight, zeros included.
    std::vector<float> rows(static_cast<std::size_t>(out * in));
    sparse->dequantize_rows(0, out, rows.data());
    for (std::int64_t i = 0; i < out * in; ++i) {
      ASSERT_EQ(rows[static_cast<std::size_t>(i)], static_cast<float>(static_cast<std::int8_t>(w.codes[static_cast<std::size_t>(i)])) * w.scales[static_cast<std::size_t>(i / in)]) << i;
    }
    for (const std::int64_t m : {1, 2, 3, 4, 7, 8, 9, 16, 17, 37}) {  // tiles of 8 input rows and what is left
      SCOPED_TRACE(testing::Message() << "[" << out << ", " << in << "] m " << m);
      std::mt19937 rng(seed++);
      std::normal_distribution<float> d(0.0f, 1.0f);
      std::vector<float> x(static_cast<std::size_t>(m * in));
      for (auto& v : x) v = d(rng);
      std::vector<float> y(static_cast<std::size_t>(m * out)), twin(y.size()), want(y.size());
      sparse->forward(x.data(), m, y.data());
      ref::sparse24_forward(*sparse, x.data(), m, twin.data());
      dense.forward(x.data(), m, want.data());
      for (std::size_t i = 0; i < y.size(); ++i) {
        ASSERT_EQ(y[i], twin[i]) << i;
        ASSERT_EQ(y[i], want[i]) << i;
      }
      EXPECT_GT(max_relative(y, std::vector<float>(y.size(), 0.0f)), 0.0);
    }
  }
  EXPECT_THROW(Sparse24Linear::compress_w8a8(random_24(Sparse24Values::int8, 8, 128, 5).codes.data(), 8, 128, std::vector<float>(8, 1.0f),
                                             std::nanf(""), "w"),
               Error);
  // Rows not a whole number of 32s of inputs stay with the dense kernel.
  EXPECT_FALSE(Sparse24Linear::compress_w8a8(random_24(Sparse24Values::int8, 8, 100, 6).codes.data(), 8, 100, std::vector<float>(8, 1.0f), 2.0f, "w")
                   .has_value());
}

// INT4 (groups of 64 and 128): against its twin (decode: the input rounded per 64 values on both
// sides; prefill: f32) and against the dense INT4 kernels on the same weight with the zeros in place.
TEST(Sparse24Linear, Int4MatchesItsTwinAndTheDenseKernel) {
  struct Case {
    std::int64_t out, in, block;
  };
  // 192: a last group of 64; [520, 1024]: big enough for batched decode's passes (int4_gemv_max_rows).
  const Case cases[] = {{40, 256, 128}, {33, 384, 64}, {24, 512, 256}, {20, 192, 128}, {520, 1024, 128}};
  std::uint32_t seed = 300;
  for (const auto& c : cases) {
    // A random 2:4 int8 weight in -8..7, as two's complement nibbles.
    const Weight w8 = random_24(Sparse24Values::int8, c.out, c.in, seed++);
    const std::int64_t row_bytes = c.in / 2, groups = (c.in + c.block - 1) / c.block;
    std::vector<std::uint8_t> nibbles(static_cast<std::size_t>(c.out * row_bytes), 0);
    for (std::int64_t i = 0; i < c.out * c.in; ++i) {
      const int v = static_cast<std::int8_t>(w8.codes[static_cast<std::size_t>(i)]) % 8;  // -7..7, zeros where pruned
      nibbles[static_cast<std::size_t>(i / c.in * row_bytes + (i % c.in) / 2)] |= static_cast<std::uint8_t>((v & 15) << (4 * (i % 2)));
    }
    std::mt19937 rng(seed++);
    std::uniform_real_distribution<float> sd(0.01f, 0.1f);
    std::vector<float> scales(static_cast<std::size_t>(c.out * groups));
    for (auto& v : scales) v = sd(rng);
    const auto sparse = Sparse24Linear::compress_int4(nibbles.data(), c.out, c.in, c.block, scales, "w");
    ASSERT_TRUE(sparse.has_value());
    EXPECT_EQ(sparse->describe(), "int4 g" + std::to_string(c.block) + " 2:4");
    const CpuFeatures& f = cpu_features();
    EXPECT_EQ(sparse->plain_reason().empty(), f.avx512bw && f.avx512_vbmi && f.avx512_vnni) << sparse->plain_reason();
    const std::int64_t padded = (c.out + 15) / 16 * 16;  // blocks of 16 rows: positions and nibbles 3/8 byte a weight, scales
    EXPECT_EQ(sparse->bytes(), static_cast<std::uint64_t>(padded * c.in * 3 / 8 + padded * groups * 4));
    QuantizedWeightSource s;
    s.type = QuantizedWeightType::int4;
    s.out = c.out;
    s.in = c.in;
    s.block = c.block;
    s.codes = nibbles;
    s.scales = scales;
    const PackedLinear dense(std::move(s), "dense");
    // The decoded rows are the dense decoding, zeros included.
    std::vector<float> rows(static_cast<std::size_t>(c.out * c.in)), want_rows(rows.size());
    sparse->dequantize_rows(0, c.out, rows.data());
    dense.dequantize_rows(0, c.out, want_rows.data());
    ASSERT_EQ(rows, want_rows);
    for (const std::int64_t m : std::vector<std::int64_t>{1, 2, 3, 4, 9, kInt4GemvMaxRows, kInt4GemvMaxRows + 1}) {
      if (c.out * c.in < kInt4GemvMinWeights && m > 9 && m <= kInt4GemvMaxRows) continue;  // tiles from 5 rows: 9 covers them  // decode, batched decode, prefill
      SCOPED_TRACE(testing::Message() << "[" << c.out << ", " << c.in << "] g" << c.block << " m " << m);
      std::normal_distribution<float> d(0.0f, 1.0f);
      std::vector<float> x(static_cast<std::size_t>(m * c.in));
      for (auto& v : x) v = d(rng);
      std::vector<float> y(static_cast<std::size_t>(m * c.out)), twin(y.size()), want(y.size());
      sparse->forward(x.data(), m, y.data());
      ref::sparse24_forward(*sparse, x.data(), m, twin.data());
      EXPECT_LT(max_relative(y, twin), 1e-5);
      // The dense INT4 GEMV (and its plain loop) rounds its input the same way up to int4_gemv_max_rows rows.
      dense.forward(x.data(), m, want.data());
      EXPECT_LT(max_relative(y, want), 1e-5);
    }
  }
  // Groups of 32, or rows not a multiple of 64 inputs, stay with the dense kernels.
  EXPECT_FALSE(Sparse24Linear::compress_int4(std::vector<std::uint8_t>(128, 0).data(), 2, 128, 32, std::vector<float>(8, 1.0f), "w").has_value());
  EXPECT_FALSE(Sparse24Linear::compress_int4(std::vector<std::uint8_t>(160, 0).data(), 2, 160, 64, std::vector<float>(6, 1.0f), "w").has_value());
  EXPECT_THROW(Sparse24Linear::compress_int4(std::vector<std::uint8_t>(64, 0).data(), 2, 64, 64, std::vector<float>(3, 1.0f), "w"), Error);
}

TEST(Sparse24Linear, OnlyTwoOfFourAndBadCodesAreRefused) {
  const Weight w = random_24(Sparse24Values::int8, 8, 64, 99);
  std::vector<std::uint8_t> dense = w.codes;
  dense[0] = dense[1] = dense[2] = 5;  // three non-zeros in the first group
  EXPECT_FALSE(Sparse24Linear::compress(Sparse24Values::int8, dense.data(), 8, 64, w.scales, "w").has_value());
  EXPECT_FALSE(Sparse24Linear::compress(Sparse24Values::int8, w.codes.data(), 8, 62, std::vector<float>(8, 1.0f), "w").has_value());
  std::vector<std::uint8_t> nan = w.codes;
  nan[0] = 0x7F;
  nan[1] = nan[2] = nan[3] = 0;
  EXPECT_THROW(Sparse24Linear::compress(Sparse24Values::e4m3, nan.data(), 8, 64, w.scales, "w"), Error);
  EXPECT_THROW(Sparse24Linear::compress(Sparse24Values::int8, w.codes.data(), 8, 64, {1.0f}, "w"), Error);
  // Bytes: half the values, 4 bits of positions per group, the row scales.
  const auto s = Sparse24Linear::compress(Sparse24Values::int8, w.codes.data(), 8, 64, w.scales, "w");
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->bytes(), 8u * 32 + 8u * 2 * 4 + 8u * 4);
}

}  // namespace
}  // namespace mopt::kernels
