// GPTQ (Frantar et al.) as NVIDIA Model Optimizer runs it (MODELOPT.md §4.5):
// the Hessian 2/n * X^T X of a Linear's calibration inputs, dead columns
// neutralized, damping 0.01 * mean(diag H), the upper Cholesky factor U of
// H^-1, then column by column in blocks of 128: quantize with the scales fixed
// beforehand (max calibration of the original weight), spread the error
// (w - q) / U_ii over the block's later columns and, after each block, over
// all later columns.
//
// Differences from the reference, on purpose: the Hessian is summed in f64
// (f32 partial sums per batch) and the factorization and the updates run in
// f64 (the reference uses f32); a Cholesky failure is retried with ten times
// the damping (up to 4 times) before falling back to plain rounding, and is
// reported; an optional activation order (columns by decreasing H_ii) exists,
// off by default like the reference's.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "quant/spec.h"

namespace mopt::algo {

// Sums w_b * X_b^T X_b over batches b of a Linear's inputs (f32 products per batch, summed in f64).
class GramAccumulator {
 public:
  void add(const float* x, std::int64_t rows, std::int64_t cols, double weight = 1.0);
  // The sum, full symmetric [cols, cols]; empty when nothing was added.
  std::vector<double> full(double factor = 1.0) const;
  std::int64_t samples() const { return samples_; }
  std::int64_t cols() const { return cols_; }

 private:
  std::vector<double> sum_;  // upper triangle, row-major
  std::vector<float> batch_;
  std::int64_t samples_ = 0, cols_ = 0;
};

// tr(D H D^T) for D [out, n] (f64) and symmetric H [n, n] (a Linear's output error under D).
double weighted_norm(const std::vector<double>& d, std::int64_t out, std::int64_t n, const std::vector<double>& h);

// The upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), row-major [n, n]; false when H + damp I
// is not positive definite (u is then unchanged).
bool inverse_cholesky_upper(std::vector<double> h, std::int64_t n, double damp, std::vector<double>& u);

// The U above for H damped by `damp_fraction` x mean(diag H); on a Cholesky failure retried with ten
// times the damping up to 4 times, then the identity (`fell_back`), as GPTQ and SparseGPT both take it.
struct DampedInverse {
  std::vector<double> u;
  int retries = 0;
  bool fell_back = false;
};
DampedInverse damped_inverse_cholesky(const std::vector<double>& h, std::int64_t n, double damp_fraction);

// The lazy-block OBS sweep of GPTQ and SparseGPT over wd [out, in] (f64, row-major) with U from
// damped_inverse_cholesky: column by column, in blocks of `block` columns, `before_column(i)` runs
// first (SparseGPT chooses a group's mask there, on the weights as the earlier columns left them),
// then each row's value x becomes q = target(r, i, x) and its error (x - q) / U_ii is spread over the
// block's later columns; after each block, over all later columns at once (one BLAS product).
void obs_sweep(std::vector<double>& wd, std::int64_t out, std::int64_t in, const std::vector<double>& u, std::int64_t block,
               const std::function<void(std::int64_t i)>& before_column,
               const std::function<double(std::int64_t r, std::int64_t i, double x)>& target);

// GPTQ's Hessian 2/n * X^T X from a Gram accumulated with unit weights.
std::vector<double> gptq_hessian(const GramAccumulator& gram);

struct GptqOptions {
  double damp = 0.01;        // fraction of mean(diag H) added to the diagonal
  std::int64_t block = 128;  // columns per lazy-update block
  bool act_order = false;    // columns by decreasing H_ii
  // [out, in] 2:4 mask (0 = pruned), or null: pruned weights are quantized to zero and their error is
  // spread like any other (SparseGPT's joint pruning and quantization with a fixed mask).
  const std::uint8_t* mask = nullptr;
  // Weights in ggml blocks: the importance their quantizer weighs values by (quant::GgmlBlockInputs).
  std::span<const float> ggml_importance;
};

struct GptqResult {
  int damp_retries = 0;      // times the damping was multiplied by 10
  bool fell_back = false;    // H stayed indefinite: plain rounding
  double error_rtn = 0.0;    // tr(dW H dW^T) / tr(W H W^T) of plain rounding
  double error_gptq = 0.0;   // the same after GPTQ
  // IntGrid::ggml: the blocks (llama.cpp's quantizer on the original w) whose scales fixed the grid;
  // quant::quantize_weight with them stores the result exactly.
  std::vector<std::byte> ggml_grid_blocks;
};

// Replaces w [out, in] by its GPTQ-quantized values (on the grid of `spec`
// with the static `amax`, as compute_amax laid it out for the original w).
// Supported: integer and FP8 per-tensor/per-row/block weights and NVFP4, whose
// block steps are fixed from `nvfp4_block_amax` (quant::nvfp4_block_amax of
// the original w, computed here when empty) with the export's arithmetic;
// export the result with the same block maxima; and weights in ggml blocks,
// whose grid is fixed by llama.cpp's blocks of the original w (returned in the
// result for the export). Throws for the others.
GptqResult gptq_quantize(const quant::QuantizerSpec& spec, float* w, std::int64_t out, std::int64_t in, std::span<const float> amax,
                         std::vector<double> hessian, const GptqOptions& options, std::span<const float> nvfp4_block_amax = {});

// True when gptq_quantize supports `spec`.
bool gptq_supports(const quant::QuantizerSpec& spec);

}  // namespace mopt::algo
