// 2:4 structured sparsity of Linear weights: in every row of a [out, in] weight, each group of 4
// consecutive input columns keeps at most 2 non-zero values.
//
// - Magnitude (the reference's `sparse_magnitude`, ASP): each group keeps the pair of largest f32 sum
//   |w_a| + |w_b|, ties to the first of the patterns 0101, 1100, 0110, 1010, 1001, 0011 (1 = kept): the
//   reference's order (Python's set order of those tuples, fixed), so masks agree bit for bit. An
//   all-equal group keeps columns 1 and 3.
// - SparseGPT (Frantar & Alistarh 2023) on the Hessian 2/n·XᵀX of the Linear's calibration inputs, as
//   NVIDIA Model Optimizer runs it (MODELOPT.md §6): dead diagonal entries set to 1 with their weight
//   column zeroed, damping 0.1 × mean(diag H), U = the upper Cholesky factor of H⁻¹, columns in blocks
//   of 128; at each column j with j % 4 == 0 the two of columns j..j+3 with the smallest
//   w²/(U_cc² + 1e-9) (ties: the later column) (on the weights as the earlier columns' updates left them) are pruned, and every column's
//   error (w − q)/U_jj is spread over the later columns (OBS). `update_weights`: keep those updated
//   weights (the paper's algorithm); without it only the mask is kept and applied to the original
//   weights (the reference's mode: its searcher never writes the updated weights back).
//
// Differences from the reference, on purpose: H is summed and factored in f64 (the reference: f32), so
// a near-tie may fall the other way; a Cholesky failure is retried with ten times the damping (up to 4
// times) and reported, then falls back to the identity (magnitude order on the weights).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mopt::algo {

enum class SparseAlgo { magnitude, sparsegpt, sparsegpt_mask };

// "magnitude", "sparsegpt" (weights updated) or "sparsegpt-mask" (the reference's mask-only mode).
SparseAlgo parse_sparse_algo(const std::string& name);
const char* sparse_algo_name(SparseAlgo algo);
// True when the algorithm needs calibration inputs (SparseGPT's Hessian).
bool sparse_algo_needs_calibration(SparseAlgo algo);

// The reference's shape rules: magnitude out % 8 == 0 and in % 16 == 0; SparseGPT out % 4 == 0 and
// in % 4 == 0. Linears that fail them stay dense.
bool sparsity_eligible(SparseAlgo algo, std::int64_t out, std::int64_t in);

// 1 = kept, 0 = pruned; [out, in] row-major. in % 4 == 0 is required.
std::vector<std::uint8_t> magnitude_24_mask(const float* w, std::int64_t out, std::int64_t in);

// w[i] = 0 where mask[i] == 0.
void apply_mask(float* w, const std::uint8_t* mask, std::int64_t n);

// True when every group of 4 consecutive values in each row of w [out, in] holds at most 2 non-zeros
// (in % 4 == 0 required; false otherwise).
bool is_24_sparse(const float* w, std::int64_t out, std::int64_t in);
// The same for a mask (at most 2 ones per group of 4).
bool is_24_mask(const std::uint8_t* mask, std::int64_t out, std::int64_t in);

struct SparseGptOptions {
  double damp = 0.1;          // fraction of mean(diag H) added to the diagonal
  std::int64_t block = 128;   // columns per lazy-update block (a multiple of 4)
  bool update_weights = true; // false: the reference's mask-only mode
};

struct SparseGptResult {
  std::vector<std::uint8_t> mask;  // [out, in], 1 = kept
  int damp_retries = 0;
  bool fell_back = false;          // H stayed indefinite: the identity
  double error_magnitude = 0.0;    // tr(dW H dW^T) / tr(W H W^T) of the magnitude mask
  double error = 0.0;              // the same for the result
};

// Prunes w [out, in] to 2:4 in place (in % 4 == 0). `hessian` [in, in] (any positive scale: the result
// does not depend on it).
SparseGptResult sparsegpt_prune(float* w, std::int64_t out, std::int64_t in, std::vector<double> hessian, const SparseGptOptions& options);

}  // namespace mopt::algo
