// 2:4 sparsity one Linear at a time: magnitude masks by definition, SparseGPT against its own
// unblocked twin (the lazy 128-column blocks are an exact rearrangement of the plain column sweep),
// its limits (identity Hessian = magnitude), dead inputs, bad input; GPTQ holding a mask; and against
// nvidia-modelopt's masks and a float64 implementation of the paper (tests/data/sparsity,
// tools/fixtures/make_sparsity_goldens.py).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "algo/gptq.h"
#include "algo/sparsity.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "quant/fake_quant.h"
#include "support/random_values.h"
#include "support/temp_dir.h"

namespace mopt::algo {
namespace {

using testing::random_values;

// Inputs with correlated columns of different scales, so the Hessian is far from the identity.
std::vector<double> correlated_hessian(std::int64_t rows, std::int64_t cols, std::uint32_t seed) {
  std::vector<float> x = random_values(static_cast<std::size_t>(rows * cols), seed);
  const std::vector<float> scale = random_values(static_cast<std::size_t>(cols), seed + 1);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 1; j < cols; ++j) x[r * cols + j] = 0.6f * x[r * cols + j - 1] + 0.8f * x[r * cols + j];
    for (std::int64_t j = 0; j < cols; ++j) x[r * cols + j] *= std::exp(scale[j]);
  }
  GramAccumulator g;
  g.add(x.data(), rows, cols);
  return gptq_hessian(g);
}

TEST(Sparsity, MagnitudeKeepsTheTwoLargestOfEachGroupTiesToTheLowerColumn) {
  const std::vector<float> w = {0.1f, -3.0f, 2.0f, 0.5f,   // keeps 1, 2
                                1.0f, 1.0f, 1.0f, 1.0f,    // all tied: keeps 0, 1
                                0.0f, 0.0f, -0.0f, 0.0f,   // zeros: keeps 0, 1
                                -2.0f, 0.3f, 2.0f, 0.3f};  // |-2| = |2|: keeps 0, 2
  const auto m = magnitude_24_mask(w.data(), 2, 8);
  const std::vector<std::uint8_t> want = {0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0};
  EXPECT_EQ(m, want);
  EXPECT_TRUE(is_24_mask(m.data(), 2, 8));
  const std::int64_t out = 16, in = 64;
  const std::vector<float> r = random_values(static_cast<std::size_t>(out * in), 3);
  const auto mr = magnitude_24_mask(r.data(), out, in);
  for (std::int64_t g = 0; g < out * in; g += 4) {
    int kept = 0;
    float smallest_kept = INFINITY, largest_pruned = 0.0f;
    for (int t = 0; t < 4; ++t) {
      kept += mr[g + t];
      if (mr[g + t]) smallest_kept = std::min(smallest_kept, std::fabs(r[g + t]));
      else largest_pruned = std::max(largest_pruned, std::fabs(r[g + t]));
    }
    EXPECT_EQ(kept, 2);
    EXPECT_GE(smallest_kept, largest_pruned);
  }
  std::vector<float> p = r;
  apply_mask(p.data(), mr.data(), out * in);
  EXPECT_TRUE(is_24_sparse(p.data(), out, in));
  EXPECT_FALSE(is_24_sparse(r.data(), out, in));
  EXPECT_THROW(magnitude_24_mask(r.data(), 1, 6), Error);
}

TEST(Sparsity, EligibleShapesAndNames) {
  EXPECT_TRUE(sparsity_eligible(SparseAlgo::magnitude, 8, 16));
  EXPECT_FALSE(sparsity_eligible(SparseAlgo::magnitude, 4, 16));
  EXPECT_FALSE(sparsity_eligible(SparseAlgo::magnitude, 8, 12));
  EXPECT_TRUE(sparsity_eligible(SparseAlgo::sparsegpt, 4, 12));
  EXPECT_FALSE(sparsity_eligible(SparseAlgo::sparsegpt_mask, 6, 12));
  EXPECT_FALSE(sparsity_eligible(SparseAlgo::sparsegpt, 4, 10));
  for (const auto a : {SparseAlgo::magnitude, SparseAlgo::sparsegpt, SparseAlgo::sparsegpt_mask}) EXPECT_EQ(parse_sparse_algo(sparse_algo_name(a)), a);
  EXPECT_FALSE(sparse_algo_needs_calibration(SparseAlgo::magnitude));
  EXPECT_TRUE(sparse_algo_needs_calibration(SparseAlgo::sparsegpt_mask));
  EXPECT_THROW(parse_sparse_algo("wanda"), Error);
}

