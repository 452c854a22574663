#include "core/thread_pool.h"

#include <cblas.h>
#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "core/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace mopt {

namespace {

// How long an idle thread spins before it sleeps. Long enough that the next loop of a decode step
// (tens of microseconds later) finds the workers awake; short enough that on a busy machine a spinning
// thread gives its core back soon. docs/BENCHMARKS.md ("threads on a busy machine") has the measurements.
constexpr auto kSpin = std::chrono::microseconds(50);

void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

void futex_wait(std::atomic<std::uint32_t>& word, std::uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}

void futex_wake_all(std::atomic<std::uint32_t>& word) {
  syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

// Spins up to kSpin while word == expected, then sleeps until it changes; `sleepers` counts the
// threads asleep on it, so that the writer makes a system call only when someone sleeps.
void wait_for_change(std::atomic<std::uint32_t>& word, std::uint32_t expected, std::atomic<std::uint32_t>& sleepers) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1;; ++i) {
    if (word.load(std::memory_order_acquire) != expected) return;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
  }
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  while (word.load(std::memory_order_seq_cst) == expected) futex_wait(word, expected);
  sleepers.fetch_sub(1, std::memory_order_relaxed);
}

void wake(std::atomic<std::uint32_t>& word, std::atomic<std::uint32_t>& sleepers) {
  if (sleepers.load(std::memory_order_seq_cst) != 0) futex_wake_all(word);
}

int threads_from_environment(std::string* source) {
  for (const char* name : {"MOPT_THREADS", "OMP_NUM_THREADS"}) {
    const char* v = std::getenv(name);
    if (v == nullptr || *v == '\0') continue;
    char* end = nullptr;
    const long n = std::strtol(v, &end, 10);  // OMP_NUM_THREADS may be a list ("4,2"): its first entry
    if (end == v || n < 1 || n > 4096 || (*end != '\0' && *end != ',')) fail("{}={}: expected a thread count from 1 to 4096", name, v);
    if (source != nullptr) *source = fmt::format("{} set by the user", name);
    return static_cast<int>(n);
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    if (source != nullptr) *source = "the CPUs this process may run on";
    return std::max(1, CPU_COUNT(&set));
  }
  if (source != nullptr) *source = "the CPUs online";
  return std::max(1u, std::thread::hardware_concurrency());
}

