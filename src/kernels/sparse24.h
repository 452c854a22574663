// Linear layers whose weight is 2:4 sparse (at most 2 non-zeros in every group of 4 consecutive
// inputs of a row), kept compressed: per row the two kept values of each group (in the weight's own
// element type) and their positions, 4 bits per group. The decode GEMV reads half the values plus
// an eighth of a byte per input instead of every value:
//
//   values   bytes per weight (dense -> 2:4)   bound on the speed-up of a memory-bound GEMV
//   bf16     2    -> 1.125                      1.78x
//   int8     1    -> 0.625 (+ a scale per row)  1.6x   (W8A16)
//   e4m3     1    -> 0.625 (+ a scale per row)  1.6x   (FP8 weights, per tensor or per channel)
//
// Layout per row: values[in / 2] in group order; positions as one 32-bit word per 32 inputs, kept
// value t of that chunk (t = 0..15, two per group, lower position first) at bits 2t..2t+1. A group
// with fewer than two non-zeros keeps zeros to fill its two slots.
//
// Kernels: m <= kGemvMaxRows rows run the GEMV (AVX2: the kept values decoded in registers, the input
// gathered by the positions with two in-register permutes), more rows decode tiles of weight rows
// into f32 (zeros included) for the BLAS or bf16 GEMM as the dense weights do; every product is the
// same sum of the same non-zero terms as the dense kernel's, in another order. A plain loop runs when
// the CPU lacks AVX2 or `in` is not a multiple of 32 (described by plain_reason()).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/gemm.h"

namespace mopt::kernels {

enum class Sparse24Values { bf16, int8, e4m3 };

class Sparse24Linear {
 public:
  // From a dense weight [out, in] given as codes of `type` (bf16 bits as 2 bytes little-endian, int8
  // two's complement, E4M3) with one f32 scale per row (int8, e4m3; empty for bf16). Nothing when the
  // weight is not 2:4 sparse (or in % 4 != 0): it then stays with the dense kernels. Throws Error
  // naming `label` for inconsistent sizes or a NaN E4M3 code.
  static std::optional<Sparse24Linear> compress(Sparse24Values type, const std::uint8_t* codes, std::int64_t out, std::int64_t in,
                                                std::vector<float> row_scales, const std::string& label);

  std::int64_t out() const { return out_; }
  std::int64_t in() const { return in_; }
  Sparse24Values type() const { return type_; }
  std::uint64_t bytes() const { return values_.size() + positions_.size() * 4 + scales_.size() * 4; }
  // "bf16 2:4", "int8 weight-only 2:4", "fp8 2:4"
  std::string describe() const;
  // Empty when the AVX2 kernel runs it; else why the plain loop does.
  const std::string& plain_reason() const { return plain_reason_; }

  // y[m, out] = x[m, in] · Wᵀ; Precision::bf16 lets prefill run the bf16 GEMM where it is chosen.
  void forward(const float* x, std::int64_t m, float* y, Precision precision = Precision::f32) const;
  // Rows [row0, row0 + rows) of the weight in f32, zeros included.
  void dequantize_rows(std::int64_t row0, std::int64_t rows, float* out) const;

  // The layout (for the AVX2 translation unit and the tests).
  const std::vector<std::uint8_t>& values() const { return values_; }
  const std::vector<std::uint32_t>& positions() const { return positions_; }
  const std::vector<float>& scales() const { return scales_; }

 private:
  Sparse24Linear() = default;
  void gemv_plain(const float* x, std::int64_t m, float* y) const;

  Sparse24Values type_ = Sparse24Values::bf16;
  std::int64_t out_ = 0, in_ = 0;
  std::vector<std::uint8_t> values_;     // [out, in/2] elements of the type (2 bytes for bf16)
  std::vector<std::uint32_t> positions_;  // [out, ceil(in/32)]
  std::vector<float> scales_;            // [out] (int8, e4m3)
  std::string plain_reason_;
};

// Whether the loaders put 2:4 weights on these kernels: yes unless MOPT_SPARSE_KERNELS=0.
bool sparse_kernels_enabled();

namespace ref {
// The plain twin of Sparse24Linear::forward: each kept value decoded and multiplied in input order.
void sparse24_forward(const Sparse24Linear& w, const float* x, std::int64_t m, float* y);
}

}  // namespace mopt::kernels
