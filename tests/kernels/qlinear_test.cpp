// The quantized Linear kernels against their plain reference (the whole
// weight dequantized from its natural layout, the reference GEMM), on random
// codes and inputs. Run twice by CTest: as the CPU allows, and with
// MOPT_ISA=scalar (the plain loops).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <random>

#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "kernels/linear.h"
#include "kernels/qlinear.h"

namespace mopt::kernels {
namespace {

using T = QuantizedWeightType;

std::uint8_t random_e4m3(std::mt19937& rng) {
  for (;;) {
    const auto c = static_cast<std::uint8_t>(rng() & 0xFF);
    if ((c & 0x7F) != 0x7F) return c;
  }
}

QuantizedWeightSource random_source(T type, std::int64_t out, std::int64_t in, std::int64_t block, std::uint32_t seed,
                                    bool mx = false) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> scale(0.01f, 0.1f);
  QuantizedWeightSource s;
  s.type = type;
  s.out = out;
  s.in = in;
  s.block = block;
  const std::int64_t nb = (in + block - 1) / block;
  const bool nibbles = type == T::int4 || type == T::int4_fp8_table || type == T::e2m1;
  s.codes.resize(static_cast<std::size_t>(nibbles ? out * ((in + 1) / 2) : out * in));
  for (auto& c : s.codes) c = type == T::e4m3 ? random_e4m3(rng) : static_cast<std::uint8_t>(rng() & 0xFF);
  if (nibbles && in % 2 == 1) {
    for (std::int64_t r = 0; r < out; ++r) s.codes[static_cast<std::size_t>(r * ((in + 1) / 2) + in / 2)] &= 0x0F;
  }
  switch (type) {
    case T::e2m1:
      s.scale_codes.resize(static_cast<std::size_t>(out * nb));
      s.scale_code_values.resize(256);
      for (int c = 0; c < 256; ++c) {
        s.scale_code_values[static_cast<std::size_t>(c)] = mx ? std::ldexp(1.0f, c - 127) : ((c & 0x7F) == 0x7F ? 0.0f : e4m3_to_f32(static_cast<std::uint8_t>(c)) * 0.003f);
      }
      for (auto& c : s.scale_codes) c = static_cast<std::uint8_t>(mx ? 118 + rng() % 8 : 0x28 + rng() % 0x30);
      break;
    case T::int4_fp8_table:
      s.block_tables.resize(static_cast<std::size_t>(out * nb * 16));
      for (auto& c : s.block_tables) c = random_e4m3(rng);
      s.table_scale = 0.002f;
      break;
    default:
      s.scales.resize(static_cast<std::size_t>(out * nb));
      for (auto& v : s.scales) v = scale(rng);
  }
  return s;
}

std::vector<float> random_input(std::int64_t m, std::int64_t k, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(m * k));
  for (auto& v : x) v = d(rng);
  return x;
}

