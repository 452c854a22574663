// Our e4m3 / e5m2 / e2m1 / e8m0 conversions against CUDA's own host-side
// conversions (cuda_fp8.h, cuda_fp4.h compiled with the host compiler; no GPU
// is needed). Checked: every code's value, every rounding boundary (each
// midpoint between neighbouring values and the floats either side of it),
// each value and its neighbours, ±max and beyond, subnormals, ±0, NaN, ±inf,
// and a sweep over every 4096th f32 bit pattern with several low-bit endings.
//
// Where we differ from CUDA on purpose, the test says so: a negative NaN keeps
// its sign in our FP8 encodings (PyTorch's rule), CUDA writes a positive NaN.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/convert.h"

#if MOPT_HAVE_CUDA_FP_HEADERS
#include <cuda_fp4.h>
#include <cuda_fp8.h>
#endif

namespace mopt {
namespace {

#if MOPT_HAVE_CUDA_FP_HEADERS

// Inputs that probe every rounding decision of a format whose non-negative
// finite values are `values` (sorted, starting at 0).
std::vector<float> boundary_inputs(std::vector<float> values) {
  std::sort(values.begin(), values.end());
  std::vector<float> in;
  auto around = [&](float x) {
    in.push_back(x);
    in.push_back(std::nextafter(x, std::numeric_limits<float>::infinity()));
    in.push_back(std::nextafter(x, -std::numeric_limits<float>::infinity()));
  };
  for (std::size_t i = 0; i < values.size(); ++i) {
    around(values[i]);
    if (i + 1 < values.size()) around(values[i] + (values[i + 1] - values[i]) / 2);  // the midpoint, exact in f32
  }
  const float max = values.back();
  const float step = max - values[values.size() - 2];
  around(max + step / 2);  // the overflow threshold
  around(max + step);
  around(max * 2);
  around(std::numeric_limits<float>::max());
  around(std::numeric_limits<float>::min());
  around(std::numeric_limits<float>::denorm_min());
  in.push_back(std::numeric_limits<float>::infinity());
  in.push_back(std::numeric_limits<float>::quiet_NaN());
  in.push_back(std::bit_cast<float>(0x7F800001u));  // a signalling NaN
  const std::size_t n = in.size();
  for (std::size_t i = 0; i < n; ++i) in.push_back(-in[i]);
  // A sweep: every 4096th bit pattern, with several low-bit endings.
  for (std::uint32_t hi = 0; hi < (1u << 20); ++hi) {
    for (const std::uint32_t lo : {0x000u, 0x001u, 0x7FFu, 0x800u, 0x801u, 0xFFFu}) {
      in.push_back(std::bit_cast<float>((hi << 12) | lo));
    }
  }
  return in;
}

std::vector<float> values_of(float (*decode)(std::uint8_t), int codes) {
  std::vector<float> v;
  for (int c = 0; c < codes; ++c) {
    const float x = decode(static_cast<std::uint8_t>(c));
    if (std::isfinite(x) && !std::signbit(x)) v.push_back(x);
  }
  return v;
}

bool is_nan_code_e4m3(std::uint8_t c) { return (c & 0x7F) == 0x7F; }
bool is_nan_code_e5m2(std::uint8_t c) { return (c & 0x7F) > 0x7C; }

TEST(CudaOracle, E4M3DecodeEveryCode) {
  for (int c = 0; c < 256; ++c) {
    __nv_fp8_e4m3 cuda;
    cuda.__x = static_cast<__nv_fp8_storage_t>(c);
    const float expected = static_cast<float>(cuda);
    const float got = e4m3_to_f32(static_cast<std::uint8_t>(c));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, expected) << c;
    }
  }
}

TEST(CudaOracle, E5M2DecodeEveryCode) {
  for (int c = 0; c < 256; ++c) {
    __nv_fp8_e5m2 cuda;
    cuda.__x = static_cast<__nv_fp8_storage_t>(c);
    const float expected = static_cast<float>(cuda);
    const float got = e5m2_to_f32(static_cast<std::uint8_t>(c));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, expected) << c;
    }
  }
}

TEST(CudaOracle, E2M1DecodeEveryCode) {
  for (int c = 0; c < 16; ++c) {
    __nv_fp4_e2m1 cuda;
    cuda.__x = static_cast<__nv_fp4_storage_t>(c);
    EXPECT_EQ(std::bit_cast<std::uint32_t>(e2m1_to_f32(static_cast<std::uint8_t>(c))),
              std::bit_cast<std::uint32_t>(static_cast<float>(cuda)))
        << c;
  }
}

