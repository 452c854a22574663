// The value grid a ggml integer block fixes, and quantizing onto it.
//
// Each of llama.cpp's integer block types stores per sub-block a step (and for
// Q4_K a minimum); a value is step * level - min with `level` an integer in the
// type's range, computed in f32 as llama.cpp's dequantization computes it:
//   Q4_0  blocks of 32, level -8..7,      step d (f16)
//   Q5_0  blocks of 32, level -16..15,    step d
//   Q8_0  blocks of 32, level -128..127,  step d
//   Q4_K  super-blocks of 256, sub-blocks of 32, level 0..15, step d * scale,
//         min dmin * m (6-bit scale and m, f16 d and dmin)
//   Q6_K  super-blocks of 256, sub-blocks of 16, level -32..31, step d * scale (int8 scale)
// Quantizing for a GGUF target with the target's blocks: the scales come from
// llama.cpp's own quantizer (ggml_quantize) on the weight before an algorithm
// moves it; GPTQ then rounds every value onto that fixed grid and the file
// keeps the scales and the chosen levels (ggml_requantize).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "io/gguf.h"

namespace mopt::io {

// The types above (the ones with a grid mopt can quantize onto), and whether `type` is one.
const std::vector<GgmlType>& ggml_grid_types();
bool ggml_has_grid(GgmlType type);
// The name a staging checkpoint gives a ggml block type: llama.cpp's, lower case ("q4_k").
std::string ggml_block_name(GgmlType type);

// The grid of `count` values stored as `blocks` of `type`.
struct GgmlGrid {
  std::int64_t sub_block = 0;     // values per sub-block
  int lo = 0, hi = 0;             // the level range
  std::vector<float> step, min;   // per sub-block
  // The value of `level` in sub-block `sub`, in llama.cpp's f32 arithmetic.
  float value(std::size_t sub, int level) const { return step[sub] * static_cast<float>(level) - min[sub]; }
  // The level whose value is nearest x (x finite; in a sub-block whose step is 0, the level nearest 0).
  int nearest_level(std::size_t sub, float x) const;
  float round(std::size_t sub, float x) const { return value(sub, nearest_level(sub, x)); }
};
GgmlGrid ggml_grid(GgmlType type, std::span<const std::byte> blocks, std::uint64_t count);

// `blocks` with their scales kept and every level chosen anew as the nearest to x's value on that grid:
// the bytes of x quantized onto a fixed grid. Non-finite x is an error naming `label`.
std::vector<std::byte> ggml_requantize(GgmlType type, std::span<const std::byte> blocks, const float* x, std::uint64_t count,
                                       const std::string& label);

}  // namespace mopt::io