// Checks forward() against the reference for several row counts. The INT4 decode (int4_gemv) rounds its
// input to int8 per 64 values on every CPU: it is held to its twin ref::int4_decode as tightly as the
// other kernels to theirs, and to the f32 definition within that rounding (half a step of each 64
// inputs' amax / 127).
void check_forward(const QuantizedWeightSource& src, const std::string& what) {
  const PackedLinear q(src, what);
  const std::vector<float> w = ref::dequantize(src);
  // The repacked layout decodes to the same values, bit for bit.
  std::vector<float> rows(static_cast<std::size_t>(src.out * src.in));
  q.dequantize_rows(0, src.out, rows.data());
  for (std::size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(rows[i], w[i]) << what << " element " << i;
  // The GEMV for decode (W8A8: its own product), never for prefill-sized inputs.
  EXPECT_EQ(q.runs_gemv(1), !src.int8_activations) << what;
  EXPECT_FALSE(q.runs_gemv(kInt4GemvMaxRows + 1)) << what;
  // The GEMV, batched decode in passes (8, 16 and INT4's 32 are each type's last), f32 tiles.
  for (const std::int64_t m : std::vector<std::int64_t>{1, 2, 3, 4, 5, 8, 9, 16, 17, kInt4GemvMaxRows, kInt4GemvMaxRows + 1}) {
    const auto x = random_input(m, src.in, static_cast<std::uint32_t>(m * 7 + src.out));
    std::vector<float> y(static_cast<std::size_t>(m * src.out)), expect(y.size());
    q.forward(x.data(), m, y.data());
    ref::quantized_linear_forward(src, x.data(), m, expect.data());
    const bool int4_gemv = int4_decode_rounds_input(src) && m <= int4_gemv_max_rows(src.out, src.in);
    std::vector<float> twin(y.size());
    if (int4_gemv) ref::int4_decode(src, x.data(), m, twin.data());
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t r = 0; r < src.out; ++r) {
        double magnitude = 0, rounding = 0;
        for (std::int64_t p = 0; p < src.in; ++p) {
          const double wv = std::fabs(w[static_cast<std::size_t>(r * src.in + p)]);
          magnitude += std::fabs(x[static_cast<std::size_t>(i * src.in + p)]) * wv;
          if (int4_gemv) {
            float amax = 0;
            for (std::int64_t t = p / 64 * 64; t < p / 64 * 64 + 64; ++t) amax = std::max(amax, std::fabs(x[static_cast<std::size_t>(i * src.in + t)]));
            rounding += wv * amax / 254.0;
          }
        }
        if (src.int8_activations) magnitude *= 1.05;  // the input as rounded to int8 can exceed it a little
        const double bound = 2e-5 * magnitude + rounding;
        const auto at = static_cast<std::size_t>(i * src.out + r);
        if (int4_gemv) ASSERT_NEAR(y[at], twin[at], 2e-5 * magnitude * 1.01) << what << " m=" << m << " row " << i << " output " << r << " against its twin";
        ASSERT_NEAR(y[at], expect[at], bound) << what << " m=" << m << " row " << i << " output " << r << (q.vectorized() ? " (vectorized)" : " (plain)");
      }
    }
  }
  // Prefill with bf16 products: where the CPU has them, the definition is the product of the input and
  // the decoded weight both rounded to bf16 (W8A8 stays on integers); elsewhere the f32 product.
  for (const std::int64_t m : std::vector<std::int64_t>{5, 13, kInt4GemvMaxRows + 1}) {
    if (q.runs_gemv(m)) continue;  // batched decode: the GEMV, checked above
    const auto x = random_input(m, src.in, static_cast<std::uint32_t>(m * 11 + src.out));
    std::vector<float> y(static_cast<std::size_t>(m * src.out)), expect(y.size());
    q.forward(x.data(), m, y.data(), Precision::bf16);
    const bool bf16 = bf16_kernels_chosen() && !src.int8_activations;
    if (bf16) ref::gemm_bf16_products(x.data(), m, src.in, w.data(), src.out, expect.data());
    else ref::quantized_linear_forward(src, x.data(), m, expect.data());
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t r = 0; r < src.out; ++r) {
        double magnitude = 0;
        for (std::int64_t p = 0; p < src.in; ++p) magnitude += std::fabs(x[static_cast<std::size_t>(i * src.in + p)] * w[static_cast<std::size_t>(r * src.in + p)]);
        const auto at = static_cast<std::size_t>(i * src.out + r);
        ASSERT_NEAR(y[at], expect[at], 2e-5 * magnitude * 1.05) << what << " bf16 products, m=" << m << " row " << i << " output " << r;
      }
    }
  }
}

TEST(PackedLinear, EveryWeightTypeMatchesTheReference) {
  check_forward(random_source(T::int4, 24, 256, 128, 1), "int4 g128");
  check_forward(random_source(T::int4, 10, 192, 64, 2), "int4 g64");
  check_forward(random_source(T::int4, 520, 1024, 128, 5), "int4 g128, big enough for batched decode's passes");
  check_forward(random_source(T::int4, 6, 40, 8, 3), "int4 g8 (plain layout)");
  check_forward(random_source(T::int4_fp8_table, 18, 256, 128, 4), "int4 via fp8 tables");
  check_forward(random_source(T::int8, 20, 192, 192, 5), "int8 weight-only");
  check_forward(random_source(T::int8, 7, 30, 30, 6), "int8 weight-only, odd width");
  check_forward(random_source(T::e4m3, 20, 256, 256, 7), "fp8 per row");
  check_forward(random_source(T::e4m3, 20, 256, 128, 8), "fp8 blocks of 128");
  check_forward(random_source(T::e4m3, 20, 96, 32, 9), "mxfp8");
  check_forward(random_source(T::e2m1, 20, 256, 16, 10), "nvfp4");
  check_forward(random_source(T::e2m1, 12, 128, 32, 11, true), "mxfp4");
  check_forward(random_source(T::e2m1, 5, 48, 16, 12), "nvfp4 (plain layout)");
}

