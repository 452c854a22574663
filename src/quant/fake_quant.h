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

// IntGrid::ggml weights with `importance` (one weight per column, or empty): llama.cpp's quantizer
// weighing each value's error by it (as llama-quantize --imatrix), then its dequantization. y may alias x.
void fake_quantize_ggml(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols, std::span<const float> importance,
                        float* y);

// The straight-through gradient of fake_quantize with clipping (the reference's
// pass_through_bwd=False): grad, the gradient of y, is zeroed where |x| exceeds the amax its
// element was rounded under, and kept elsewhere. The static scalings (per tensor, per row, blocks)
// clip; the dynamic ones (per token, MX) take their scale from the data and clip nothing; NVFP4's
// blocks clip where |x| exceeds the static global amax (a block scale saturates at E4M3's 448 there).
// Without clipping (pass_through_bwd=True, the reference's default) the gradient passes unchanged.
void zero_clipped_gradient(const QuantizerSpec& spec, const float* x, std::int64_t rows, std::int64_t cols,
                           std::span<const float> amax, float* grad);

// Learned scales (LSQ: the reference's `lsq` algorithm with tied amax — one amax per block both
// divides before the rounding and multiplies after it — which is what an exported checkpoint holds).
// Two kinds of weight: integer elements in static blocks (int4_rtn, int4_awq, INT8 blocks), one amax
// per block as compute_amax lays it out; and NVFP4 (nvfp4, nvfp4_awq), one amax per 16-element block
// under the static global amax (the reference's nvfp4_lsq recipe: static NVFP4 weights, the block
// scale FP8-rounded in the forward pass). `global_amax` is NVFP4's; the integer formats ignore it.
//
// Integer: wq = clamp(rint(w / s), -bound - 1, bound) · s with s = amax / bound (1e-8 where that is
// smaller). NVFP4: wq = e2m1(w / s) · s with s = nvfp4_lsq_scale(amax, global_amax).
void lsq_forward(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax,
                 float global_amax, float* wq);
// From g = dL/dwq: dw += g where w / s lies in the range (-bound - 1 .. bound; NVFP4 |w / s| <= 6; zero
// outside: LSQ always clips), and damax[block] += the amax's gradient: Σ g · (q - m · w / s) / bound
// over the block (q the rounded level, m the in-range mask); for NVFP4 times the masks of the scale's
// own roundings (zero where the scale sits at its floor or above the global scale, where the reference's
// clamp and FP8 rounding pass no gradient).
void lsq_backward(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax,
                  float global_amax, const float* g, float* dw, float* damax);
// LSQ's starting amax, as the reference's MSE weight calibration chooses it. Integer blocks: per
// block, the first of the candidates c · amax (c = 39 steps from 0.25 to 4, as torch.linspace in f32)
// that minimizes Σ (w - fake_quantize(w; c · amax))² over the block, `amax` as compute_amax gives it.
// NVFP4 (`amax` the global amax, one value): per 16-element block, the first of the 126 amax values
// global_amax · f / 448 (f every positive finite E4M3 value, ascending) minimizing the block's squared
// error under static NVFP4 quantization at that amax (its fp8_scale_sweep).
std::vector<float> lsq_initial_amax(const QuantizerSpec& spec, const float* w, std::int64_t rows, std::int64_t cols, std::span<const float> amax);
// True for the quantizers LSQ trains: integer elements in static blocks, and NVFP4.
bool supports_learned_scales(const QuantizerSpec& spec);
// NVFP4's learned block scale, in the reference's f32 steps: s = amax / 6, raised to 2^-9 · global_amax / 6
// where it is not above that, then FP8-rounded under the global scale (global_amax / 6 / 448 per unit).
// `passes_gradient` (optional) says whether ds/damax is 1/6 (true) or 0 (the floor, or s above global_amax / 6).
float nvfp4_lsq_scale(float amax, float global_amax, bool* passes_gradient = nullptr);

// The element-level steps, exposed for tests and the exporters.
// Integer: clamp(rint(x * bound/amax), -bound-1, bound) / (bound/amax); 0 when amax is below 2^-24.
float fake_quant_int(float x, float amax, int bits);
// Q4_0's grid: with d = q4_0_step(extreme), clamp(rint(x / d), -8, 7) * d; 0 when d is 0.
float fake_quant_q4_0(float x, float extreme);
// Q4_0's block scale for a block whose value of largest magnitude is `extreme`: f16(extreme / -8),
// as the block stores it (negative for a positive extreme). Throws when it overflows f16.
float q4_0_step(float extreme);
// An integer element (INT8, or INT4 on either grid) at the block's amax: fake_quant_int or fake_quant_q4_0.
float fake_quant_integer(const QuantizerSpec& spec, float x, float amax);
// FP8: e4m3(clamp(x * s, ±448)) * (1 / s) with s = (1 / amax) * 448 (the reference's eager
// path; its CUDA kernel divides 448 / amax, which may differ in the last bit); amax below 2^-24 counts as 1.
float fake_quant_e4m3(float x, float amax);
// The NVFP4 block scale for a block whose amax is `block_amax` under global amax `global_amax`.
float nvfp4_block_scale(float block_amax, float global_amax);
// out[i] = nvfp4_block_scale(block_amax[i], global_amax) for i < n (out may be block_amax).
void nvfp4_block_scales(const float* block_amax, std::int64_t n, float global_amax, float* out);
// MX: the power-of-two exponent e with 2^e >= block_amax / element_max (ceil of log2), or 0 for a zero block.
int mx_exponent(float block_amax, Element element);
// E2M1 round to nearest even with saturation at 6, on a magnitude (NaN gives 6). On the grid
// {0, .5, 1, 1.5, 2, 3, 4, 6} ties at .25, 1.25, 2.5, 5 go down and at .75, 1.75, 3.5 go up; the
// value is a sum of steps with no branch, so that loops over it vectorize (activations are
// rounded to FP4 in every forward pass of an NVFP4 or MXFP4 model).
inline float round_e2m1_magnitude(float a) {
  const auto step = [](bool b) { return static_cast<float>(b); };
  return 0.5f * (step(a > 0.25f) + step(a >= 0.75f) + step(a > 1.25f) + step(a >= 1.75f)) + step(a > 2.5f) + step(a >= 3.5f) +
         2.0f * step(a > 5.0f) + 6.0f * step(a != a);
}

// q with the sign of x as the quantizers give it: -q where x is negative or NaN, q elsewhere (x = -0
// included); branch-free, like round_e2m1_magnitude.
inline float with_sign_of(float x, float q) { return q * (1.0f - 2.0f * static_cast<float>(!(x >= 0.0f))); }

// Per-row amax of x (dynamic per-token FP8).
void row_amax(const float* x, std::int64_t rows, std::int64_t cols, float* out);

}  // namespace mopt::quant
