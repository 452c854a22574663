// The tensor encodings of compressed-tensors checkpoints, both ways: pack-quantized's
// int32 words of 4- or 8-bit codes, and sparse-24-bitmask's kept values with their
// bitmask. The exporter (export/compressed_tensors.h) writes them and the reader
// (load/compressed_tensors.h) reads them back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace mopt::io {

// compressed-tensors' sparse-24-bitmask form of a 2:4 sparse [rows, cols] tensor (cols % 4 == 0; any
// dtype of 1, 2 or 4 bytes per element, stored codes included): `compressed` [rows, cols/2] the kept
// values in row order (same dtype), `bitmask` U8 [rows, ceil(cols/8)] (bit j % 8 of byte j / 8 set
// where column j is kept), `shape` I64 [2, 1]. A group with fewer than two non-zeros keeps zeros as
// compressed-tensors 0.14 does (all zero: columns 2, 3; one non-zero at 0: 0, 2; at 1: 1, 3; at 2 or
// 3: 2, 3). Throws Error naming `label` when a group holds more than two non-zeros.
struct Sparse24Bitmask {
  Tensor compressed, bitmask, shape;
};
Sparse24Bitmask sparse24_bitmask_compress(const Tensor& dense, const std::string& label);
// The dense tensor back (pruned positions +0); throws Error naming `label` on inconsistent parts.
Tensor sparse24_bitmask_decompress(const Tensor& compressed, const Tensor& bitmask, const Tensor& shape, const std::string& label);
// True when `dense` [rows, cols] is 2:4 sparse (every group of 4 values with at most 2 non-zeros;
// -0 counts as zero).
bool is_sparse24(const Tensor& dense);

// pack-quantized's packing of signed `bits`-bit codes [rows, cols] into int32
// words along cols (offset 2^(bits-1), the first value in the lowest bits), and back.
Tensor pack_int32_rows(const std::vector<std::int8_t>& codes, std::int64_t rows, std::int64_t cols, int bits);
std::vector<std::int8_t> unpack_int32_rows(const Tensor& packed, std::int64_t rows, std::int64_t cols, int bits);

}  // namespace mopt::io
