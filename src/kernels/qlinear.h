// Linear layers whose weights stay quantized: the codes are repacked once, at
// load, into the layout the kernels read, and decoded in registers while
// multiplying (never widened to a full f32 matrix).
//
//   weights  codes                     scales (per row, per block of `block` inputs)
//   int4     -8..7                     f32                (INT4 AWQ / W4A16)
//   int4     -8..7 through a per-block table of 16 E4M3 codes, times one f32
//                                                         (W4A8: the INT4 value after its FP8 stage)
//   int8     -128..127                 f32 per row        (W8A16; W8A8 runs int8 x int8 -> int32)
//   e4m3     FP8                       f32                (FP8 per tensor / channel / 128x128 block, MXFP8)
//   e2m1     FP4                       E4M3 x global f32 (NVFP4) or E8M0 (MXFP4), one byte per block
//
// Activations arrive in f32, already transformed the way the format says
// (pre-quantization scale, FP8/FP4 rounding: the model's input transform);
// only W8A8 quantizes them here, to int8 with the static input scale, because
// its product runs on integers.
//
// Kernels: m <= kGemvMaxRows rows (decode) run a GEMV that reads each weight
// once for all rows (the INT4 GEMV rounds its input to int8 per 64 inputs,
// dynamically, as llama.cpp's Q4_0 x Q8_0 product does, so that it runs on
// integers at the memory's speed; ref::int4_decode is that arithmetic in plain
// loops, and the plain path runs it too); batched decode runs the vectorized GEMVs in passes of
// kGemvMaxRows input rows up to a limit per type (runs_gemv: INT4 int4_gemv_max_rows, int8 and FP8
// 16, W4A8 and NVFP4 8); more rows (prefill) decode tiles of weight rows into f32 and multiply them
// with the BLAS, except W8A8, which has its own int8 GEMM.
// Each has a plain reference (ref::) that the fast versions are tested
// against; the AVX2 versions are chosen at run time (cpu_features()).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "kernels/gemm.h"
#include "kernels/linear.h"

namespace mopt::kernels {

enum class QuantizedWeightType { int4, int4_fp8_table, int8, e4m3, e2m1 };

// What the exporter's reader hands over: codes in their natural order.
struct QuantizedWeightSource {
  QuantizedWeightType type = QuantizedWeightType::int8;
  std::int64_t out = 0, in = 0;
  std::int64_t block = 0;  // inputs per scale along a row; `in` for one scale per row
  // Codes [out, in] row-major: one byte each (int8 as two's complement, e4m3),
  // or one nibble each for int4 (two's complement) and e2m1, even column in the low nibble
  // (rows padded to a whole byte).
  std::vector<std::uint8_t> codes;
  // Or the codes as a checkpoint stores them (a view into its mapped file), used in place where the
  // kernels read that layout (int8 weight-only, e4m3) and copied otherwise. Used when `codes` is empty.
  Tensor stored_codes;
  // int4, int8, e4m3: [out, ceil(in/block)] f32 scales.
  std::vector<float> scales;
  // e2m1: [out, ceil(in/block)] scale codes and what each code stands for (the
  // E4M3 value times NVFP4's global scale, or the E8M0 power of two).
  std::vector<std::uint8_t> scale_codes;
  std::vector<float> scale_code_values;  // 256 entries
  // int4_fp8_table: per block the 16 E4M3 codes of INT4 values -8..7 ([out, nb, 16]) and the f32 they are scaled by.
  std::vector<std::uint8_t> block_tables;
  float table_scale = 1.0f;
  // W8A8: the input is quantized to int8 with clamp(rint(x * 127 / input_amax), -128, 127).
  bool int8_activations = false;
  float input_amax = 0.0f;
};

class PackedLinear {
 public:
  // Repacks the codes (throws Error naming `label` for a shape or code the layout cannot hold).
  PackedLinear(QuantizedWeightSource source, const std::string& label);
  // Not copyable (it refers into its own buffers); moves keep the buffers.
  PackedLinear(const PackedLinear&) = delete;
  PackedLinear& operator=(const PackedLinear&) = delete;
  PackedLinear(PackedLinear&&) = default;
  PackedLinear& operator=(PackedLinear&&) = default;

  std::int64_t out() const { return src_.out; }
  std::int64_t in() const { return src_.in; }
  QuantizedWeightType type() const { return src_.type; }
  bool int8_activations() const { return src_.int8_activations; }
  // Bytes the kernels read for the weight: codes, scales and tables.
  std::uint64_t bytes() const;
  // "int4 g128", "int8 w8a8", ... for reports.
  std::string describe() const;
  // Whether a vectorized kernel runs it on this CPU (else the plain loops).
  bool vectorized() const { return vectorized_; }
  // Why the plain loops run it: empty when vectorized, else e.g. "no AVX2 kernel for groups of 48
  // (it takes multiples of 32)" or "MOPT_ISA=scalar hides AVX2, FMA, F16C".
  const std::string& plain_reason() const { return plain_reason_; }

  // y[m, out] = x[m, in] · Wᵀ. Precision::bf16 lets prefill (where !runs_gemv(m)) decode the weight
  // into bf16 panels and run the bf16 kernels where bf16_kernels_chosen() (gemm.h); W8A8 is exact either way.
  void forward(const float* x, std::int64_t m, float* y, Precision precision = Precision::f32) const;
  // Whether forward runs the GEMV for m input rows (decode, and batched decode in passes up to each
  // type's limit; W8A8: its own product, never).
  bool runs_gemv(std::int64_t m) const;

