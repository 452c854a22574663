// The calibration algorithms' numerics, one Linear at a time, as NVIDIA Model
// Optimizer computes them (../shared/reference/MODELOPT.md §4):
//   SmoothQuant  per-input-channel scales from activation and weight maxima;
//   AWQ-lite     a grid search over alpha for scales from mean |activation|
//                and mean normalized |weight|, on the Linear's output error
//                with the weight quantized;
//   AWQ-clip     a per-block search over clip ratios of the weight amax, on
//                the blocks' partial dot products with sampled inputs.
// The pipeline (ptq.cpp) feeds them the layer's calibration activations.
//
// Conventions follow the reference: a "pre-quantization scale" p multiplies
// the Linear's input (x * p) and the weight is divided by it (W / p per input
// column), so the product is unchanged until quantization.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/dtype.h"
#include "quant/spec.h"

namespace mopt::algo {

// SmoothQuant's pre-quantization scale: s_j = w_j^(1-alpha) / a_j^alpha with
// w_j = max_i |W_ij| and a_j the input channel's amax; channels with
// a_j <= 2^-31 get 1; clamped to [1e-4, 1e4].
std::vector<float> smoothquant_scale(std::span<const float> act_amax, const float* w, std::int64_t out, std::int64_t in,
                                     float alpha);

// awq_lite's alphas: torch.arange(0, 1.1, 0.1) in f32 (0, 0.1, ..., 1.0).
std::vector<float> awq_alphas();

// mean over rows of |W| / (amax of its block of `block` input columns + tiny); `block` 0: the whole row.
std::vector<float> awq_weight_scale(const float* w, std::int64_t out, std::int64_t in, std::int64_t block);

// s = clamp(a^alpha / (w^(1-alpha) + tiny), 1e-4, 1e4) / sqrt(max(s) * min(s)). The
// pre-quantization scale AWQ applies is 1 / s.
std::vector<float> awq_scale(std::span<const float> act_scale, std::span<const float> weight_scale, float alpha);

// Accumulates mean |x| per input column of each batch (the batches' means are averaged).
class MeanAbsAccumulator {
 public:
  void add(const float* x, std::int64_t rows, std::int64_t cols);
  std::vector<float> mean() const;  // over batches
  std::int64_t batches() const { return batches_; }

 private:
  std::vector<float> sum_;
  std::int64_t batches_ = 0;
};

// awq_lite's search for one Linear: for every alpha, the loss
//   sum over batches b of mean((x/s) Q(W s)^T - x W^T)^2
// with `weight_spec`'s quantizer (amax computed from W s, as the reference's
// uncalibrated quantizer does) and s rounded to `dtype` as the reference
// casts it. The reference runs the Linear on every batch for every alpha; the
// loss is a quadratic form in the weight error E = Q(W s) diag(1/s) - W, so
// it is computed here as tr(E G E^T) / out with G = sum_b X_b^T X_b / rows_b
// (exact in exact arithmetic, f64 here): one Gram matrix per input instead of
// eleven matrix products per batch. Weights in ggml blocks may take their
// input's `ggml_importance` (mean square per channel, quant::GgmlBlockInputs):
// for each candidate s the quantizer weighs column j by importance_j / s_j^2,
// the mean square of the input it then sees.
class AwqLiteSearch {
 public:
  AwqLiteSearch(const quant::QuantizerSpec& weight_spec, const float* w, std::int64_t out, std::int64_t in,
                std::span<const float> act_scale, const std::vector<double>& gram, DType dtype,
                std::span<const float> ggml_importance = {});
  // The first alpha of least loss, and the losses in awq_alphas() order.
  float best_alpha() const;
  const std::vector<double>& losses() const { return loss_; }
  std::vector<float> scale(float alpha) const;

 private:
  std::vector<float> alphas_;
  std::vector<float> act_scale_, weight_scale_;
  std::vector<double> loss_;
};

// awq_clip: the clip ratios tried, {0.5, 0.55, ..., 0.95, 1.0}.
std::vector<float> awq_clip_ratios();

// The inputs awq_clip looks at: of each batch of N rows, rows 0, k, 2k, ... with k = max(1, N / 64).
class ClipSampler {
 public:
  void add(const float* x, std::int64_t rows, std::int64_t cols);
  const std::vector<float>& rows() const { return rows_; }
  const std::vector<std::int64_t>& batch_rows() const { return batch_rows_; }
  std::int64_t cols() const { return cols_; }

 private:
  std::vector<float> rows_;
  std::vector<std::int64_t> batch_rows_;
  std::int64_t cols_ = 0;
};

// awq_clip for a block-quantized weight [out, in]: the amax per block
// ([out, ceil(in/block)], as compute_amax lays it out) that minimizes, per
// block, the summed per-batch mean over sampled inputs of the squared error
// of the block's partial dot product; `input_scale` (may be empty) multiplies
// the sampled inputs first (the pre-quantization scale AWQ-lite chose).
// Ratios are tried in awq_clip_ratios() order; a later one wins only if strictly better.
std::vector<float> awq_clip_search(const quant::QuantizerSpec& weight_spec, const float* w, std::int64_t out, std::int64_t in,
                                   const ClipSampler& inputs, std::span<const float> input_scale);

// Rounds values to `dtype` and back (the reference casts scales and weights to the model's dtype).
void round_to_dtype(DType dtype, std::span<float> values);

}  // namespace mopt::algo
