#include "core/startup_settings.h"

#include <unistd.h>

#include <array>
#include <cstdlib>
#include <cstring>

#include "core/cpu_features.h"

extern "C" char* openblas_get_corename(void);

namespace mopt {

namespace {

constexpr const char* kBlasMarker = "MOPT_BLAS_CHOSEN";  // on the re-executed process: OpenBLAS's own choice it replaced

bool set(const char* name) { return std::getenv(name) != nullptr; }

bool under_valgrind() {
  const char* preload = std::getenv("LD_PRELOAD");
  return preload != nullptr && std::strstr(preload, "vgpreload") != nullptr;
}

std::string blas_core() {
  const char* core = openblas_get_corename();
  return core != nullptr ? core : "";
}

bool avx512_for_skylake_kernels() {
  const CpuFeatures f = detect_cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq");
}

}  // namespace

std::string better_blas_kernels(const std::string& chosen, bool avx2_fma, bool avx512_skylake) {
  // OpenBLAS's x86-64 kernel sets that use AVX2 and FMA (names as openblas_get_corename gives them).
  static constexpr std::array<const char*, 6> kWithAvx2 = {"Haswell", "Zen", "SkylakeX", "CooperLake", "SapphireRapids",
                                                          "Excavator"};
  if (!avx2_fma) return "";
  for (const char* name : kWithAvx2) {
    if (strcasecmp(chosen.c_str(), name) == 0) return "";
  }
  return avx512_skylake ? "SkylakeX" : "Haswell";
}

void choose_startup_settings(char** argv) {
  if (set(kBlasMarker)) return;  // the re-executed process
  // Under valgrind a re-executed program would run outside it; keep the libraries' defaults there.
  if (under_valgrind() || argv == nullptr || argv[0] == nullptr) return;
  bool again = false;
  if (!set("OPENBLAS_CORETYPE")) {
    const CpuFeatures f = detect_cpu_features();
    const std::string chosen = blas_core();
    const std::string better = better_blas_kernels(chosen, f.avx2 && f.fma, avx512_for_skylake_kernels());
    if (!better.empty()) {
      setenv("OPENBLAS_CORETYPE", better.c_str(), 1);
      setenv(kBlasMarker, chosen.empty() ? "?" : chosen.c_str(), 1);
      again = true;
    }
  }
  if (!again) return;
  execv("/proc/self/exe", argv);
  // No /proc (or no exec): go on with the libraries' defaults, and say so in the descriptions.
  if (set(kBlasMarker)) unsetenv("OPENBLAS_CORETYPE");
  unsetenv(kBlasMarker);
}

std::string describe_blas_kernels() {
  std::string core = blas_core();
  if (core.empty()) core = "?";
  const char* replaced = std::getenv(kBlasMarker);
  if (replaced != nullptr) return core + " (set by mopt; OpenBLAS chose " + replaced + ")";
  if (set("OPENBLAS_CORETYPE")) return core + " (OPENBLAS_CORETYPE set by the user)";
  return core + " (chosen by OpenBLAS)";
}

}  // namespace mopt
