// Settings the process needs before its libraries start, chosen by mopt itself.
//
// Two libraries read their settings once, when they load, before main(); a variable
// set later is never read. So a program that wants mopt's choices calls
// choose_startup_settings(argv) first thing in main(): when it has something to set
// that the user did not set, it sets the variables and executes the program again
// (once) with them.
//
// OpenMP's waits. libgomp spins up to 300,000 times (LLVM's libomp: 200 ms) waiting
// for the next parallel region. On a machine whose cores are busy with other
// processes, those spinning threads take the time slices the working threads need:
// measured on 2 cores beside other work, INT4 quantization of tiny-kjv took 157 s
// with the defaults, 14 s with a spin count of 1000, 11.5 s sleeping at once and
// 11.3 s on one thread. A short spin keeps a quiet machine's speed (a region's
// threads wake without a system call when regions follow closely) and stops the
// collapse. 3000 (~50 us of PAUSE on the Xeon measured) rather than 1000: quiet
// decode of small models needs the threads awake between tokens' regions (tiny-kjv
// decode, medians of 5 interleaved: 1413 tokens/s at 1000, 1711 at 3000, 1704 at
// 300000), and beside competitors 3000 keeps the gain (1B prefill 37 tokens/s,
// against 4.1 at 300000). docs/BENCHMARKS.md has the tables.
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

inline constexpr const char* kGompSpinCount = "3000";  // libgomp (GCC): spins before sleeping
inline constexpr const char* kKmpBlocktimeMs = "1";    // libomp (LLVM): milliseconds before sleeping

// Sets what is to be set (above) and re-executes /proc/self/exe with argv, unless there is nothing
// to set, this process is the re-executed one, or it runs under valgrind. The thread waits are left
// alone when the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT, the kernels when the user set
// OPENBLAS_CORETYPE. Returns only when nothing was re-executed.
void choose_startup_settings(char** argv);

// "GOMP_SPINCOUNT=3000 (set by mopt: ...)", or what the user set instead, for --version and reports.
std::string describe_thread_waits();

// The OpenBLAS kernels in use, and who chose them: "SkylakeX (set by mopt; OpenBLAS chose Prescott)",
// "Haswell (chosen by OpenBLAS)" or "Haswell (OPENBLAS_CORETYPE set by the user)".
std::string describe_blas_kernels();

// The OPENBLAS_CORETYPE mopt would set on a CPU with these properties whose OpenBLAS chose `chosen`:
// empty when OpenBLAS's choice already uses AVX2 or the CPU lacks AVX2/FMA.
std::string better_blas_kernels(const std::string& chosen, bool avx2_fma, bool avx512_skylake);

}  // namespace mopt
