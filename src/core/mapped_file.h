// A whole file mapped read-only into memory. Tensors view into it; it stays
// mapped as long as any of them holds the shared_ptr.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string>

namespace mopt {

class MappedFile {
 public:
  // Throws Error naming the file when it cannot be opened or mapped.
  static std::shared_ptr<const MappedFile> open(const std::string& path);

  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  std::span<const std::byte> bytes() const { return {data_, size_}; }
  std::size_t size() const { return size_; }
  // Lets the kernel drop the pages wholly inside [offset, offset + length)
  // from this process's resident set (they are read again on the next use).
  // Streaming jobs call it on what they are done with, so resident memory
  // stays at what is in use rather than growing with the file.
  void release(std::size_t offset, std::size_t length) const;

 private:
  MappedFile(std::string path, const std::byte* data, std::size_t size) : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const std::byte* data_;
  std::size_t size_;
};

}  // namespace mopt
