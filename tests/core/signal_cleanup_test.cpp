// The registry of temporary outputs a SIGINT/SIGTERM removes (the removal itself, which ends the
// process, is tests/cli/interrupted_quantize.sh): what registers, and that finishing unregisters.
#include "core/signal_cleanup.h"

#include <gtest/gtest.h>

#include <filesystem>

#include "core/error.h"
#include "io/atomic_file.h"
#include "support/temp_dir.h"

namespace mopt {
namespace {

TEST(SignalCleanup, TemporariesAreRegisteredWhileTheyExist) {
  testing::TempDir tmp;
  const std::size_t before = paths_removed_on_signal();
  remove_on_signal(tmp.file("a"));
  remove_on_signal(tmp.file("a"));  // once
  EXPECT_EQ(paths_removed_on_signal(), before + 1);
  keep_on_signal(tmp.file("a"));
  keep_on_signal(tmp.file("never registered"));
  EXPECT_EQ(paths_removed_on_signal(), before);

  // A staging directory beside its target: registered until its owner keeps it.
  const std::string dir = io::make_temp_dir_beside(tmp.file("out"));
  EXPECT_TRUE(std::filesystem::is_directory(dir));
  EXPECT_EQ(paths_removed_on_signal(), before + 1);
  keep_on_signal(dir);

  // An atomic file's temporary: registered while written, not after commit or abandonment.
  {
    io::AtomicFileWriter w(tmp.file("f.txt"));
    EXPECT_EQ(paths_removed_on_signal(), before + 1);
    w.write("text");
    w.commit();
    EXPECT_EQ(paths_removed_on_signal(), before);
  }
  EXPECT_TRUE(std::filesystem::exists(tmp.file("f.txt")));
  {
    io::AtomicFileWriter w(tmp.file("g.txt"));
    EXPECT_EQ(paths_removed_on_signal(), before + 1);
  }
  EXPECT_EQ(paths_removed_on_signal(), before);
  EXPECT_FALSE(std::filesystem::exists(tmp.file("g.txt")));
}

TEST(SignalCleanup, ScratchDirIsRemovedWithItsContentsAndUnregistered) {
  testing::TempDir tmp;
  const std::size_t before = paths_removed_on_signal();
  std::string path;
  try {
    io::ScratchDir scratch;
    EXPECT_TRUE(scratch.path().empty());
    path = scratch.create(tmp.file("out"));
    EXPECT_EQ(path, scratch.path());
    EXPECT_EQ(path.rfind(tmp.file("out.tmp-"), 0), 0u) << path;
    EXPECT_EQ(paths_removed_on_signal(), before + 1);
    std::filesystem::create_directories(path + "/candidate-0");
    io::write_file_atomically(path + "/candidate-0/x.json", "{}");
    EXPECT_THROW(scratch.create(tmp.file("out")), Error);
    throw Error("an error on the way out");
  } catch (const Error&) {
  }
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_EQ(paths_removed_on_signal(), before);
}

}  // namespace
}  // namespace mopt
