// How long OpenMP's idle threads spin before they sleep, chosen by mopt itself.
//
// libgomp spins up to 300,000 times (LLVM's libomp: 200 ms) waiting for the next
// parallel region. On a machine whose cores are busy with other processes, those
// spinning threads take the time slices the working threads need: measured on 2
// cores beside other work, INT4 quantization of tiny-kjv took 157 s with the
// defaults, 14 s with a spin count of 1000, 11.5 s sleeping at once and 11.3 s on
// one thread. A short spin keeps a quiet machine's speed (a region's threads wake
// without a system call when regions follow closely) and stops the collapse.
//
// OpenMP reads its environment once, when its library initializes, before main();
// a variable set later is never read. So a program that wants the choice calls
// choose_thread_waits(argv) first thing in main(): when the user set no policy, it
// sets the variables and executes the program again (once) with them.
#pragma once

#include <string>

namespace mopt {

inline constexpr const char* kGompSpinCount = "1000";  // libgomp (GCC): spins before sleeping
inline constexpr const char* kKmpBlocktimeMs = "1";    // libomp (LLVM): milliseconds before sleeping

// Sets GOMP_SPINCOUNT and KMP_BLOCKTIME and re-executes /proc/self/exe with argv, unless the user
// set OMP_WAIT_POLICY or GOMP_SPINCOUNT, this process is the re-executed one, or it runs under
// valgrind. Returns only when nothing was re-executed.
void choose_thread_waits(char** argv);

// "GOMP_SPINCOUNT=1000 (set by mopt: ...)", or what the user set instead, for --version and reports.
std::string describe_thread_waits();

}  // namespace mopt