  // Rows [row0, row0 + rows) of the weight in f32 (what the kernels multiply by).
  void dequantize_rows(std::int64_t row0, std::int64_t rows, float* out) const;

  // The source with its codes dropped where they were repacked (scales and tables stay).
  const QuantizedWeightSource& source() const { return src_; }
  std::int64_t blocks_per_row() const { return blocks_per_row_; }

  // The kernels' layouts (public for the AVX2 translation unit).
  struct Layout {
    // int4, int4_fp8_table, e2m1 (when vectorized: in % 64 == 0): per row, chunks of 64 inputs as 32 bytes,
    // byte j holding input j in its low nibble and input j + 32 in its high one. int4 codes are
    // biased by 8 (0..15, which also index int4_fp8_table's tables); e2m1 codes as they are.
    std::vector<std::uint8_t> nibbles;
    // int8 for W8A8: rows padded with zeros to k32 = in rounded up to 32.
    std::vector<std::int8_t> int8_rows;
    std::int64_t k32 = 0;
    // int8 for W8A8 on a CPU with AVX-512 VNNI: the rows packed for VPDPBUSD instead (int8_rows stays empty).
    Int8Panels vnni;
  };
  const Layout& layout() const { return layout_; }

 private:
  void forward_gemv(const float* x, std::int64_t m, float* y) const;
  void forward_tiles(const float* x, std::int64_t m, float* y, Precision precision) const;
  void forward_w8a8(const float* x, std::int64_t m, float* y) const;

  QuantizedWeightSource src_;
  Layout layout_;
  std::span<const std::uint8_t> codes_;  // the codes in their natural layout (empty once repacked)
  std::vector<float> w8a8_factor_;  // per row: weight scale / input scale
  std::vector<float> half_code_values_;  // e2m1: scale_code_values / 2 (the kernels decode 2 x E2M1)
  std::int64_t blocks_per_row_ = 0;
  bool vectorized_ = false;
  std::string plain_reason_;
};

// int8 activation codes as W8A8 quantizes them: clamp(rint(x * (127 / amax)), -128, 127).
void quantize_int8_activations(const float* x, std::int64_t n, float amax, std::int8_t* codes);
// The INT4 GEMV's input: each 64 values (n a multiple of 64) rounded to int8 codes
// clamp(rint(x * 127 / amax), -127, 127) with amax their largest |x|; steps[n / 64] = amax / 127
// (the codes times the step approximate x).
void quantize_int8_per64(const float* x, std::int64_t n, std::int8_t* codes, float* steps);
// The scale those codes are the input times: 127 / amax, or 1 for an amax at or below 2^-24 (every
// code then 0).
float int8_input_scale(float amax);
// INT4 weights whose decode rounds its input (int4_decode_rounds_input) run the GEMV up to this many
// rows (batched decode), in passes of kGemvMaxRows over blocks of 16 weight rows that stay in cache:
// its int8 products outrun decoding f32 tiles for the f32 GEMM until about here (bench/sparse24_bench
// --rows on Sapphire Rapids: 4.7x at 8 rows, 1.5x at 32, even at 64 — and a 64-token prefill of the 1B
// model 0.89x —, 0.8x at 128). More rows (a prompt of more than 32 tokens, evaluation's batched
// windows) keep an f32 input.
inline constexpr std::int64_t kInt4GemvMaxRows = 32;
// Only for weights of at least this many elements: a smaller one sits in L2, where decoding f32 tiles
// costs little and the f32 GEMM outran the passes (tiny-kjv's [704, 256] and [256, 704] at 16 rows:
// 0.56-0.71x; SmolLM2's [1536, 576] 1.4-1.6x at 8-16 rows, [576, 576] 0.71x at 16).
inline constexpr std::int64_t kInt4GemvMinWeights = std::int64_t{1} << 19;
// The rows up to which an INT4 weight of [out, in] whose decode rounds its input runs the GEMV:
// kInt4GemvMaxRows for weights of kInt4GemvMinWeights elements or more, else kGemvMaxRows.
inline std::int64_t int4_gemv_max_rows(std::int64_t out, std::int64_t in) {
  return out * in >= kInt4GemvMinWeights ? kInt4GemvMaxRows : kGemvMaxRows;
}
// Whether an INT4 weight's decode (m <= int4_gemv_max_rows) rounds its input to int8 per 64 values: INT4
// codes in groups of a multiple of 32 with whole 64s of inputs. On every CPU: the plain loops do
// what the AVX2 GEMV does (ref::int4_decode), so a result does not depend on the machine.
bool int4_decode_rounds_input(const QuantizedWeightSource& source);

namespace ref {
// The f32 weight [out, in] a source stands for, read from its natural layout.
std::vector<float> dequantize(const QuantizedWeightSource& source);
// Dequantizes the whole weight, quantizes the input as the format says (W8A8), multiplies with the reference GEMM.
void quantized_linear_forward(const QuantizedWeightSource& source, const float* x, std::int64_t m, float* y);
// The INT4 decode where int4_decode_rounds_input: each 64 inputs rounded by quantize_int8_per64, each
// half of 32 an exact integer dot product of codes, times its group's scale and its 64's step, summed
// in double. The fast GEMV differs from it only in the order of its f32 sums.
void int4_decode(const QuantizedWeightSource& source, const float* x, std::int64_t m, float* y);
}

}  // namespace mopt::kernels
