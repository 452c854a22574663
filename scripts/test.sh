#!/usr/bin/env bash
# Builds mopt twice and runs every test:
#  1. build-asan/: clang with AddressSanitizer + UndefinedBehaviorSanitizer:
#     the unit tests, the command-line tests, and a bounded run of each
#     libFuzzer target (MOPT_FUZZ_SECONDS, default 60 s each);
#  2. build/: the Release build the README uses: the same unit and CLI tests.
set -euo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc)
fuzz_seconds=${MOPT_FUZZ_SECONDS:-60}
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

summary=()
run_ctest() {
  local dir=$1 log
  log=$(mktemp)
  set +e
  (cd "$dir" && ctest --output-on-failure -j "$jobs" 2>&1) | tee "$log"
  local status=${PIPESTATUS[0]}
  set -e
  summary+=("$dir: $(grep -E 'tests passed, [0-9]+ tests failed' "$log" | tail -n 1)")
  rm -f "$log"
  return "$status"
}

echo "== sanitizer build (clang, ASan + UBSan, libFuzzer) =="
CC=clang CXX=clang++ cmake -S . -B build-asan "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOPT_SANITIZE=ON -DMOPT_FUZZ=ON -DMOPT_BUILD_BENCH=OFF -DMOPT_FUZZ_SECONDS="$fuzz_seconds" >/dev/null
cmake --build build-asan -j "$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 run_ctest build-asan

echo "== release build =="
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"
run_ctest build

printf '%s\n' "${summary[@]}"