bool avx2_kernels() { return cpu_features().avx2 && cpu_features().fma && cpu_features().f16c; }

// INT4 and W4A8 at every group the AVX2 layout holds (multiples of 32 over chunks of 64 inputs: with
// groups of 32 the low and the high nibbles of a chunk have different scales), including a last group
// shorter than the rest, against the reference; and vectorized wherever the CPU allows.
TEST(PackedLinear, Int4EveryGroupOf32kIsVectorized) {
  struct Shape {
    std::int64_t out, in, group;
  };
  const Shape shapes[] = {{24, 256, 32}, {7, 192, 32},  {10, 192, 64},  {9, 256, 128}, {5, 704, 32},
                          {5, 704, 128} /* 5.5 groups */, {6, 320, 64}, {11, 384, 96}, {4, 192, 160} /* 1.2 groups */};
  std::uint32_t seed = 40;
  for (const auto& sh : shapes) {
    for (const T type : {T::int4, T::int4_fp8_table}) {
      const auto src = random_source(type, sh.out, sh.in, sh.group, ++seed);
      const std::string what = fmt::format("{} [{}, {}] g{}", type == T::int4 ? "int4" : "int4 via fp8", sh.out, sh.in, sh.group);
      check_forward(src, what);
      const PackedLinear q(src, what);
      EXPECT_EQ(q.vectorized(), avx2_kernels()) << what << ": " << q.plain_reason();
      EXPECT_EQ(q.plain_reason().empty(), q.vectorized()) << what;
    }
  }
}

// What the AVX2 layout cannot hold runs the plain loops, matches the reference, and says why.
TEST(PackedLinear, PlainLoopsSayWhy) {
  struct Case {
    QuantizedWeightSource src;
    std::string why;  // when the CPU has AVX2
  };
  std::vector<Case> cases;
  cases.push_back({random_source(T::int4, 6, 96, 32, 60), "96 inputs is not a multiple of 64"});  // 32 x odd
  cases.push_back({random_source(T::int4, 6, 192, 48, 61), "no AVX2 kernel for groups of 48"});
  cases.push_back({random_source(T::int4_fp8_table, 6, 160, 16, 62), "no AVX2 kernel for groups of 16"});
  cases.push_back({random_source(T::e2m1, 5, 48, 16, 63), "48 inputs is not a multiple of 64"});
  cases.push_back({random_source(T::int8, 7, 30, 30, 64), "30 inputs is not a multiple of 16"});
  for (auto& c : cases) {
    const PackedLinear q(c.src, c.why);
    check_forward(c.src, c.why);
    EXPECT_FALSE(q.vectorized()) << c.why;
    // What no AVX2 kernel holds is named first, on any CPU.
    EXPECT_NE(q.plain_reason().find(c.why), std::string::npos) << q.plain_reason();
  }
  // A shape the kernels hold: the CPU's reason, or none.
  const PackedLinear fast(random_source(T::int4, 6, 128, 32, 65), "g32");
  EXPECT_EQ(fast.plain_reason(), avx2_kernels_unavailable());
  const char* isa = std::getenv("MOPT_ISA");
  if (isa != nullptr && std::string(isa) == "scalar") EXPECT_EQ(fast.plain_reason(), "MOPT_ISA=scalar turns the AVX2 kernels off");
}

TEST(PackedLinear, W8A8RunsOnIntegers) {
  for (const std::int64_t in : {192, 100}) {
    QuantizedWeightSource s = random_source(T::int8, 19, in, in, 20);
    for (auto& c : s.codes) {
      if (c == 0x80) c = 0x81;  // the vectorized product's domain: -127..127
    }
    s.int8_activations = true;
    s.input_amax = 2.5f;  // the normal inputs exceed it: codes -128 and 127 occur
    check_forward(s, "w8a8");
    EXPECT_EQ(PackedLinear(s, "w8a8").vectorized(), vnni_gemm_available() || avx2_kernels());
  }
  // A weight code of -128 is still computed exactly (by VNNI, else by the plain loop).
  QuantizedWeightSource s = random_source(T::int8, 9, 64, 64, 21);
  s.codes[5] = 0x80;
  s.int8_activations = true;
  s.input_amax = 3.0f;
  EXPECT_EQ(PackedLinear(s, "w8a8").vectorized(), vnni_gemm_available());
  if (!vnni_gemm_available()) EXPECT_NE(PackedLinear(s, "w8a8").plain_reason().find("-128"), std::string::npos);
  check_forward(s, "w8a8 with -128");
}