TEST(CudaOracle, E8M0DecodeEveryCode) {
  for (int c = 0; c < 256; ++c) {
    __nv_fp8_e8m0 cuda;
    cuda.__x = static_cast<__nv_fp8_storage_t>(c);
    const float expected = static_cast<float>(cuda);
    const float got = e8m0_to_f32(static_cast<std::uint8_t>(c));
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(got)) << c;
    } else {
      EXPECT_EQ(got, expected) << c;
    }
  }
}

TEST(CudaOracle, E4M3EncodeBoundaries) {
  const auto inputs = boundary_inputs(values_of(e4m3_to_f32, 256));
  int mismatches = 0;
  for (const float x : inputs) {
    const std::uint8_t expected = __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
    const std::uint8_t got = f32_to_e4m3(x);
    const bool ok = std::isnan(x) ? is_nan_code_e4m3(got) && is_nan_code_e4m3(expected) : got == expected;
    if (!ok && ++mismatches <= 10) {
      ADD_FAILURE() << "x=" << x << " bits=" << std::hex << std::bit_cast<std::uint32_t>(x) << " ours=" << int(got)
                    << " cuda=" << int(expected);
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << inputs.size() << " inputs";
}

TEST(CudaOracle, E5M2EncodeBoundariesBothSaturationModes) {
  const auto inputs = boundary_inputs(values_of(e5m2_to_f32, 256));
  int mismatches = 0;
  for (const float x : inputs) {
    for (const bool saturate : {true, false}) {
      const std::uint8_t expected = __nv_cvt_float_to_fp8(x, saturate ? __NV_SATFINITE : __NV_NOSAT, __NV_E5M2);
      const std::uint8_t got = f32_to_e5m2(x, saturate ? Saturation::finite : Saturation::none);
      const bool ok = std::isnan(x) ? is_nan_code_e5m2(got) && is_nan_code_e5m2(expected) : got == expected;
      if (!ok && ++mismatches <= 10) {
        ADD_FAILURE() << "x=" << x << " bits=" << std::hex << std::bit_cast<std::uint32_t>(x) << " saturate="
                      << saturate << " ours=" << int(got) << " cuda=" << int(expected);
      }
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << inputs.size() << " inputs";
}

TEST(CudaOracle, E2M1EncodeBoundaries) {
  const auto inputs = boundary_inputs(values_of(e2m1_to_f32, 16));
  int mismatches = 0;
  for (const float x : inputs) {
    const std::uint8_t expected = __nv_cvt_float_to_fp4(x, __NV_E2M1, cudaRoundNearest);
    const std::uint8_t got = f32_to_e2m1(x);
    if (got != expected && ++mismatches <= 10) {
      ADD_FAILURE() << "x=" << x << " bits=" << std::hex << std::bit_cast<std::uint32_t>(x) << " ours=" << int(got)
                    << " cuda=" << int(expected);
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << inputs.size() << " inputs";
}

TEST(CudaOracle, E8M0EncodeTowardZeroAndUp) {
  std::vector<float> powers;
  for (int e = -127; e <= 127; ++e) powers.push_back(std::ldexp(1.0f, e));
  powers.insert(powers.begin(), 0.0f);
  const auto inputs = boundary_inputs(powers);
  int mismatches = 0;
  for (const float x : inputs) {
    const std::uint8_t rz = __nv_cvt_float_to_e8m0(x, __NV_SATFINITE, cudaRoundZero);
    const std::uint8_t rp = __nv_cvt_float_to_e8m0(x, __NV_SATFINITE, cudaRoundPosInf);
    const std::uint8_t got_rz = f32_to_e8m0(x, E8M0Rounding::toward_zero);
    const std::uint8_t got_rp = f32_to_e8m0(x, E8M0Rounding::up);
    if ((got_rz != rz || got_rp != rp) && ++mismatches <= 10) {
      ADD_FAILURE() << "x=" << x << " bits=" << std::hex << std::bit_cast<std::uint32_t>(x) << " ours rz=" << int(got_rz)
                    << " rp=" << int(got_rp) << " cuda rz=" << int(rz) << " rp=" << int(rp);
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << inputs.size() << " inputs";
}

#else

TEST(CudaOracle, Skipped) { GTEST_SKIP() << "cuda_fp8.h / cuda_fp4.h not found: CUDA oracle tests not built"; }

#endif

}  // namespace
}  // namespace mopt
