#include "io/compressed_tensors_packing.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mopt::io {

Tensor pack_int32_rows(const std::vector<std::int8_t>& codes, std::int64_t rows, std::int64_t cols, int bits) {
  const int per_word = 32 / bits;
  const std::int64_t words = (cols + per_word - 1) / per_word;
  const std::uint32_t mask = (1u << bits) - 1u, offset = 1u << (bits - 1);
  Tensor t = Tensor::zeros(DType::I32, {rows, words});
  auto* out = t.mutable_data<std::int32_t>();
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t w = 0; w < words; ++w) {
      std::uint32_t word = 0;
      for (int j = 0; j < per_word; ++j) {
        const std::int64_t c = w * per_word + j;
        // Padding columns hold the code 0 (offset value), as the reference pads with zeros before the offset.
        const std::uint32_t v = c < cols ? static_cast<std::uint32_t>(codes[static_cast<std::size_t>(r * cols + c)] + static_cast<int>(offset))
                                         : offset;
        word |= (v & mask) << (bits * j);
      }
      out[r * words + w] = static_cast<std::int32_t>(word);
    }
  }
  return t;
}

std::vector<std::int8_t> unpack_int32_rows(const Tensor& packed, std::int64_t rows, std::int64_t cols, int bits) {
  const int per_word = 32 / bits;
  const std::int64_t words = (cols + per_word - 1) / per_word;
  if (packed.dtype() != DType::I32 || packed.shape() != Shape{rows, words}) {
    fail("weight_packed is {} {}, expected int32 [{}, {}]", dtype_name(packed.dtype()), shape_string(packed.shape()), rows, words);
  }
  const std::uint32_t mask = (1u << bits) - 1u;
  const int offset = 1 << (bits - 1);
  std::vector<std::int8_t> codes(static_cast<std::size_t>(rows * cols));
  const auto* in = packed.data<std::int32_t>();
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t c = 0; c < cols; ++c) {
      const auto word = static_cast<std::uint32_t>(in[r * words + c / per_word]);
      const int v = static_cast<int>((word >> (bits * (c % per_word))) & mask);
      codes[static_cast<std::size_t>(r * cols + c)] = static_cast<std::int8_t>(v - offset);
    }
  }
  return codes;
}

namespace {

bool is_zero_bits(const std::uint8_t* p, std::size_t bytes, bool is_float) {
  // ±0 of a float type: every bit zero but the sign (the top bit, little-endian); an integer: every
  // bit zero (0x80 is int8's -128, not a zero).
  for (std::size_t b = 0; b + 1 < bytes; ++b) {
    if (p[b] != 0) return false;
  }
  return (p[bytes - 1] & (is_float ? 0x7F : 0xFF)) == 0;
}

std::size_t element_bytes(const Tensor& t, const std::string& label) {
  const auto bits = dtype_bits(t.dtype());
  if (bits != 8 && bits != 16 && bits != 32) fail("{}: a {} tensor has no sparse-24-bitmask form", label, dtype_name(t.dtype()));
  return bits / 8;
}

}  // namespace

bool is_sparse24(const Tensor& dense) {
  if (dense.rank() != 2 || dense.dim(1) % 4 != 0) return false;
  const auto bits = dtype_bits(dense.dtype());
  if (bits != 8 && bits != 16 && bits != 32) return false;
  const std::size_t eb = bits / 8;
  const bool is_float = dtype_is_float(dense.dtype());
  const auto* p = reinterpret_cast<const std::uint8_t*>(dense.bytes().data());
  for (std::uint64_t g = 0; g < dense.numel(); g += 4) {
    int nonzero = 0;
    for (int t = 0; t < 4; ++t) nonzero += !is_zero_bits(p + static_cast<std::size_t>(g + t) * eb, eb, is_float);
    if (nonzero > 2) return false;
  }
  return true;
}

