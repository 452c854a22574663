#include "core/cpu_features.h"
#include "core/startup_settings.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

namespace mopt {
namespace {

// GCC's own cpuid reading is an independent check of ours.
TEST(CpuFeatures, AgreesWithCompilerBuiltins) {
  const CpuFeatures f = detect_cpu_features();
  __builtin_cpu_init();
  EXPECT_EQ(f.avx2, __builtin_cpu_supports("avx2") != 0);
  EXPECT_EQ(f.fma, __builtin_cpu_supports("fma") != 0);
  EXPECT_EQ(f.avx512f, __builtin_cpu_supports("avx512f") != 0);
  EXPECT_EQ(f.avx512bw, __builtin_cpu_supports("avx512bw") != 0);
  EXPECT_EQ(f.avx512vl, __builtin_cpu_supports("avx512vl") != 0);
  EXPECT_EQ(f.avx512_vnni, __builtin_cpu_supports("avx512vnni") != 0);
  EXPECT_EQ(f.avx512_vbmi, __builtin_cpu_supports("avx512vbmi") != 0);
}

TEST(CpuFeatures, DescribeListsPresentOnes) {
  CpuFeatures f;
  EXPECT_EQ(describe(f), "none");
  f.avx2 = true;
  f.avx512_bf16 = true;
  EXPECT_EQ(describe(f), "avx2 avx512_bf16");
}

}  // namespace
}  // namespace mopt

// OpenBLAS kernels without AVX2 are replaced only on a CPU that has AVX2 and FMA, and never when
// OpenBLAS already chose AVX2 kernels.
TEST(StartupSettings, BetterBlasKernels) {
  EXPECT_EQ(mopt::better_blas_kernels("Prescott", true, true), "SkylakeX");
  EXPECT_EQ(mopt::better_blas_kernels("Prescott", true, false), "Haswell");
  EXPECT_EQ(mopt::better_blas_kernels("Nehalem", true, false), "Haswell");
  EXPECT_EQ(mopt::better_blas_kernels("Sandybridge", true, true), "SkylakeX");
  EXPECT_EQ(mopt::better_blas_kernels("", true, false), "Haswell");
  EXPECT_EQ(mopt::better_blas_kernels("Prescott", false, false), "");
  for (const char* fine : {"Haswell", "Zen", "SkylakeX", "CooperLake", "SapphireRapids", "haswell"}) {
    EXPECT_EQ(mopt::better_blas_kernels(fine, true, true), "") << fine;
  }
}

// The test program chose as mopt does: on a CPU with AVX2 and FMA, the f32 GEMMs run AVX2 kernels
// (OpenBLAS's own choice or mopt's), unless the user named the kernels.
TEST(StartupSettings, BlasKernelsUseTheCpu) {
  const std::string described = mopt::describe_blas_kernels();
  const mopt::CpuFeatures f = mopt::detect_cpu_features();
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr && described.find("set by the user") != std::string::npos) {
    GTEST_SKIP() << "OPENBLAS_CORETYPE set by the user: " << described;
  }
  const std::string core = described.substr(0, described.find(' '));
  EXPECT_EQ(mopt::better_blas_kernels(core, f.avx2 && f.fma, false), "") << described;
  if (described.find("set by mopt") != std::string::npos) {
    ASSERT_NE(std::getenv("OPENBLAS_CORETYPE"), nullptr);
    EXPECT_EQ(core, std::getenv("OPENBLAS_CORETYPE"));
  }
}