TEST(SparseGpt, IdentityHessianIsTheMagnitudeMaskWithoutUpdates) {
  const std::int64_t out = 8, in = 32;
  const std::vector<float> w0 = random_values(static_cast<std::size_t>(out * in), 5);
  std::vector<double> h(static_cast<std::size_t>(in * in), 0.0);
  for (std::int64_t i = 0; i < in; ++i) h[i * in + i] = 3.0;
  std::vector<float> w = w0;
  const SparseGptResult r = sparsegpt_prune(w.data(), out, in, h, SparseGptOptions{});
  EXPECT_EQ(r.mask, magnitude_24_mask(w0.data(), out, in));
  for (std::int64_t i = 0; i < out * in; ++i) EXPECT_EQ(w[i], r.mask[i] ? w0[i] : 0.0f);
  EXPECT_NEAR(r.error, r.error_magnitude, 1e-12);
}

TEST(SparseGpt, LazyBlocksEqualThePlainColumnSweep) {
  // Blocks of 128 against one block covering every column: the same arithmetic regrouped.
  const std::int64_t out = 24, in = 384;
  const std::vector<float> w0 = random_values(static_cast<std::size_t>(out * in), 11, 0.05f);
  const std::vector<double> h = correlated_hessian(512, in, 12);
  std::vector<float> a = w0, b = w0;
  SparseGptOptions blocked, plain;
  plain.block = in;
  const SparseGptResult ra = sparsegpt_prune(a.data(), out, in, h, blocked);
  const SparseGptResult rb = sparsegpt_prune(b.data(), out, in, h, plain);
  EXPECT_EQ(ra.mask, rb.mask);
  double max_diff = 0.0;
  for (std::int64_t i = 0; i < out * in; ++i) max_diff = std::max(max_diff, static_cast<double>(std::fabs(a[i] - b[i])));
  EXPECT_LT(max_diff, 1e-6);
  EXPECT_TRUE(is_24_sparse(a.data(), out, in));
  EXPECT_TRUE(is_24_mask(ra.mask.data(), out, in));
  // The OBS update lowers the output error well below the magnitude mask's.
  EXPECT_LT(ra.error, 0.8 * ra.error_magnitude);
  std::printf("output error under H: magnitude %.4f, sparsegpt %.4f\n", ra.error_magnitude, ra.error);
}

TEST(SparseGpt, MaskOnlyKeepsTheOriginalWeights) {
  const std::int64_t out = 16, in = 128;
  const std::vector<float> w0 = random_values(static_cast<std::size_t>(out * in), 21);
  const std::vector<double> h = correlated_hessian(256, in, 22);
  std::vector<float> full = w0, mask_only = w0;
  SparseGptOptions o;
  const SparseGptResult rf = sparsegpt_prune(full.data(), out, in, h, o);
  o.update_weights = false;
  const SparseGptResult rm = sparsegpt_prune(mask_only.data(), out, in, h, o);
  EXPECT_EQ(rf.mask, rm.mask);
  std::int64_t changed = 0;
  for (std::int64_t i = 0; i < out * in; ++i) {
    EXPECT_EQ(mask_only[i], rm.mask[i] ? w0[i] : 0.0f);
    changed += rf.mask[i] && full[i] != w0[i];
  }
  EXPECT_GT(changed, out * in / 4);  // the full algorithm moved the kept weights
  EXPECT_LT(rf.error, rm.error);
}

