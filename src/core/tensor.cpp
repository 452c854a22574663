#include "core/tensor.h"

#include <cstring>
#include <limits>
#include <new>

#include "core/convert.h"
#include "core/error.h"

namespace mopt {

namespace {

constexpr std::align_val_t kAlignment{64};

std::shared_ptr<std::byte> allocate(std::size_t bytes) {
  auto* p = static_cast<std::byte*>(::operator new(bytes == 0 ? 1 : bytes, kAlignment));
  std::memset(p, 0, bytes);
  return std::shared_ptr<std::byte>(p, [](std::byte* q) { ::operator delete(q, kAlignment); });
}

}  // namespace

std::uint64_t shape_numel(const Shape& shape) {
  std::uint64_t n = 1;
  for (const std::int64_t d : shape) {
    if (d < 0) fail("negative dimension in shape {}", shape_string(shape));
    const auto u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u) fail("shape {} overflows 64 bits", shape_string(shape));
    n *= u;
  }
  return n;
}

std::string shape_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Tensor::Tensor() : shape_{0}, owned_(allocate(0)) { data_ = owned_.get(); }

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t;
  t.numel_ = shape_numel(shape);
  t.nbytes_ = dtype_storage_bytes(dtype, t.numel_);
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.owned_ = allocate(t.nbytes_);
  t.data_ = t.owned_.get();
  return t;
}

Tensor Tensor::from_f32(std::span<const float> values, Shape shape) {
  Tensor t = zeros(DType::F32, std::move(shape));
  if (t.numel_ != values.size()) {
    fail("from_f32: {} values for shape {} ({} elements)", values.size(), shape_string(t.shape_), t.numel_);
  }
  std::memcpy(t.owned_.get(), values.data(), t.nbytes_);
  return t;
}

void Tensor::release_pages() const {
  if (file_) file_->release(static_cast<std::size_t>(data_ - file_->bytes().data()), nbytes_);
}

Tensor Tensor::view(std::shared_ptr<const MappedFile> file, std::size_t offset, DType dtype, Shape shape) {
  if (!file) fail("Tensor::view: no file");
  Tensor t;
  t.numel_ = shape_numel(shape);
  t.nbytes_ = dtype_storage_bytes(dtype, t.numel_);
  if (offset > file->size() || t.nbytes_ > file->size() - offset) {
    fail("{}: {} bytes at offset {} lie beyond the end of the file ({} bytes)", file->path(), t.nbytes_, offset,
         file->size());
  }
  t.dtype_ = dtype;
  t.shape_ = std::move(shape);
  t.owned_.reset();
  t.data_ = file->bytes().data() + offset;
  t.file_ = std::move(file);
  return t;
}

std::span<std::byte> Tensor::mutable_bytes() {
  if (is_view()) fail("tensor is a read-only view into {}", file_->path());
  return {owned_.get(), nbytes_};
}

void Tensor::check_element_size(std::size_t size) const {
  const int bits = dtype_bits(dtype_);
  if (bits < 8 ? size != 1 : static_cast<int>(size * 8) != bits) {
    fail("tensor of {} accessed as {}-byte elements", dtype_name(dtype_), size);
  }
}

std::vector<float> Tensor::to_f32() const {
  std::vector<float> out(static_cast<std::size_t>(numel_));
  convert_to_f32(dtype_, data_, out.data(), out.size());
  return out;
}

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  Tensor out = zeros(dtype, shape_);
  // Through f32 in chunks, so a large tensor needs no full f32 copy.
  constexpr std::size_t kChunk = 1 << 16;  // even, so packed types split on byte boundaries
  std::vector<float> buffer(std::min<std::uint64_t>(kChunk, numel_));
  const std::size_t src_bits = static_cast<std::size_t>(dtype_bits(dtype_));
  const std::size_t dst_bits = static_cast<std::size_t>(dtype_bits(dtype));
  for (std::uint64_t start = 0; start < numel_; start += kChunk) {
    const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(kChunk, numel_ - start));
    convert_to_f32(dtype_, data_ + start * src_bits / 8, buffer.data(), n);
    convert_from_f32(dtype, buffer.data(), out.owned_.get() + start * dst_bits / 8, n);
  }
  return out;
}

Tensor Tensor::clone() const {
  Tensor out = zeros(dtype_, shape_);
  if (nbytes_) std::memcpy(out.owned_.get(), data_, nbytes_);
  return out;
}

Tensor Tensor::reshaped(Shape shape) const {
  if (shape_numel(shape) != numel_) {
    fail("cannot reshape {} ({} elements) to {}", shape_string(shape_), numel_, shape_string(shape));
  }
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

}  // namespace mopt
