#include "algo/sparsity.h"

#include <algorithm>
#include <cmath>

#include "algo/gptq.h"
#include "core/error.h"

namespace mopt::algo {

namespace {

void check_shape(std::int64_t out, std::int64_t in) {
  if (out <= 0 || in <= 0 || in % 4 != 0) fail("2:4 sparsity needs a weight with a multiple of 4 input columns (got [{}, {}])", out, in);
}

// The two positions (0..3) to keep of a group of 4 scores: the two largest, ties to the lower position.
std::pair<int, int> keep_two(const double score[4]) {
  int a = 0;
  for (int i = 1; i < 4; ++i) {
    if (score[i] > score[a]) a = i;
  }
  int b = a == 0 ? 1 : 0;
  for (int i = 0; i < 4; ++i) {
    if (i != a && score[i] > score[b]) b = i;
  }
  return {std::min(a, b), std::max(a, b)};
}

}  // namespace

SparseAlgo parse_sparse_algo(const std::string& name) {
  if (name == "magnitude") return SparseAlgo::magnitude;
  if (name == "sparsegpt") return SparseAlgo::sparsegpt;
  if (name == "sparsegpt-mask") return SparseAlgo::sparsegpt_mask;
  fail("unknown sparsity algorithm '{}' (known: magnitude, sparsegpt, sparsegpt-mask)", name);
}

const char* sparse_algo_name(SparseAlgo algo) {
  switch (algo) {
    case SparseAlgo::magnitude: return "magnitude";
    case SparseAlgo::sparsegpt: return "sparsegpt";
    case SparseAlgo::sparsegpt_mask: return "sparsegpt-mask";
  }
  return "?";
}

bool sparse_algo_needs_calibration(SparseAlgo algo) { return algo != SparseAlgo::magnitude; }

bool sparsity_eligible(SparseAlgo algo, std::int64_t out, std::int64_t in) {
  if (out <= 0 || in <= 0) return false;
  if (algo == SparseAlgo::magnitude) return out % 8 == 0 && in % 16 == 0;
  return out % 4 == 0 && in % 4 == 0;
}

std::vector<std::uint8_t> magnitude_24_mask(const float* w, std::int64_t out, std::int64_t in) {
  check_shape(out, in);
  // The reference scores the six patterns in this order by the f32 sum of the two kept |w| and takes
  // the first maximal one (tests/data/sparsity/README.md).
  static constexpr int kPatterns[6][2] = {{1, 3}, {0, 1}, {1, 2}, {0, 2}, {0, 3}, {2, 3}};
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(out * in), 0);
  for (std::int64_t i = 0; i < out * in; i += 4) {
    const float a[4] = {std::fabs(w[i]), std::fabs(w[i + 1]), std::fabs(w[i + 2]), std::fabs(w[i + 3])};
    int best = 0;
    float best_sum = a[kPatterns[0][0]] + a[kPatterns[0][1]];
    for (int p = 1; p < 6; ++p) {
      const float sum = a[kPatterns[p][0]] + a[kPatterns[p][1]];
      if (sum > best_sum) {
        best_sum = sum;
        best = p;
      }
    }
    mask[static_cast<std::size_t>(i + kPatterns[best][0])] = mask[static_cast<std::size_t>(i + kPatterns[best][1])] = 1;
  }
  return mask;
}

void apply_mask(float* w, const std::uint8_t* mask, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    if (mask[i] == 0) w[i] = 0.0f;
  }
}

bool is_24_sparse(const float* w, std::int64_t out, std::int64_t in) {
  if (out <= 0 || in <= 0 || in % 4 != 0) return false;
  for (std::int64_t i = 0; i < out * in; i += 4) {
    const int nonzero = (w[i] != 0.0f) + (w[i + 1] != 0.0f) + (w[i + 2] != 0.0f) + (w[i + 3] != 0.0f);
    if (nonzero > 2) return false;
  }
  return true;
}

bool is_24_mask(const std::uint8_t* mask, std::int64_t out, std::int64_t in) {
  if (out <= 0 || in <= 0 || in % 4 != 0) return false;
  for (std::int64_t i = 0; i < out * in; i += 4) {
    const int kept = (mask[i] != 0) + (mask[i + 1] != 0) + (mask[i + 2] != 0) + (mask[i + 3] != 0);
    if (kept > 2) return false;
  }
  return true;
}

