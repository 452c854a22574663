// Fake quantization (quantize, then dequantize, in f32): the definition of
// every format's numerics, following NVIDIA Model Optimizer's quantizer
// kernels. The export path (real codes and scales, qtensor.h) divides by
// amax/max where fake quantization multiplies by max/amax; the two can differ
// in the last bit at exact half steps, as they do in the reference.
//
// Tensors are row-major [rows, cols]; "rows" is every leading dimension.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "quant/spec.h"

namespace mopt::quant {

// The static amax of x for `spec` (max of |x| per tensor, row, block or tile;
// the per-tensor global amax for NVFP4). Empty for dynamic quantizers.
// NaN or Inf in x is an error.
std::vector<float> compute_amax(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols);

// y = dequant(quant(x)); `amax` as compute_amax lays it out (ignored by the
// dynamic formats, which compute their scales from x). y may alias x.
void fake_quantize(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols,
                   std::span<const float> amax, float* y);

// The element-level steps, exposed for tests and the exporters.
// Integer: clamp(rint(x * bound/amax), -bound-1, bound) / (bound/amax); 0 when amax is below 2^-24.
float fake_quant_int(float x, float amax, int bits);
// FP8: e4m3(clamp(x * s, ±448)) * (1 / s) with s = (1 / amax) * 448 (the reference's eager
// path; its CUDA kernel divides 448 / amax, which may differ in the last bit); amax below 2^-24 counts as 1.
float fake_quant_e4m3(float x, float amax);
// The NVFP4 block scale for a block whose amax is `block_amax` under global amax `global_amax`.
float nvfp4_block_scale(float block_amax, float global_amax);
// MX: the power-of-two exponent e with 2^e >= block_amax / element_max (ceil of log2), or 0 for a zero block.
int mx_exponent(float block_amax, Element element);
// E2M1 round to nearest even with saturation at 6, on a magnitude.
float round_e2m1_magnitude(float a);

// Per-row amax of x (dynamic per-token FP8).
void row_amax(const float* x, std::int64_t rows, std::int64_t cols, float* out);

}  // namespace mopt::quant
