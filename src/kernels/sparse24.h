// Linear layers whose weight is 2:4 sparse (at most 2 non-zeros in every group of 4 consecutive
// inputs of a row), kept compressed: per row the two kept values of each group (in the weight's own
// element type) and their positions, 4 bits per group. The decode GEMV reads half the values plus
// an eighth of a byte per input instead of every value:
//
//   values   bytes per weight (dense -> 2:4)   bound on the speed-up of a memory-bound GEMV
//   bf16     2    -> 1.125                      1.78x
//   int8     1    -> 0.625 (+ a scale per row)  1.6x   (W8A16)
//   e4m3     1    -> 0.625 (+ a scale per row)  1.6x   (FP8 weights, per tensor or per channel)
//   int8     1    -> 0.625 (+ scale and sum)    1.6x   (W8A8: the input quantized to int8 here)
//   int4     0.5  -> 0.375 (+ scales per group) 1.31x  (W4A16, g128; INT4 AWQ)
//
// Layout per row: values[in / 2] in group order; positions as one 32-bit word per 32 inputs, kept
// value t of that chunk (t = 0..15, two per group, lower position first) at bits 2t..2t+1. A group
// with fewer than two non-zeros keeps zeros to fill its two slots.
//
// Kernels: m <= kGemvMaxRows rows run the GEMV (AVX2: the kept values decoded in registers, the input
// gathered by the positions with two in-register permutes), up to kSparse24GemvMaxRows (batched decode)
// in passes of kGemvMaxRows over each 16 weight rows where it is vectorized, more rows decode tiles of weight rows
// into f32 (zeros included) for the BLAS or bf16 GEMM as the dense weights do; every product is the
// same sum of the same non-zero terms as the dense kernel's, in another order. A plain loop runs when
// the CPU lacks AVX2 or `in` is not a multiple of 32 (described by plain_reason()).
//
// W8A8 (compress_w8a8, `in` a multiple of 32): the input is quantized to int8 codes as the dense W8A8
// kernel does, and every product is an exact int32 sum times the same factor, so the output equals the
// dense kernel's bit for bit. Its weight has the block layout INT4 has (below) with one kept int8 code
// per byte: per 32 inputs 64 bytes of positions, then 4 x 64 bytes, byte 64 + 64u + 4l + j holding
// row l's kept j of window u. Its kernel (AVX-512 VBMI and VNNI) runs every row count: per window
// the gather indices once, then per input row VPSHUFB gathers the biased input codes and one VPDPBUSD
// multiplies and sums the 64 kept products of 16 rows, passes of 8 input rows over a block that stays
// in cache (L1 up to ~4K inputs) — half the dense VNNI product's multiplies, so batched decode and prefill run faster than the
// dense W8A8 product too (it used to decode panels into the dense layout, 0.6-0.9x).
//
// INT4 (compress_int4: two's complement nibbles, one f32 scale per `block` inputs of a row, block a
// multiple of 64, `in` of 64) has the block layout: rows in blocks of 16 (the last padded with zero
// rows), each block one stream of 192 bytes per 32 inputs — 64 bytes of positions, byte 8 (l / 2) +
// 2u + l % 2 holding row l's four kept positions of window u (8 inputs; kept j at bits 2j), then 128
// bytes of kept nibbles biased by 8, byte 64 + 64 (u / 2) + 4l + j holding row l's kept j of window u
// in its low (u even) or high (u odd) nibble; scales [block][group][16]. Its decode kernel (AVX-512
// VBMI and VNNI) keeps one row per 32-bit lane: per window one VPMULTISHIFTQB and a ternary op make
// the gather indices, VPSHUFB gathers the input's int8 codes (rounded per 64 values exactly as the
// dense INT4 GEMV rounds them, quantize_int8_per64), VPDPBUSD sums, and nothing is summed across
// lanes (the row-per-GEMV layout spent ~12 vector ops per 128 weights and ran at 77% of the
// bandwidth; this one ~7). The plain loop and the twin round the same way. Up to int4_gemv_max_rows input
// rows (batched decode) it runs in passes of 4 over each block, as the dense INT4 GEMV does; more
// rows (prefill) decode f32 tiles (f32 input) as the dense INT4 weights do.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/gemm.h"

