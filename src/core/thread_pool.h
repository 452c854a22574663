// The threads mopt computes with: one pool, the calling thread plus persistent workers.
//
// Why not OpenMP. A parallel region ends at a barrier that waits for every thread of
// the team, a thread the kernel has descheduled included. On a machine whose cores
// are busy with other processes (a laptop, a shared runner) that happens in almost
// every region, and each such wait costs a time slice of the other process: measured
// on 2 cores beside two CPU-bound processes, `eval ppl` of tiny-kjv ran 10-40x slower
// than on the quiet machine, where a fair share of the cores would make it 2x.
//
// How this pool avoids it. A loop is a job of n items. The caller and the workers
// claim items one at a time from one counter; the caller returns when every item is
// done. It never waits for a worker that has not claimed anything: a worker the kernel
// has descheduled simply claims nothing when it runs again, and the caller does its
// share. The caller waits only for an item a worker is in the middle of, so items are
// kept small (a few per thread per loop). Idle workers spin briefly (a decode step's
// next loop starts within microseconds) and then sleep on a futex.
//
// OpenBLAS runs single-threaded on every thread that calls it (each sets it for itself):
// its own threads would wait at barriers the same way, and they cut a product by thread
// count, so its results would change with the machine's cores. A large product is split
// by the pool instead, in blocks fixed by its shape (kernels/gemm.h, kernels/linalg.h).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

namespace mopt {

// The threads a parallel loop runs on, the caller included: MOPT_THREADS, else OMP_NUM_THREADS
// (what users set for numeric libraries), else the CPUs this process may run on.
int compute_threads();

// Changes the thread count (>= 1) for the loops that follow. Not to be called from inside a loop.
void set_compute_threads(int threads);

// Starts the pool if it has not started, and makes OpenBLAS single-threaded on the calling thread.
// Called before any BLAS call.
void start_thread_pool();

// "2 (pool: spin 50 us, then sleep; the CPUs this process may run on)", for --version and reports.
std::string describe_compute_threads();

namespace detail {
using ItemFn = void (*)(void* context, std::int64_t item);
void run_items(std::int64_t n, ItemFn fn, void* context);
}  // namespace detail

// body(i) for every i in [0, n), on the pool; returns when all are done. Items run in any order,
// on any thread. A loop started inside an item, or while another thread's loop runs, runs on its
// own thread. An exception thrown by an item is rethrown here once every claimed item has finished
// (the items not yet claimed are skipped).
template <class Body>
void parallel_for(std::int64_t n, Body&& body) {
  using B = std::remove_reference_t<Body>;
  detail::run_items(
      n, [](void* context, std::int64_t item) { (*static_cast<B*>(context))(item); },
      const_cast<void*>(static_cast<const void*>(&body)));
}

// body(begin, end) over [0, n) cut into consecutive ranges of whole `grain`s (the last one may be
// shorter), about four per thread so a thread slowed by anything else leaves little to wait for.
// One range, on the caller, when n <= grain.
template <class Body>
void parallel_ranges(std::int64_t n, std::int64_t grain, Body&& body) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const std::int64_t grains = (n + grain - 1) / grain;
  const std::int64_t tasks = grains < 4 * std::int64_t{compute_threads()} ? grains : 4 * std::int64_t{compute_threads()};
  if (tasks <= 1) {
    body(std::int64_t{0}, n);
    return;
  }
  const std::int64_t per_task = (grains + tasks - 1) / tasks;  // grains per task
  const std::int64_t count = (grains + per_task - 1) / per_task;
  parallel_for(count, [&](std::int64_t t) {
    const std::int64_t begin = t * per_task * grain;
    const std::int64_t end = begin + per_task * grain < n ? begin + per_task * grain : n;
    body(begin, end);
  });
}

// body(i) for every i in [0, n): over the pool in ranges of whole grains as parallel_ranges cuts
// them, or on the caller alone when `parallel` is false (work too small to be worth waking threads).
template <class Body>
void parallel_each(std::int64_t n, std::int64_t grain, bool parallel, Body&& body) {
  auto range = [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) body(i);
  };
  if (parallel) {
    parallel_ranges(n, grain, range);
  } else {
    range(0, n);
  }
}

}  // namespace mopt
