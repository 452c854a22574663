#include "core/progress.h"

#include <gtest/gtest.h>

#include <stdexcept>

#include <cstdio>
#include <string>

namespace mopt {
namespace {

std::string read_all(std::FILE* f) {
  std::rewind(f);
  std::string s;
  char buf[256];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
  return s;
}

TEST(Progress, LiveLineHasCountRateAndEta) {
  EXPECT_EQ(format_progress("layers", 3, 30, 2.0, "layers"), "layers 3/30  1.5 layers/s  ETA 0:18");
  EXPECT_EQ(format_progress("layers", 0, 30, 0.0, "layers"), "layers 0/30  0 layers/s  ETA ?");
  EXPECT_EQ(format_progress("tok", 1, 7201, 1.0, "tok"), "tok 1/7201  1 tok/s  ETA 2:00:00");
  EXPECT_EQ(format_progress_done("load", 4, 4, 2.0, "files"), "load: 4/4 files in 2.0 s (2 files/s)");
}

TEST(Progress, NotATerminalGivesOneLinePerStage) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  double now = 0;
  {
    Progress p("calibrate", 10, "batches", f, false, [&] { return now; });
    for (int i = 0; i < 10; ++i) {
      now += 0.5;
      p.advance();
    }
  }
  EXPECT_EQ(read_all(f), "calibrate: 10/10 batches in 5.0 s (2 batches/s)\n");
  std::fclose(f);
}

TEST(Progress, TerminalRedrawsInPlaceAndThrottles) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  double now = 0;
  {
    Progress p("layers", 100, "layers", f, true, [&] { return now; });
    for (int i = 0; i < 100; ++i) {
      now += 0.01;  // 100 steps in one second: about ten redraws
      p.advance();
    }
  }
  const std::string out = read_all(f);
  std::size_t redraws = 0;
  for (const char c : out) redraws += c == '\r';
  EXPECT_GE(redraws, 5u);
  EXPECT_LE(redraws, 15u);
  EXPECT_NE(out.find("/100  "), std::string::npos);
  EXPECT_NE(out.find("layers 100/100"), std::string::npos);  // the last step is always drawn
  EXPECT_NE(out.find("ETA"), std::string::npos);
  EXPECT_EQ(out.back(), '\n');
  std::fclose(f);
}

// A message gets a line of its own: plain in a log, above the redrawn live line on a terminal.
TEST(Progress, MessagesGetTheirOwnLine) {
  for (const bool interactive : {false, true}) {
    std::FILE* f = std::tmpfile();
    ASSERT_NE(f, nullptr);
    double now = 0;
    {
      Progress p("training", 4, "steps", f, interactive, [&] { return now; });
      now += 1;
      p.advance();
      p.message("step 1/4: validation loss 3.2");
    }
    const std::string out = read_all(f);
    if (interactive) {
      EXPECT_NE(out.find("\rstep 1/4: validation loss 3.2\x1b[K\n\rtraining 1/4"), std::string::npos) << out;
    } else {
      EXPECT_EQ(out, "step 1/4: validation loss 3.2\ntraining: 1/4 steps in 1.0 s (1 steps/s)\n");
    }
    std::fclose(f);
  }
}

// A job that fails midway says one line, its error: the progress leaves no closing line behind
// (and clears its live line on a terminal).
TEST(Progress, AnErrorUnwindingLeavesNoClosingLine) {
  for (const bool interactive : {false, true}) {
    std::FILE* f = std::tmpfile();
    ASSERT_NE(f, nullptr);
    double now = 0;
    try {
      Progress p("training", 10, "steps", f, interactive, [&] { return now; });
      now += 1;
      p.advance();
      throw std::runtime_error("step 2: the loss is nan");
    } catch (const std::runtime_error&) {
    }
    const std::string out = read_all(f);
    EXPECT_EQ(out.find("1/10 steps in"), std::string::npos) << out;
    if (interactive) {
      EXPECT_EQ(out.substr(out.size() - 4), "\r\x1b[K");  // the live line cleared
    } else {
      EXPECT_EQ(out, "");
    }
    std::fclose(f);
  }
}

}  // namespace
}  // namespace mopt