namespace mopt::kernels {

enum class Sparse24Values { bf16, int8, e4m3, int4 };

// bf16, int8 weight-only and FP8 2:4 weights run their GEMV in passes up to this many input rows:
// bench/sparse24_bench --rows on Sapphire Rapids, GFLOP/s against the f32 tiles: 8 rows 232-282 / 47-55,
// 16 rows 234-282 / 100-105, 32 rows 160-173 / 157-164. (W8A8 and INT4 have their own kernels' limits.)
inline constexpr std::int64_t kSparse24GemvMaxRows = 16;

class Sparse24Linear {
 public:
  // From a dense weight [out, in] given as codes of `type` (bf16 bits as 2 bytes little-endian, int8
  // two's complement, E4M3) with one f32 scale per row (int8, e4m3; empty for bf16). Nothing when the
  // weight is not 2:4 sparse (or in % 4 != 0): it then stays with the dense kernels. Throws Error
  // naming `label` for inconsistent sizes or a NaN E4M3 code.
  static std::optional<Sparse24Linear> compress(Sparse24Values type, const std::uint8_t* codes, std::int64_t out, std::int64_t in,
                                                std::vector<float> row_scales, const std::string& label);
  // An int8 W8A8 weight (codes, one scale per row; `in` a multiple of 32, else nothing) whose input is quantized with
  // clamp(rint(x * 127 / input_amax), -128, 127), as kernels::PackedLinear's W8A8.
  // An INT4 weight: codes as QuantizedWeightSource's int4 (two's complement nibbles, even column in
  // the low nibble, rows of ceil(in / 2) bytes), scales [out, in / block]; block a multiple of 64 and
  // `in` of 64 (else nothing: the dense kernels keep it).
  static std::optional<Sparse24Linear> compress_int4(const std::uint8_t* codes, std::int64_t out, std::int64_t in, std::int64_t block,
                                                     std::vector<float> scales, const std::string& label);
  static std::optional<Sparse24Linear> compress_w8a8(const std::uint8_t* codes, std::int64_t out, std::int64_t in,
                                                     std::vector<float> row_scales, float input_amax, const std::string& label);

  std::int64_t out() const { return out_; }
  std::int64_t in() const { return in_; }
  Sparse24Values type() const { return type_; }
  // W8A8: the input is quantized to int8 inside forward().
  bool int8_activations() const { return int8_activations_; }
  float input_amax() const { return input_amax_; }
  // Inputs per scale along a row: `in` but for INT4.
  std::int64_t block() const { return block_; }
  std::uint64_t bytes() const { return values_.size() + positions_.size() * 4 + scales_.size() * 4 + offsets_.size() * 4 + factors_.size() * 4; }
  // "bf16 2:4", "int8 weight-only 2:4", "int8 w8a8 2:4", "fp8 2:4", "int4 g128 2:4"
  std::string describe() const;
  // Empty when the AVX2 kernel runs it; else why the plain loop does.
  const std::string& plain_reason() const { return plain_reason_; }

  // y[m, out] = x[m, in] · Wᵀ; Precision::bf16 lets prefill run the bf16 GEMM where it is chosen.
  void forward(const float* x, std::int64_t m, float* y, Precision precision = Precision::f32) const;
  // Rows [row0, row0 + rows) of the weight in f32, zeros included.
  void dequantize_rows(std::int64_t row0, std::int64_t rows, float* out) const;

  // The layout (for the SIMD translation units and the tests; int4's as described above).
  const std::vector<std::uint8_t>& values() const { return values_; }
  const std::vector<std::uint32_t>& positions() const { return positions_; }
  const std::vector<float>& scales() const { return scales_; }
  // W8A8: per row (of the padded blocks) weight scale / input scale, and 128 x the sum of the row's
  // codes (the input codes are multiplied biased by 128, as unsigned bytes).
  const std::vector<float>& w8a8_factors() const { return factors_; }
  const std::vector<std::int32_t>& w8a8_offsets() const { return offsets_; }

 private:
  Sparse24Linear() = default;
  void gemv_plain(const float* x, std::int64_t m, float* y) const;
  void forward_w8a8(const float* x, std::int64_t m, float* y) const;
  void gemv_int4(const float* x, std::int64_t m, float* y) const;

  Sparse24Values type_ = Sparse24Values::bf16;
  std::int64_t out_ = 0, in_ = 0;
  std::vector<std::uint8_t> values_;     // [out, in/2] elements of the type (2 bytes for bf16); int4, W8A8: the block stream
  std::vector<std::uint32_t> positions_;  // [out, ceil(in/32)] (empty for int4 and W8A8: in the stream)
  std::vector<float> scales_;            // [out] (int8, e4m3); int4: [blocks of 16 rows, in / block, 16]
  std::int64_t block_ = 0;
  bool int8_activations_ = false;
  float input_amax_ = 0.0f;
  std::vector<float> factors_;         // [out padded to 16] (W8A8)
  std::vector<std::int32_t> offsets_;  // [out padded to 16] (W8A8)
  std::string plain_reason_;
};

// Whether the loaders put 2:4 weights on these kernels: yes unless MOPT_SPARSE_KERNELS=0.
bool sparse_kernels_enabled();

namespace ref {
// The plain twin of Sparse24Linear::forward: each kept value decoded and multiplied in input order
// (W8A8: the input's int8 codes times the weight's, summed exactly, times the row's factor).
void sparse24_forward(const Sparse24Linear& w, const float* x, std::int64_t m, float* y);
}

}  // namespace mopt::kernels
