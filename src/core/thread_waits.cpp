#include "core/thread_waits.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace mopt {

namespace {

constexpr const char* kMarker = "MOPT_THREAD_WAITS";  // set on the re-executed process: "mopt"

bool set(const char* name) { return std::getenv(name) != nullptr; }

bool under_valgrind() {
  const char* preload = std::getenv("LD_PRELOAD");
  return preload != nullptr && std::strstr(preload, "vgpreload") != nullptr;
}

}  // namespace

void choose_thread_waits(char** argv) {
  if (set(kMarker) || set("OMP_WAIT_POLICY") || set("GOMP_SPINCOUNT")) return;
  // Under valgrind a re-executed program would run outside it; keep OpenMP's defaults there.
  if (under_valgrind() || argv == nullptr || argv[0] == nullptr) return;
  setenv("GOMP_SPINCOUNT", kGompSpinCount, 0);
  if (!set("KMP_BLOCKTIME")) setenv("KMP_BLOCKTIME", kKmpBlocktimeMs, 0);
  setenv(kMarker, "mopt", 1);
  execv("/proc/self/exe", argv);
  // No /proc (or no exec): go on with OpenMP's defaults, and say so in describe_thread_waits().
  unsetenv("GOMP_SPINCOUNT");
  unsetenv(kMarker);
}

std::string describe_thread_waits() {
  const char* marker = std::getenv(kMarker);
  if (marker != nullptr && std::strcmp(marker, "mopt") == 0) {
    return std::string("GOMP_SPINCOUNT=") + kGompSpinCount + " (set by mopt: spin briefly, then sleep)";
  }
  std::string s;
  for (const char* name : {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"}) {
    const char* v = std::getenv(name);
    if (v == nullptr) continue;
    if (!s.empty()) s += ' ';
    s += std::string(name) + "=" + v;
  }
  return s.empty() ? "OpenMP's defaults (mopt could not set its own)" : s + " (set by the user)";
}

}  // namespace mopt
