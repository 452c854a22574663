// safetensors files: a u64 little-endian header length N, N bytes of JSON
// describing each tensor (dtype, shape, byte range), then the raw data.
// The reader maps the file and validates everything before any tensor is used;
// the writer follows the reference writer's layout rules.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/dtype.h"
#include "core/mapped_file.h"
#include "core/tensor.h"

namespace mopt::io {

inline constexpr std::uint64_t kSafetensorsMaxHeaderBytes = 100'000'000;

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  Shape shape;
  std::uint64_t begin;  // byte range in the data buffer (after the header), end exclusive
  std::uint64_t end;
};

struct SafetensorsHeader {
  std::uint64_t data_offset = 0;           // 8 + N: where the data buffer starts in the file
  std::vector<SafetensorsEntry> entries;   // sorted by begin
  std::map<std::string, std::string> metadata;
};

// Parses and validates the header of the safetensors file whose full contents
// are `file`. `label` (usually the path) starts every error message.
SafetensorsHeader parse_safetensors_header(std::span<const std::byte> file, const std::string& label);

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  std::uint64_t file_size() const { return file_->size(); }
  const std::vector<SafetensorsEntry>& entries() const { return header_.entries; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const SafetensorsEntry* find(std::string_view name) const;
  // A view of the named tensor; throws Error naming file and tensor if absent.
  Tensor tensor(std::string_view name) const;

 private:
  SafetensorsFile(std::shared_ptr<const MappedFile> file, SafetensorsHeader header);
  std::shared_ptr<const MappedFile> file_;
  SafetensorsHeader header_;
  std::unordered_map<std::string, std::size_t> by_name_;
};

struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// Writes one file: header padded with spaces to a multiple of 8, metadata
// {"format": "pt"} plus `metadata`, tensors ordered by alignment (largest
// first) then name so that every tensor is naturally aligned. Atomic.
void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Builds one safetensors file from tensors that arrive one at a time without
// keeping them in memory: each tensor's bytes go at once to an anonymous
// temporary file for its alignment class; write() puts the header and the
// classes (largest alignment first, so every tensor stays naturally aligned)
// into the target, atomically. Memory stays at one tensor.
class StreamingSafetensorsWriter {
 public:
  StreamingSafetensorsWriter();
  ~StreamingSafetensorsWriter();
  StreamingSafetensorsWriter(const StreamingSafetensorsWriter&) = delete;
  StreamingSafetensorsWriter& operator=(const StreamingSafetensorsWriter&) = delete;

  void add(const std::string& name, const Tensor& tensor);
  std::uint64_t bytes() const { return bytes_; }
  bool empty() const { return entries_.empty(); }
  // The names added so far, in the order added.
  std::vector<std::string> names() const;
  // Writes the file and starts over empty.
  void write(const std::string& path, const std::map<std::string, std::string>& metadata = {});

 private:
  struct Entry {
    std::string name;
    std::string dtype;
    Shape shape;
    std::uint64_t size;
    int group;
  };
  std::vector<Entry> entries_;
  std::FILE* groups_[4] = {nullptr, nullptr, nullptr, nullptr};  // alignment 8, 4, 2, 1
  std::uint64_t bytes_ = 0;
};

// Writes `tensors` into `dir` as model.safetensors, or, when they exceed
// `max_shard_bytes`, as model-0000i-of-0000N.safetensors shards (filled in the
// given order; a tensor larger than the limit gets a shard of its own) and
// model.safetensors.index.json, written last. Returns the file names written.
std::vector<std::string> write_safetensors_sharded(const std::string& dir, const std::vector<NamedTensor>& tensors,
                                                   std::uint64_t max_shard_bytes,
                                                   const std::map<std::string, std::string>& metadata = {});

}  // namespace mopt::io
