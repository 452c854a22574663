#include "core/signal_cleanup.h"

#include <pthread.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <mutex>
#include <set>
#include <thread>

namespace mopt {

namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

std::set<std::string>& registry() {
  static std::set<std::string> paths;
  return paths;
}

[[noreturn]] void clean_up_and_die(int sig) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    for (const auto& path : registry()) {
      // A writer may still be adding files to the directory: a second pass takes what the first missed.
      for (int attempt = 0; attempt < 3; ++attempt) {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
        if (!std::filesystem::exists(path, ec)) break;
      }
    }
  }
  // The default action of the signal, delivered to this thread.
  std::signal(sig, SIG_DFL);
  sigset_t one;
  sigemptyset(&one);
  sigaddset(&one, sig);
  pthread_sigmask(SIG_UNBLOCK, &one, nullptr);
  std::raise(sig);
  ::_exit(128 + sig);
}

}  // namespace

void install_signal_cleanup() {
  static std::once_flag once;
  std::call_once(once, [] {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    // Blocked here, before any other thread exists, so every later thread inherits the mask and only
    // the waiting thread receives them.
    if (pthread_sigmask(SIG_BLOCK, &set, nullptr) != 0) return;
    std::thread([set] {
      int sig = 0;
      while (sigwait(&set, &sig) != 0) {
      }
      clean_up_and_die(sig);
    }).detach();
  });
}

void remove_on_signal(const std::string& path) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().insert(path);
}

void keep_on_signal(const std::string& path) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(path);
}

std::size_t paths_removed_on_signal() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return registry().size();
}

}  // namespace mopt
