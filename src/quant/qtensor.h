// Real quantization of a Linear weight [out, in]: the codes and scales a
// checkpoint stores, in the layout of NVIDIA Model Optimizer's Hugging Face
// export ("modelopt" format), and their dequantization.
//
//   format        weight                       weight_scale                    weight_scale_2
//   fp8 tensor    e4m3 [out, in]               f32 []  amax/448                -
//   fp8 channel   e4m3 [out, in]               f32 [out]                       -
//   fp8 block     e4m3 [out, in]               f32 [out/128, in/128]           -
//   int8 channel  i8 [out, in]                 f32 [out]  amax/127             -
//   int4 block    u8 [out/2, in] (rows 2r, 2r+1 in the low, high nibble)
//                                              f32 [out, in/g]  amax/7         w4a8: f32 [] amax2/448
//   nvfp4         u8 [out, in/2] (even column in the low nibble)
//                                              e4m3 [out, in/16]               f32 [] amax/2688
//   mxfp4         u8 [out, in/2]               u8 (E8M0) [out, in/32]          -
//   mxfp8         e4m3 [out, in]               u8 (E8M0) [out, in/32]          -
//   ggml blocks   u8 [out, in/B * bytes]       -                               -
//                 (IntGrid::ggml, mopt's staging form of a GGUF export: each row llama.cpp's blocks)
// Block counts round up; a partial last block is quantized like a zero-padded one.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "core/tensor.h"
#include "quant/spec.h"

namespace mopt::quant {

struct QuantizedWeight {
  Tensor weight;
  Tensor weight_scale;
  std::optional<Tensor> weight_scale_2;
};

// `w` [out, in] in f32 (the checkpoint's values widened); `amax` as
// compute_amax(spec, ...) gives it (or calibrated), `amax2` the second
// stage's amax for W4A8. Throws Error on shapes the layout cannot hold (odd
// out for INT4, odd in for FP4).
// `nvfp4_block_amax` (NVFP4 only, [out, ceil(in/16)]) fixes the block scales
// from these maxima instead of w's own (GPTQ quantizes on a grid fixed from
// the original weight, as the reference's static NVFP4 quantizer does).
// Throws Error when a [out, in] weight has a shape `spec`'s layout cannot hold (INT4: an odd out, an in
// that is not whole groups; FP4: an odd in; MX: an in that is not whole blocks; ggml: rows that are not
// whole blocks). quantize_weight checks this first; the pipeline checks every Linear before calibrating.
void check_weight_shape(const QuantizerSpec& spec, std::int64_t out, std::int64_t in);

// `ggml` (IntGrid::ggml only): see GgmlBlockInputs.
struct GgmlBlockInputs {
  // [in]: the mean square of each input channel over the calibration tokens (llama-imatrix's
  // statistic, times the square of any scale the input is multiplied by): llama.cpp's quantizer
  // weighs each value's error by it, as llama-quantize --imatrix does. Empty: unweighted.
  std::span<const float> importance;
  // [out rows of blocks]: blocks whose scales fix the grid (GPTQ's, from the weight before it moved
  // it); w's values are rounded onto that grid. Empty: llama.cpp's quantizer chooses the blocks.
  std::span<const std::byte> fixed_blocks;
};
QuantizedWeight quantize_weight(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in,
                                std::span<const float> amax, float amax2 = 0.0f, std::span<const float> nvfp4_block_amax = {},
                                const GgmlBlockInputs& ggml = {});

// NVFP4's per-block maxima of w [out, ceil(in/block)].
std::vector<float> nvfp4_block_amax(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in);

// The NVFP4 step (E4M3 block scale times the global scale) the export uses for a block of maximum
// `block_amax` under global amax `global_amax`.
float nvfp4_export_step(float block_amax, float global_amax);

// ||a - ref|| / ||ref|| (0 for a zero ref): a quantized weight's error as the reports give it.
double relative_error(const std::vector<float>& a, const std::vector<float>& ref);

// The f32 values [out, in] a quantized weight stands for.
std::vector<float> dequantize_weight(const QuantizerSpec& spec, const QuantizedWeight& q, std::int64_t out, std::int64_t in);

// The amax of W4A8's FP8 stage: max |int4 fake-quant of w|.
float w4a8_second_amax(const QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in,
                       std::span<const float> amax);

// The INT4 layout's codes: [out/2, in] bytes (row 2r in the low nibble, 2r+1 in the high one) to
// signed codes [out, in], and back.
std::vector<std::int8_t> unpack_int4_rows(const Tensor& packed, std::int64_t out, std::int64_t in);
Tensor pack_int4_rows(const std::vector<std::int8_t>& codes, std::int64_t out, std::int64_t in);

// Checks the stored tensors have the dtypes and shapes the layout calls for;
// throws Error naming `label` otherwise.
void check_quantized_weight(const QuantizerSpec& spec, const QuantizedWeight& q, std::int64_t out, std::int64_t in,
                            const std::string& label);

}  // namespace mopt::quant