TEST(SparseGpt, DeadInputsArePrunedFirst) {
  const std::int64_t out = 8, in = 16;
  const std::vector<float> w0 = random_values(static_cast<std::size_t>(out * in), 31);
  std::vector<double> h = correlated_hessian(64, in, 32);
  for (const std::int64_t dead : {1, 2, 3}) {  // three of the first group's four inputs are never seen
    for (std::int64_t i = 0; i < in; ++i) h[dead * in + i] = h[i * in + dead] = 0.0;
  }
  for (const bool update : {true, false}) {
    std::vector<float> w = w0;
    SparseGptOptions o;
    o.update_weights = update;
    const SparseGptResult r = sparsegpt_prune(w.data(), out, in, h, o);
    for (std::int64_t row = 0; row < out; ++row) {
      EXPECT_EQ(r.mask[row * in + 0], 1) << row;  // the live input is kept
      // One dead input is kept with a zeroed weight: the reference's mask (weight != 0) drops it.
      const int kept_dead = r.mask[row * in + 1] + r.mask[row * in + 2] + r.mask[row * in + 3];
      EXPECT_EQ(kept_dead, update ? 1 : 0) << row;
      for (std::int64_t c = 1; c < 4; ++c) EXPECT_EQ(w[row * in + c], 0.0f);
    }
  }
}

TEST(SparseGpt, RefusesBadInput) {
  std::vector<float> w(8 * 6, 1.0f);
  EXPECT_THROW(sparsegpt_prune(w.data(), 8, 6, std::vector<double>(36, 1.0), {}), Error);  // 6 columns
  std::vector<float> w2(8 * 8, 1.0f);
  EXPECT_THROW(sparsegpt_prune(w2.data(), 8, 8, std::vector<double>(10, 1.0), {}), Error);  // H size
  std::vector<double> h(64, 0.0);
  h[0] = NAN;
  EXPECT_THROW(sparsegpt_prune(w2.data(), 8, 8, h, {}), Error);
  SparseGptOptions o;
  o.block = 6;
  EXPECT_THROW(sparsegpt_prune(w2.data(), 8, 8, std::vector<double>(64, 0.0), o), Error);
}

TEST(SparseGpt, IndefiniteHessianIsRetriedThenFallsBack) {
  const std::int64_t out = 4, in = 8;
  std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 41);
  const std::vector<float> w0 = w;
  std::vector<double> h(static_cast<std::size_t>(in * in), 0.0);
  for (std::int64_t i = 0; i < in; ++i) h[i * in + i] = i == 3 ? -1e9 : 1.0;
  const SparseGptResult r = sparsegpt_prune(w.data(), out, in, h, {});
  EXPECT_TRUE(r.fell_back);
  EXPECT_EQ(r.damp_retries, 4);
  EXPECT_EQ(r.mask, magnitude_24_mask(w0.data(), out, in));
}

TEST(Gptq, HoldsASparsityMaskAtZero) {
  const std::int64_t out = 16, in = 128;
  const std::vector<float> w0 = random_values(static_cast<std::size_t>(out * in), 51, 0.05f);
  const std::vector<double> h = correlated_hessian(256, in, 52);
  const auto mask = magnitude_24_mask(w0.data(), out, in);
  std::vector<float> w = w0;
  apply_mask(w.data(), mask.data(), out * in);
  const quant::QuantizerSpec spec{quant::Element::int4, quant::Scaling::block, 64, 0, false};
  const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
  GptqOptions o;
  o.mask = mask.data();
  std::vector<float> g = w;
  const GptqResult r = gptq_quantize(spec, g.data(), out, in, amax, h, o);
  EXPECT_LT(r.error_gptq, r.error_rtn);
  for (std::int64_t i = 0; i < out * in; ++i) {
    if (!mask[i]) EXPECT_EQ(g[i], 0.0f) << i;
    const float a = amax[(i / in) * (in / 64) + (i % in) / 64];
    EXPECT_EQ(quant::fake_quant_int(g[i], a, 4), g[i]) << i;  // on the grid
  }
  // Without the mask GPTQ's updates fill the pruned positions in.
  std::vector<float> u = w;
  gptq_quantize(spec, u.data(), out, in, amax, h, GptqOptions{});
  EXPECT_FALSE(is_24_sparse(u.data(), out, in));
}

}  // namespace
}  // namespace mopt::algo
