#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <vector>

#include "core/error.h"
#include "core/signal_cleanup.h"

namespace mopt::io {

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)) {
  std::string pattern = path_ + ".tmp-XXXXXX";
  std::vector<char> name(pattern.begin(), pattern.end());
  name.push_back('\0');
  fd_ = ::mkstemp(name.data());
  if (fd_ < 0) fail("{}: cannot create a temporary file beside it: {}", path_, std::strerror(errno));
  temp_path_ = name.data();
  remove_on_signal(temp_path_);
  ::fchmod(fd_, 0644);
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!temp_path_.empty()) {
    ::unlink(temp_path_.c_str());
    keep_on_signal(temp_path_);
  }
}

void AtomicFileWriter::fail_with_errno(const char* what) {
  const int err = errno;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(temp_path_.c_str());
  keep_on_signal(temp_path_);
  temp_path_.clear();
  fail("{}: {}: {}", path_, what, std::strerror(err));
}

void AtomicFileWriter::write(std::span<const std::byte> bytes) {
  if (fd_ < 0) fail("{}: write after the file was closed", path_);
  const std::byte* p = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    const ::ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_with_errno("write failed");
    }
    if (n == 0) {
      errno = EIO;
      fail_with_errno("write failed");
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

void AtomicFileWriter::write(std::string_view text) {
  write(std::as_bytes(std::span<const char>(text.data(), text.size())));
}

void AtomicFileWriter::commit() {
  if (fd_ < 0) fail("{}: commit after the file was closed", path_);
  if (::fsync(fd_) != 0) fail_with_errno("fsync failed");
  if (::close(fd_) != 0) {
    fd_ = -1;
    fail_with_errno("close failed");
  }
  fd_ = -1;
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) fail_with_errno("rename failed");
  keep_on_signal(temp_path_);
  temp_path_.clear();
}

void write_file_atomically(const std::string& path, std::string_view text) {
  AtomicFileWriter writer(path);
  writer.write(text);
  writer.commit();
}

std::string make_temp_dir_beside(const std::string& target) {
  std::string pattern = target + ".tmp-XXXXXX";
  std::vector<char> name(pattern.begin(), pattern.end());
  name.push_back('\0');
  if (::mkdtemp(name.data()) == nullptr) fail("{}: cannot create a temporary directory beside it: {}", target, std::strerror(errno));
  namespace fs = std::filesystem;
  fs::permissions(name.data(), fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                                   fs::perms::others_read | fs::perms::others_exec);
  remove_on_signal(name.data());
  return name.data();
}

ScratchDir::~ScratchDir() {
  std::error_code ec;
  if (path_.empty()) return;
  std::filesystem::remove_all(path_, ec);
  keep_on_signal(path_);  // gone: nothing left for a signal to remove
}

const std::string& ScratchDir::create(const std::string& target) {
  if (!path_.empty()) fail("{}: a scratch directory was created twice", target);
  path_ = make_temp_dir_beside(target);
  return path_;
}

}  // namespace mopt::io
