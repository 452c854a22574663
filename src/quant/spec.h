// What a quantizer is: the element type it rounds to and how its scales are
// laid out. These mirror the quantizer attributes of NVIDIA Model Optimizer
// (num_bits, axis, block_sizes, dynamic/static) for the formats mopt supports.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace mopt::io {
enum class GgmlType : std::uint32_t;  // io/gguf.h
}

namespace mopt::quant {

// The value grid.
enum class Element {
  int8,  // -128..127, scale 127/amax (full range, as ModelOpt's narrow_range=False)
  int4,  // -8..7, scale 7/amax
  e4m3,  // FP8 E4M3 "fn", scale 448/amax (saturating)
  e2m1,  // FP4 E2M1, {0, .5, 1, 1.5, 2, 3, 4, 6}
};

// The grid of an INT4 block quantizer: which codes a block uses and how its scale follows from it.
enum class IntGrid {
  // The reference's: scale amax / 7, codes -7..7 (-8 only where a clipped amax saturates), the
  // amax the block's largest magnitude.
  symmetric,
  // llama.cpp Q4_0's: the block's "amax" is its value of largest magnitude with its sign (the first
  // such), d = f16(that / -8), codes -8..7, value code * d: 16 levels, the extreme on -8 exactly.
  q4_0,
  // A GGUF file's own blocks of `QuantizerSpec::ggml_type` (Q4_K, Q6_K, Q5_0, Q8_0, ...; io/ggml_grid.h):
  // llama.cpp's quantizer chooses each block's scales, the weight is stored as those blocks. For INT4
  // and INT8 weights quantized for a GGUF target.
  ggml,
};

// Where the scales live.
enum class Scaling {
  per_tensor,  // one static amax
  per_row,     // one static amax per row (ModelOpt axis 0 of a [out, in] weight)
  per_token,   // dynamic: one amax per row of every activation batch
  block,       // static: one amax per `block` elements along a row; with block_rows > 0, per block_rows x block tile
  nvfp4,       // dynamic 16-element blocks with an E4M3 block scale under a static per-tensor global amax
  mx,          // dynamic 32-element blocks with a power-of-two (E8M0) scale
};

struct QuantizerSpec {
  Element element = Element::int8;
  Scaling scaling = Scaling::per_tensor;
  std::int64_t block = 0;       // block length along the last dim (block, nvfp4, mx)
  std::int64_t block_rows = 0;  // 2-D blocks (FP8 128x128): rows per tile
  // W4A8: after the INT4 stage the weight is FP8-quantized per tensor.
  bool fp8_second_stage = false;
  IntGrid grid = IntGrid::symmetric;  // INT4 blocks, or INT4/INT8 in ggml blocks
  io::GgmlType ggml_type{};           // the block type of IntGrid::ggml (scaling block, block its values)

  bool operator==(const QuantizerSpec&) const = default;

  // True when the quantizer needs a calibrated amax (static scales or a static global amax).
  bool needs_amax() const { return scaling != Scaling::per_token && scaling != Scaling::mx; }
  // Largest representable magnitude of the element grid: 127, 7, 448, 6.
  float max_bound() const;
  // "int4 block 128", "fp8 per-tensor", ... for reports.
  std::string describe() const;
};

float element_max_bound(Element element);
const char* element_name(Element element);

// Number of amax values for a [rows, cols] tensor: 1, rows, rows*ceil(cols/block), tiles.
std::int64_t amax_count(const QuantizerSpec& spec, std::int64_t rows, std::int64_t cols);

}  // namespace mopt::quant