TEST(PackedLinear, Int8ActivationsRoundHalfToEvenAndClamp) {
  // Random values, exact half steps and values past the range; 1000 of them: a tail after the 32-wide loop.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.3f, 1.3f);
  const float amax = 1.0f, scale = 127.0f / amax;
  std::vector<float> x(1000);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = i % 5 == 0 ? (static_cast<float>(static_cast<int>(i % 300) - 150) + 0.5f) / scale : u(rng);
  std::vector<std::int8_t> got(x.size());
  quantize_int8_activations(x.data(), static_cast<std::int64_t>(x.size()), amax, got.data());
  int ties = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float v = x[i] * scale;
    float want = std::nearbyint(v);  // half to even
    want = std::min(127.0f, std::max(-128.0f, want));
    if (std::fabs(v - std::trunc(v)) == 0.5f) ++ties;
    ASSERT_EQ(got[i], static_cast<std::int8_t>(want)) << "x = " << x[i] << " (x * scale = " << v << ")";
  }
  EXPECT_GT(ties, 50);
}

// The INT4 GEMV's input rounding: per 64 values, symmetric to +-127 around each block's largest |x|
// (an all-zero block gives step 0 and codes 0); and the W8A8 input scale with its floor at 2^-24.
TEST(PackedLinear, Int4InputRoundsPer64AndInt8ScaleHasAFloor) {
  std::mt19937 rng(5);
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> x(192);
  for (auto& v : x) v = d(rng);
  std::fill(x.begin() + 64, x.begin() + 128, 0.0f);
  x[5] = -9.0f;  // block 0's largest magnitude: its code is -127
  std::vector<std::int8_t> codes(x.size());
  std::vector<float> steps(3);
  quantize_int8_per64(x.data(), 192, codes.data(), steps.data());
  EXPECT_EQ(codes[5], -127);
  EXPECT_EQ(steps[0], 9.0f / 127.0f);
  EXPECT_EQ(steps[1], 0.0f);
  for (std::size_t b = 0; b < 3; ++b) {
    float amax = 0.0f;
    for (std::size_t t = 0; t < 64; ++t) amax = std::max(amax, std::fabs(x[b * 64 + t]));
    for (std::size_t t = 0; t < 64; ++t) {
      const float want = amax > 0.0f ? std::nearbyint(x[b * 64 + t] * (127.0f / amax)) : 0.0f;
      ASSERT_EQ(codes[b * 64 + t], static_cast<std::int8_t>(want)) << b << " " << t;
      EXPECT_LE(std::fabs(static_cast<float>(codes[b * 64 + t]) * steps[b] - x[b * 64 + t]), 0.5f * steps[b] * 1.0001f);
    }
  }
  EXPECT_EQ(int8_input_scale(2.0f), 63.5f);
  EXPECT_EQ(int8_input_scale(1e-9f), 1.0f);
}

TEST(PackedLinear, BytesAreTheKernelLayout) {
  const PackedLinear q(random_source(T::int4, 16, 256, 128, 1), "int4");
  EXPECT_EQ(q.bytes(), 16u * 128u + 16u * 2u * 4u);
  const PackedLinear f(random_source(T::e2m1, 16, 256, 16, 1), "nvfp4");
  EXPECT_EQ(f.bytes(), 16u * 128u + 16u * 16u);
}

TEST(PackedLinear, RefusesWhatItCannotHold) {
  QuantizedWeightSource s = random_source(T::e4m3, 4, 32, 32, 1);
  s.codes[37] = 0xFF;
  try {
    PackedLinear q(s, "model.layers.0.mlp.up_proj");
    FAIL() << "accepted a NaN code";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.up_proj"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("row 1 column 5"), std::string::npos) << e.what();
  }
  QuantizedWeightSource t = random_source(T::int4, 4, 32, 32, 1);
  t.scales.pop_back();
  EXPECT_THROW(PackedLinear(t, "x"), Error);
}

}  // namespace
}  // namespace mopt::kernels