Sparse24Bitmask sparse24_bitmask_compress(const Tensor& dense, const std::string& label) {
  if (dense.rank() != 2 || dense.dim(1) % 4 != 0) fail("{}: 2:4 sparsity needs a 2-D tensor with a multiple of 4 columns", label);
  const std::size_t eb = element_bytes(dense, label);
  const bool is_float = dtype_is_float(dense.dtype());
  const std::int64_t rows = dense.dim(0), cols = dense.dim(1), row_bytes = (cols + 7) / 8;
  Sparse24Bitmask r;
  r.compressed = Tensor::zeros(dense.dtype(), {rows, cols / 2});
  r.bitmask = Tensor::zeros(DType::U8, {rows, row_bytes});
  r.shape = Tensor::zeros(DType::I64, {2, 1});
  r.shape.mutable_data<std::int64_t>()[0] = rows;
  r.shape.mutable_data<std::int64_t>()[1] = cols;
  const auto* src = reinterpret_cast<const std::uint8_t*>(dense.bytes().data());
  auto* dst = reinterpret_cast<std::uint8_t*>(r.compressed.mutable_bytes().data());
  auto* bits = r.bitmask.mutable_data<std::uint8_t>();
  std::size_t out = 0;
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t c = 0; c < cols; c += 4) {
      const std::uint8_t* g = src + static_cast<std::size_t>(row * cols + c) * eb;
      bool nonzero[4];
      int n = 0;
      for (int t = 0; t < 4; ++t) n += (nonzero[t] = !is_zero_bits(g + t * eb, eb, is_float));
      if (n > 2) fail("{}: row {} columns {}..{} hold {} non-zero values; not 2:4 sparse", label, row, c, c + 3, n);
      bool keep[4] = {nonzero[0], nonzero[1], nonzero[2], nonzero[3]};
      if (n == 0) keep[2] = keep[3] = true;
      else if (n == 1) {
        const int at = nonzero[0] ? 0 : nonzero[1] ? 1 : nonzero[2] ? 2 : 3;
        keep[at == 0 ? 2 : at == 1 ? 3 : at == 2 ? 3 : 2] = true;
      }
      for (int t = 0; t < 4; ++t) {
        if (!keep[t]) continue;
        std::copy(g + t * eb, g + (t + 1) * eb, dst + out * eb);
        ++out;
        const std::int64_t j = c + t;
        bits[row * row_bytes + j / 8] = static_cast<std::uint8_t>(bits[row * row_bytes + j / 8] | (1u << (j % 8)));
      }
    }
  }
  return r;
}

Tensor sparse24_bitmask_decompress(const Tensor& compressed, const Tensor& bitmask, const Tensor& shape, const std::string& label) {
  if (shape.numel() != 2) fail("{}.shape has {} values, expected 2", label, shape.numel());
  const Tensor sh = shape.to(DType::F64);
  const double rd = sh.data<double>()[0], cd = sh.data<double>()[1];
  if (!(rd >= 1 && cd >= 4 && rd < 1e9 && cd < 1e9) || rd != std::floor(rd) || cd != std::floor(cd)) fail("{}.shape [{}, {}] is not a matrix shape", label, rd, cd);
  const auto rows = static_cast<std::int64_t>(rd), cols = static_cast<std::int64_t>(cd);
  if (cols % 4 != 0) fail("{}.shape has {} columns, not a multiple of 4", label, cols);
  const std::int64_t row_bytes = (cols + 7) / 8;
  if (bitmask.dtype() != DType::U8 || bitmask.numel() != static_cast<std::uint64_t>(rows * row_bytes)) {
    fail("{}.bitmask is not U8 [{}, {}]", label, rows, row_bytes);
  }
  if (compressed.numel() != static_cast<std::uint64_t>(rows * cols / 2)) fail("{}.compressed has {} values, expected {}", label, compressed.numel(), rows * cols / 2);
  const std::size_t eb = element_bytes(compressed, label + ".compressed");
  Tensor dense = Tensor::zeros(compressed.dtype(), {rows, cols});
  const auto* bits = bitmask.data<std::uint8_t>();
  const auto* src = reinterpret_cast<const std::uint8_t*>(compressed.bytes().data());
  auto* dst = reinterpret_cast<std::uint8_t*>(dense.mutable_bytes().data());
  std::size_t in = 0;
  for (std::int64_t row = 0; row < rows; ++row) {
    for (std::int64_t j = 0; j < cols; ++j) {
      if (!((bits[row * row_bytes + j / 8] >> (j % 8)) & 1)) continue;
      if (in >= static_cast<std::size_t>(rows * cols / 2)) fail("{}.bitmask keeps more than half of the values", label);
      std::copy(src + in * eb, src + (in + 1) * eb, dst + static_cast<std::size_t>(row * cols + j) * eb);
      ++in;
    }
  }
  if (in != static_cast<std::size_t>(rows * cols / 2)) fail("{}.bitmask keeps {} values, expected {}", label, in, rows * cols / 2);
  return dense;
}

}  // namespace mopt::io
