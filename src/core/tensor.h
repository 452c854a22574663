// A tensor: shape, dtype and contiguous row-major bytes that are either owned
// (64-byte aligned) or a read-only view into a memory-mapped file.
// Copies of a Tensor share the storage; clone() makes an owned deep copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/mapped_file.h"

namespace mopt {

using Shape = std::vector<std::int64_t>;

// Number of elements of `shape`; throws Error on a negative dimension or overflow.
std::uint64_t shape_numel(const Shape& shape);
// "[4, 64]"; "[]" for a scalar.
std::string shape_string(const Shape& shape);

class Tensor {
 public:
  Tensor();  // an empty f32 tensor of shape [0]

  // Owned, zero-filled.
  static Tensor zeros(DType dtype, Shape shape);
  // Owned f32 copy of `values`, which must have shape_numel(shape) elements.
  static Tensor from_f32(std::span<const float> values, Shape shape);
  // A read-only view of `shape_numel(shape)` elements at `offset` in `file`;
  // throws Error if they do not fit in the file.
  static Tensor view(std::shared_ptr<const MappedFile> file, std::size_t offset, DType dtype, Shape shape);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  std::size_t rank() const { return shape_.size(); }
  std::int64_t dim(std::size_t i) const { return shape_.at(i); }
  std::uint64_t numel() const { return numel_; }
  std::size_t nbytes() const { return nbytes_; }
  bool is_view() const { return file_ != nullptr; }

  std::span<const std::byte> bytes() const { return {data_, nbytes_}; }
  // Throws Error on a view: mapped checkpoints are never written through.
  std::span<std::byte> mutable_bytes();

  // Typed access; T must have the element size of the dtype.
  template <typename T>
  const T* data() const {
    check_element_size(sizeof(T));
    return reinterpret_cast<const T*>(data_);
  }
  template <typename T>
  T* mutable_data() {
    check_element_size(sizeof(T));
    return reinterpret_cast<T*>(mutable_bytes().data());
  }

  // An owned copy converted to `dtype` (through f32 for differing types).
  Tensor to(DType dtype) const;
  // The elements as f32.
  std::vector<float> to_f32() const;
  Tensor clone() const;
  // For a view: lets the kernel drop its pages from resident memory (see
  // MappedFile::release). Nothing for an owned tensor.
  void release_pages() const;
  // The same storage seen with another shape of equal element count.
  Tensor reshaped(Shape shape) const;

 private:
  void check_element_size(std::size_t size) const;

  DType dtype_ = DType::F32;
  Shape shape_;
  std::uint64_t numel_ = 0;
  std::size_t nbytes_ = 0;
  std::shared_ptr<std::byte> owned_;          // owned storage, or null
  std::shared_ptr<const MappedFile> file_;    // the mapped file of a view, or null
  const std::byte* data_ = nullptr;
};

}  // namespace mopt
