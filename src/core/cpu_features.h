// What the CPU we run on can do, read once with cpuid/xgetbv.
#pragma once

#include <string>

namespace mopt {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_vnni = false;
  bool avx512_vbmi = false;  // byte permutes (VPERMB, VPERMT2B, VPMULTISHIFTQB)
  bool avx512_bf16 = false;
  bool avx_vnni = false;
  bool amx_bf16 = false;  // AMX-TILE and AMX-BF16 with the tile state enabled (Linux still asks per process)
};

// The features of this CPU that the operating system has enabled. Setting the
// environment variable MOPT_ISA=scalar hides them all (to test the plain paths),
// MOPT_ISA=avx2 hides the AVX-512 ones.
const CpuFeatures& cpu_features();

// The features as the processor reports them, ignoring MOPT_ISA.
CpuFeatures detect_cpu_features();

// Why the AVX2 kernels (which need AVX2, FMA and F16C) cannot run here: empty when they can, else
// "MOPT_ISA=scalar turns the AVX2 kernels off" or "the CPU lacks AVX2, FMA" (naming what is missing).
std::string avx2_kernels_unavailable();
// Whether they can: the one check every caller of code compiled with -mavx2 -mfma -mf16c makes.
bool avx2_kernels_available();

// "avx2 fma f16c avx512f ..." (the present ones, in a fixed order), or "none".
std::string describe(const CpuFeatures& features);

}  // namespace mopt
