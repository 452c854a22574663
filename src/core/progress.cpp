#include "core/progress.h"

#include <exception>

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>

namespace mopt {

namespace {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<std::uint64_t>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{}:{:02}", s / 60, s % 60);
}

double steady_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

std::string format_progress(const std::string& stage, std::uint64_t done, std::uint64_t total, double elapsed_s,
                            const std::string& unit) {
  const double rate = elapsed_s > 0 ? static_cast<double>(done) / elapsed_s : 0.0;
  std::string eta = "?";
  if (done >= total) {
    eta = "0:00";
  } else if (rate > 0) {
    eta = format_duration(static_cast<double>(total - done) / rate);
  }
  return fmt::format("{} {}/{}  {:.3g} {}/s  ETA {}", stage, done, total, rate, unit, eta);
}

std::string format_progress_done(const std::string& stage, std::uint64_t done, std::uint64_t total, double elapsed_s,
                                 const std::string& unit) {
  const double rate = elapsed_s > 0 ? static_cast<double>(done) / elapsed_s : 0.0;
  return fmt::format("{}: {}/{} {} in {:.1f} s ({:.3g} {}/s)", stage, done, total, unit, elapsed_s, rate, unit);
}

Progress::Progress(std::string stage, std::uint64_t total, std::string unit)
    : Progress(std::move(stage), total, std::move(unit), stderr, ::isatty(STDERR_FILENO) != 0, steady_seconds) {}

Progress::Progress(std::string stage, std::uint64_t total, std::string unit, std::FILE* out, bool interactive,
                   Clock clock)
    : stage_(std::move(stage)),
      total_(total),
      unit_(std::move(unit)),
      out_(out),
      interactive_(interactive),
      clock_(std::move(clock)),
      start_(clock_()),
      uncaught_at_start_(std::uncaught_exceptions()) {
  if (interactive_) draw();
}

Progress::~Progress() {
  if (std::uncaught_exceptions() > uncaught_at_start_) {
    // Unwinding for an error: its one line follows, so no closing line; a live line is cleared.
    if (interactive_ && !finished_) {
      std::fprintf(out_, "\r\x1b[K");
      std::fflush(out_);
    }
    return;
  }
  finish();
}

void Progress::advance(std::uint64_t n) {
  done_ += n;
  if (!interactive_) return;
  const double now = clock_();
  if (now - last_draw_ >= 0.1 || done_ >= total_) draw();
}

void Progress::message(const std::string& line) {
  if (interactive_) {
    std::fprintf(out_, "\r%s\x1b[K\n", line.c_str());
    draw();
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
    std::fflush(out_);
  }
}

void Progress::draw() {
  last_draw_ = clock_();
  const std::string line = format_progress(stage_, done_, total_, last_draw_ - start_, unit_);
  std::fprintf(out_, "\r%s\x1b[K", line.c_str());
  std::fflush(out_);
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  const double elapsed = clock_() - start_;
  const std::string line = format_progress_done(stage_, done_, total_, elapsed, unit_);
  if (interactive_) {
    std::fprintf(out_, "\r%s\x1b[K\n", line.c_str());
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
  }
  std::fflush(out_);
}

}  // namespace mopt
