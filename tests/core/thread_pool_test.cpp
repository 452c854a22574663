#include "core/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <thread>
#include <vector>

namespace mopt {
namespace {

// Restores the thread count a test changed.
struct ThreadCount {
  int saved = compute_threads();
  ~ThreadCount() { set_compute_threads(saved); }
};

// Every item runs exactly once, over many jobs of random sizes back to back: a worker still in one
// job's claim loop must never run (or count) an item of the next.
TEST(ThreadPool, EveryItemOnceAcrossManyJobs) {
  ThreadCount restore;
  for (const int threads : {2, 3, 4}) {
    set_compute_threads(threads);
    std::mt19937 rng(static_cast<unsigned>(threads));
    std::vector<std::atomic<int>> hits(300);
    for (int job = 0; job < 20000; ++job) {
      const auto n = static_cast<std::int64_t>(rng() % 300 + 1);
      for (std::int64_t i = 0; i < n; ++i) hits[static_cast<std::size_t>(i)].store(0);
      parallel_for(n, [&](std::int64_t i) { hits[static_cast<std::size_t>(i)].fetch_add(1); });
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << "job " << job << " item " << i;
    }
  }
}

// The workers take part: items that take a millisecond each are not all left to the caller.
TEST(ThreadPool, WorkersTakeItems) {
  ThreadCount restore;
  set_compute_threads(2);
  const auto caller = std::this_thread::get_id();
  std::atomic<int> elsewhere{0};
  parallel_for(64, [&](std::int64_t) {
    if (std::this_thread::get_id() != caller) elsewhere.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  });
  EXPECT_GT(elsewhere.load(), 0);
}

TEST(ThreadPool, RangesCoverEachIndexOnceInWholeGrains) {
  ThreadCount restore;
  set_compute_threads(3);
  for (const std::int64_t n : {1, 7, 64, 65, 1000, 4097}) {
    for (const std::int64_t grain : {1, 4, 64}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      parallel_ranges(n, grain, [&](std::int64_t b, std::int64_t e) {
        EXPECT_LT(b, e);
        EXPECT_EQ(b % grain, 0) << "a range starts inside a grain";
        EXPECT_TRUE(e == n || e % grain == 0) << "a range ends inside a grain";
        for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)].fetch_add(1);
      });
      for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[static_cast<std::size_t>(i)].load(), 1) << n << " " << grain << " " << i;
    }
  }
}

// A loop inside an item runs on that item's thread, whole.
TEST(ThreadPool, EachIndexOnceInParallelOrAlone) {
  ThreadCount restore;
  set_compute_threads(3);
  for (const bool parallel : {true, false}) {
    std::vector<std::atomic<int>> hits(1001);
    std::atomic<int> off_caller{0};
    const auto caller = std::this_thread::get_id();
    parallel_each(1001, 7, parallel, [&](std::int64_t i) {
      hits[static_cast<std::size_t>(i)].fetch_add(1);
      if (std::this_thread::get_id() != caller) off_caller.fetch_add(1);
    });
    for (std::size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), 1) << "index " << i << " parallel " << parallel;
    if (!parallel) EXPECT_EQ(off_caller.load(), 0);  // alone: all on the caller
  }
}

TEST(ThreadPool, NestedLoopsRunWhole) {
  ThreadCount restore;
  set_compute_threads(2);
  std::atomic<std::int64_t> total{0};
  parallel_for(8, [&](std::int64_t i) {
    const auto id = std::this_thread::get_id();
    parallel_for(100, [&](std::int64_t j) {
      EXPECT_EQ(std::this_thread::get_id(), id);
      total.fetch_add(i * 100 + j);
    });
  });
  EXPECT_EQ(total.load(), (800 * 799) / 2);
}

// An exception from an item reaches the caller, and the pool keeps working after it.
TEST(ThreadPool, ExceptionReachesTheCaller) {
  ThreadCount restore;
  set_compute_threads(2);
  for (int round = 0; round < 50; ++round) {
    EXPECT_THROW(parallel_for(100, [&](std::int64_t i) {
                   if (i == round) throw std::runtime_error("item failed");
                 }),
                 std::runtime_error);
    std::atomic<int> count{0};
    parallel_for(100, [&](std::int64_t) { count.fetch_add(1); });
    EXPECT_EQ(count.load(), 100);
  }
}

TEST(ThreadPool, ThreadCountIsSetAndDescribed) {
  ThreadCount restore;
  set_compute_threads(5);
  EXPECT_EQ(compute_threads(), 5);
  EXPECT_NE(describe_compute_threads().find("5 (mopt's pool"), std::string::npos) << describe_compute_threads();
  EXPECT_THROW(set_compute_threads(0), std::exception);
  set_compute_threads(1);
  std::atomic<int> count{0};
  parallel_for(10, [&](std::int64_t) { count.fetch_add(1); });
  EXPECT_EQ(count.load(), 10);
}

// Two application threads with loops at once: each loop completes (the second runs alone).
TEST(ThreadPool, ConcurrentCallers) {
  ThreadCount restore;
  set_compute_threads(2);
  std::atomic<std::int64_t> a{0}, b{0};
  std::thread other([&] {
    for (int r = 0; r < 2000; ++r) parallel_for(50, [&](std::int64_t i) { a.fetch_add(i); });
  });
  for (int r = 0; r < 2000; ++r) parallel_for(50, [&](std::int64_t i) { b.fetch_add(i); });
  other.join();
  EXPECT_EQ(a.load(), 2000 * 1225);
  EXPECT_EQ(b.load(), 2000 * 1225);
}

}  // namespace
}  // namespace mopt
