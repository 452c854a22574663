// Writes a file under a temporary name beside its target and renames it into
// place only when every byte is on disk: a reader never sees half a file, and
// a failure (disk full, a kill) leaves at most the temporary behind, never a
// truncated target. Errors name the target path.
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

namespace mopt::io {

class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();  // removes the temporary if commit() was not reached
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  void write(std::span<const std::byte> bytes);
  void write(std::string_view text);
  // Flushes to disk and renames the temporary onto the target.
  void commit();

  const std::string& path() const { return path_; }

 private:
  [[noreturn]] void fail_with_errno(const char* what);
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
};

// Creates the directory TARGET.tmp-XXXXXX beside `target` (mode 755) and returns its path, registered
// for removal on SIGINT/SIGTERM (core/signal_cleanup.h; keep_on_signal once it is renamed or removed).
// AtomicFileWriter's temporary is registered the same way while it exists.
std::string make_temp_dir_beside(const std::string& target);

// A scratch directory beside an output (make_temp_dir_beside), removed with everything in it when
// this object goes away, error or not (and then no longer registered for removal on a signal).
// Empty until create().
class ScratchDir {
 public:
  ScratchDir() = default;
  ~ScratchDir();
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  // Creates it beside `target` and returns its path.
  const std::string& create(const std::string& target);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The whole of `text` written atomically to `path`.
void write_file_atomically(const std::string& path, std::string_view text);

}  // namespace mopt::io
