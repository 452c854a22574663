// Progress of a long job. On a terminal: one live line with stage, k/N, rate
// and ETA, redrawn at most ten times a second. Elsewhere (CI, a pipe, a file):
// one plain line when the stage ends, so logs stay short.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

namespace mopt {

// "layers 3/30  1.25 layers/s  ETA 0:22" (the live line's text).
std::string format_progress(const std::string& stage, std::uint64_t done, std::uint64_t total, double elapsed_s,
                            const std::string& unit);
// "layers: 30/30 layers in 24.1 s (1.25 layers/s)" (the closing line).
std::string format_progress_done(const std::string& stage, std::uint64_t done, std::uint64_t total, double elapsed_s,
                                 const std::string& unit);

class Progress {
 public:
  using Clock = std::function<double()>;  // seconds, monotonic

  // Writes to stderr; live when stderr is a terminal.
  Progress(std::string stage, std::uint64_t total, std::string unit = "items");
  // Explicit sink, mode and clock (tests).
  Progress(std::string stage, std::uint64_t total, std::string unit, std::FILE* out, bool interactive, Clock clock);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void advance(std::uint64_t n = 1);
  // A line of its own (a validation result): on a terminal above the live line, which is redrawn.
  void message(const std::string& line);
  // Prints the closing line (once); the destructor calls it too, unless an exception is unwinding
  // the stack (the error's one line is what the user should see; a live line is cleared).
  void finish();

 private:
  void draw();

  std::string stage_;
  std::uint64_t total_;
  std::string unit_;
  std::FILE* out_;
  bool interactive_;
  Clock clock_;
  double start_;
  double last_draw_ = -1.0;
  std::uint64_t done_ = 0;
  bool finished_ = false;
  int uncaught_at_start_ = 0;
};

}  // namespace mopt
