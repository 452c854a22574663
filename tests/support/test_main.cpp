// The test program's main: OpenMP's waits and OpenBLAS's kernels chosen as mopt chooses them (core/startup_settings.h),
// so the tests run the library as the mopt program runs it.
#include <gtest/gtest.h>

#include "core/startup_settings.h"

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
