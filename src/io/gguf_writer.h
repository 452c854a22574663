// Writing GGUF (version 3): metadata of every value type, tensors in ggml
// block layouts, each tensor's data aligned to `general.alignment` (32 unless
// set). The file is written under a temporary name and renamed when complete.
//
// ggml_quantize() produces the blocks llama.cpp's reference quantizers do, as
// the gguf Python package computes them (tests/data/gguf/quant_goldens.*):
//   F32, F16 (round to nearest even, overflow to inf), BF16 (round to nearest
//   even), Q8_0 (32 values: f16 d = max|x| / 127, int8 round-half-away(x / d)),
//   Q4_0 (32 values: f16 d = m / -8 with m the value of largest magnitude,
//   nibbles trunc(x / d + 8.5) clipped to 15, element i in the low nibble of
//   byte i and element i+16 in its high nibble), Q5_0 (as Q4_0 with d = m / -16
//   and the fifth bits in a u32). Q6_K and Q4_K (256-value super-blocks) are
//   llama.cpp's reference quantizers without an importance matrix, checked
//   against llama.cpp's own library (tests/data/gguf/kquant_goldens.*).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/gguf.h"

namespace mopt::io {

// `count` values of x as blocks of `type`; count must be a multiple of the
// type's block size. Non-finite values are an error naming `label`.
// `importance` (empty, or one finite non-negative weight per column of rows of
// importance.size() values: the mean square of each input channel, as
// llama-imatrix measures it) quantizes Q4_0, Q5_0, Q4_K and Q6_K as
// llama-quantize --imatrix does (llama.cpp's quantize_row_*_impl, checked
// against its library: tests/data/gguf/imatrix_goldens.*); Q8_0 and the float
// types ignore it, as llama.cpp does.
std::vector<std::byte> ggml_quantize(GgmlType type, const float* x, std::uint64_t count, const std::string& label = "tensor",
                                     std::span<const float> importance = {});

class GgufWriter {
 public:
  // Metadata in the order added; a key added twice is an error.
  void add(const std::string& key, GgufValue value);
  void add_string(const std::string& key, const std::string& value);
  void add_u32(const std::string& key, std::uint32_t value);
  void add_f32(const std::string& key, float value);
  // A tensor of PyTorch shape `shape` ([rows, ..., contiguous]) whose bytes are `data` in `type`'s layout.
  void add_tensor(const std::string& name, const Shape& shape, GgmlType type, std::vector<std::byte> data);
  // The same, with the bytes produced by `produce` only when write() reaches the tensor, so that a model is
  // written holding one tensor at a time. A wrong byte count is an error then.
  void add_tensor(const std::string& name, const Shape& shape, GgmlType type, std::function<std::vector<std::byte>()> produce);
  // Puts the tensors in the order `less` gives their names (a stable sort).
  void sort_tensors(const std::function<bool(const std::string&, const std::string&)>& less);
  // Writes the file atomically.
  void write(const std::string& path) const;
  // The file's bytes (what write() writes).
  std::vector<std::byte> bytes() const;

 private:
  struct Entry {
    std::string name;
    Shape shape;
    GgmlTypeInfo type;
    std::uint64_t bytes = 0;
    std::vector<std::byte> data;                       // when given up front
    std::function<std::vector<std::byte>()> produce;  // otherwise
    std::vector<std::byte> contents() const;
  };
  GgmlTypeInfo check_tensor(const std::string& name, const Shape& shape, GgmlType type, std::uint64_t& bytes) const;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<Entry> tensors_;
  std::uint64_t alignment() const;
  std::vector<std::byte> header_bytes() const;  // everything before the first tensor's data
};

}  // namespace mopt::io