thread_local bool t_inside_item = false;

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    openblas_set_num_threads(1);
    start_workers();
  }
  ~Pool() { stop_workers(); }

  int threads() const { return threads_; }

  void resize(int threads) {
    std::lock_guard<std::mutex> lock(caller_);
    if (threads == threads_) return;
    stop_workers();
    threads_ = threads;
    start_workers();
  }

  void run(std::int64_t n, detail::ItemFn fn, void* context) {
    if (n <= 0) return;
    std::unique_lock<std::mutex> lock(caller_, std::try_to_lock);
    if (n == 1 || threads_ == 1 || t_inside_item || !lock.owns_lock()) {
      run_alone(n, fn, context);
      return;
    }
    if (n >= (std::int64_t{1} << 31)) fail("parallel_for: {} items (at most 2^31 - 1)", n);
    // Closed first: a worker still in the last job's claim loop that reads this job's n_ (acquire,
    // below) then fails its compare-exchange on the last job's state instead of claiming an item
    // that does not exist yet.
    ++job_;
    claims_.store((std::uint64_t{job_} << 32) | kClosed, std::memory_order_relaxed);
    fn_.store(fn, std::memory_order_relaxed);
    context_.store(context, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    n_.store(static_cast<std::uint32_t>(n), std::memory_order_release);
    claims_.store(std::uint64_t{job_} << 32, std::memory_order_release);
    announced_.fetch_add(1, std::memory_order_seq_cst);
    wake(announced_, worker_sleepers_);
    work();
    for (;;) {
      const std::uint32_t done = done_.load(std::memory_order_acquire);
      if (done == static_cast<std::uint32_t>(n)) break;
      wait_for_change(done_, done, caller_sleeping_);
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void run_alone(std::int64_t n, detail::ItemFn fn, void* context) {
    const bool outer = t_inside_item;
    t_inside_item = true;
    try {
      for (std::int64_t i = 0; i < n; ++i) fn(context, i);
    } catch (...) {
      t_inside_item = outer;
      throw;
    }
    t_inside_item = outer;
  }

  // Claims and runs items of the current job until none is left.
  void work() {
    std::uint64_t s = claims_.load(std::memory_order_acquire);
    for (;;) {
      const auto item = static_cast<std::uint32_t>(s);
      const std::uint32_t n = n_.load(std::memory_order_acquire);  // this job's when the claim succeeds
      if (item >= n) return;
      if (!claims_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      // Claimed: the job cannot end before this item is counted done, so fn_ and context_ are this job's.
      if (!failed_.load(std::memory_order_relaxed)) {
        t_inside_item = true;
        try {
          fn_.load(std::memory_order_relaxed)(context_.load(std::memory_order_relaxed), item);
        } catch (...) {
          std::lock_guard<std::mutex> lock(error_mutex_);
          if (!error_) error_ = std::current_exception();
          failed_.store(true, std::memory_order_relaxed);
        }
        t_inside_item = false;
      }
      if (done_.fetch_add(1, std::memory_order_seq_cst) + 1 == n) wake(done_, caller_sleeping_);
      s = claims_.load(std::memory_order_acquire);
    }
  }

  void worker_loop() {
    // OpenBLAS's OpenMP build takes its thread count, on every call, from the calling thread's OpenMP
    // setting (omp_get_max_threads), which openblas_set_num_threads changes only on the thread that
    // calls it. Unset, a worker's BLAS calls would start OpenMP teams of their own inside the pool.
    openblas_set_num_threads(1);
    // Stopping is checked after every read of announced_: a worker that starts after stop_workers
    // bumped it must not go to sleep waiting for a bump that already happened.
    std::uint32_t seen = announced_.load(std::memory_order_acquire);
    for (;;) {
      if (stopping_.load(std::memory_order_acquire)) return;
      work();
      wait_for_change(announced_, seen, worker_sleepers_);
      seen = announced_.load(std::memory_order_acquire);
    }
  }

  void start_workers() {
    stopping_.store(false);
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
  }

  void stop_workers() {
    stopping_.store(true, std::memory_order_release);
    announced_.fetch_add(1, std::memory_order_release);
    futex_wake_all(announced_);
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  static constexpr std::uint32_t kClosed = 0xFFFFFFFFu;  // an item number no job reaches

  int threads_;
  std::vector<std::thread> workers_;
  std::mutex caller_;  // one job at a time; another caller runs its items alone
  std::uint32_t job_ = 0;
  // The job: (job number << 32) | next unclaimed item. A worker that read a finished job's state
  // fails its compare-exchange, so a late worker never runs a stale item.
  std::atomic<std::uint64_t> claims_{0};
  std::atomic<detail::ItemFn> fn_{nullptr};
  std::atomic<void*> context_{nullptr};
  std::atomic<std::uint32_t> n_{0};
  std::atomic<std::uint32_t> done_{0};
  std::atomic<std::uint32_t> announced_{0};  // bumped for every job (and to stop): the workers' futex
  std::atomic<std::uint32_t> worker_sleepers_{0};
  std::atomic<std::uint32_t> caller_sleeping_{0};
  std::atomic<bool> stopping_{false};
  std::atomic<bool> failed_{false};
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

std::mutex g_pool_mutex;
std::unique_ptr<Pool> g_pool;
std::atomic<int> g_threads{0};  // 0: not chosen yet

Pool& pool() {
  static Pool* p = [] {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool) g_pool = std::make_unique<Pool>(compute_threads());
    return g_pool.get();
  }();
  return *p;
}

}  // namespace

int compute_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    const int chosen = threads_from_environment(nullptr);
    g_threads.compare_exchange_strong(n, chosen);
    n = g_threads.load(std::memory_order_relaxed);
  }
  return n;
}

void set_compute_threads(int threads) {
  if (threads < 1) fail("thread count {}: at least 1", threads);
  if (t_inside_item) fail("set_compute_threads inside a parallel loop");
  g_threads.store(threads, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool) g_pool->resize(threads);
}

std::string describe_compute_threads() {
  std::string source;
  const int from_env = threads_from_environment(&source);
  const int n = compute_threads();
  if (n != from_env) source = "set by the command";
  return fmt::format("{} (mopt's pool: spin {} us, then sleep; {})", n, kSpin.count(), source);
}

void start_thread_pool() {
  pool();
  // The pool's threads and the one that started it are set already; another thread sets itself once.
  thread_local const bool single = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)single;
}

namespace detail {
void run_items(std::int64_t n, ItemFn fn, void* context) { pool().run(n, fn, context); }
}  // namespace detail

}  // namespace mopt
