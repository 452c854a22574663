// Settings the process needs before its libraries start, chosen by mopt itself.
//
// OpenBLAS reads its kernel choice once, when it loads, before main(); a variable
// set later is never read. So a program that wants mopt's choice calls
// choose_startup_settings(argv) first thing in main(): when it has something to set
// that the user did not set, it sets the variable and executes the program again
// (once) with it.
//
// (Until 2026-12-05 mopt also set OpenMP's waits, GOMP_SPINCOUNT=3000, for OpenBLAS's
// own threads in GPTQ's and AWQ's large products. Those products now run on mopt's
// pool, OpenBLAS is single-threaded everywhere and no OpenMP team ever starts: there
// is nothing left for that setting to govern.)
//
// OpenBLAS's kernels. OpenBLAS picks its f32 kernels by CPU model when it loads. A
// model newer than the OpenBLAS build (Debian 12's 0.3.21 on an Emerald Rapids Xeon)
// gets its oldest x86-64 kernels, "Prescott" (SSE3): measured there, 39-62 GFLOP/s
// against 200-235 with its SkylakeX kernels. When OpenBLAS chose kernels without
// AVX2 on a CPU that has AVX2 and FMA, mopt names the kernels the CPU can run in
// OPENBLAS_CORETYPE: SkylakeX with AVX-512 (F, CD, BW, DQ, VL), else Haswell.
#pragma once

#include <string>

namespace mopt {

// Sets what is to be set (above) and re-executes /proc/self/exe with argv, unless there is nothing
// to set, this process is the re-executed one, or it runs under valgrind. The kernels are left alone
// when the user set OPENBLAS_CORETYPE. Returns only when nothing was re-executed.
void choose_startup_settings(char** argv);

// The OpenBLAS kernels in use, and who chose them: "SkylakeX (set by mopt; OpenBLAS chose Prescott)",
// "Haswell (chosen by OpenBLAS)" or "Haswell (OPENBLAS_CORETYPE set by the user)".
std::string describe_blas_kernels();

// The OPENBLAS_CORETYPE mopt would set on a CPU with these properties whose OpenBLAS chose `chosen`:
// empty when OpenBLAS's choice already uses AVX2 or the CPU lacks AVX2/FMA.
std::string better_blas_kernels(const std::string& chosen, bool avx2_fma, bool avx512_skylake);

}  // namespace mopt