SparseGptResult sparsegpt_prune(float* w, std::int64_t out, std::int64_t in, std::vector<double> h, const SparseGptOptions& options) {
  check_shape(out, in);
  if (static_cast<std::int64_t>(h.size()) != in * in) fail("SparseGPT: a Hessian of {} values for {} input columns", h.size(), in);
  if (options.block <= 0 || options.block % 4 != 0) fail("SparseGPT: the block ({}) must be a positive multiple of 4", options.block);
  if (!(options.damp > 0.0) || !std::isfinite(options.damp)) fail("SparseGPT: damping {} is not a positive number", options.damp);
  for (const double v : h) {
    if (!std::isfinite(v)) fail("SparseGPT: the Hessian holds a non-finite value");
  }
  SparseGptResult result;
  std::vector<double> orig(static_cast<std::size_t>(out * in));
  for (std::int64_t i = 0; i < out * in; ++i) orig[i] = w[i];

  // Dead inputs (never non-zero in the calibration data): their diagonal becomes 1, their weights 0.
  std::vector<double> wd = orig;
  for (std::int64_t c = 0; c < in; ++c) {
    if (h[c * in + c] != 0.0) continue;
    h[c * in + c] = 1.0;
    for (std::int64_t r = 0; r < out; ++r) wd[r * in + c] = 0.0;
  }
  // An indefinite Hessian gives the identity: magnitude order, no update.
  DampedInverse inv = damped_inverse_cholesky(h, in, options.damp);
  const std::vector<double>& u = inv.u;
  result.damp_retries = inv.retries;
  result.fell_back = inv.fell_back;

  result.mask.assign(static_cast<std::size_t>(out * in), 1);
  // At the first column of each group, its mask from the weights as they are now.
  const auto choose_group = [&](std::int64_t i) {
    if (i % 4 != 0) return;
    double inv_d2[4];
    for (int t = 0; t < 4; ++t) {
      const double dc = u[(i + t) * in + (i + t)];
      inv_d2[t] = 1.0 / (dc * dc + 1e-9);
    }
    for (std::int64_t r = 0; r < out; ++r) {
      const double* row = wd.data() + r * in + i;
      const double score[4] = {row[0] * row[0] * inv_d2[0], row[1] * row[1] * inv_d2[1], row[2] * row[2] * inv_d2[2],
                               row[3] * row[3] * inv_d2[3]};  // w² / (U_cc² + 1e-9), as the reference scores
      const auto [a, b] = keep_two(score);
      for (int t = 0; t < 4; ++t) result.mask[static_cast<std::size_t>(r * in + i + t)] = (t == a || t == b) ? 1 : 0;
    }
  };
  obs_sweep(wd, out, in, u, options.block, choose_group,
            [&](std::int64_t r, std::int64_t i, double x) { return result.mask[static_cast<std::size_t>(r * in + i)] ? x : 0.0; });

  // The reference's mask is "the updated weight is not zero": a kept weight of a dead input (zeroed
  // above) counts as pruned there, so the mask-only mode does the same.
  if (!options.update_weights) {
    for (std::int64_t i = 0; i < out * in; ++i) {
      if (wd[i] == 0.0) result.mask[static_cast<std::size_t>(i)] = 0;
    }
  }
  // The result, and the error of both masks under H.
  const std::vector<std::uint8_t> magnitude = magnitude_24_mask(w, out, in);
  std::vector<double> d(static_cast<std::size_t>(out * in)), dm(static_cast<std::size_t>(out * in));
  for (std::int64_t i = 0; i < out * in; ++i) {
    const double kept = options.update_weights ? wd[i] : (result.mask[i] ? orig[i] : 0.0);
    w[i] = static_cast<float>(kept);
    if (!result.mask[i]) w[i] = 0.0f;
    d[i] = static_cast<double>(w[i]) - orig[i];
    dm[i] = (magnitude[i] ? orig[i] : 0.0) - orig[i];
  }
  const double base = weighted_norm(orig, out, in, h);
  result.error = base > 0.0 ? weighted_norm(d, out, in, h) / base : 0.0;
  result.error_magnitude = base > 0.0 ? weighted_norm(dm, out, in, h) / base : 0.0;
  return result;
}

}  // namespace mopt::algo
