// The test program's main: OpenMP's waits chosen as mopt chooses them (core/thread_waits.h),
// so the tests run the library as the mopt program runs it.
#include <gtest/gtest.h>

#include "core/thread_waits.h"

int main(int argc, char** argv) {
  mopt::choose_thread_waits(argv);
  testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
