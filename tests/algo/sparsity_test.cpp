// 2:4 sparsity one Linear at a time: magnitude masks by definition, SparseGPT against its own
// unblocked twin (the lazy 128-column blocks are an exact rearrangement of the plain column sweep),
// its limits (identity Hessian = magnitude), dead inputs, bad input; GPTQ holding a mask; and against
// nvidia-modelopt's masks and a float64 implementation of the paper (tests/data/sparsity,
// tools/fixtures/make_sparsity_goldens.py).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "algo/gptq.h"
#include "algo/ptq.h"
#include "algo/sparsity.h"
#include "core/error.h"
#include "io/checkpoint.h"
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

TEST(Sparsity, MagnitudeKeepsTheTwoLargestOfEachGroupTiesAsTheReference) {
  const std::vector<float> w = {0.1f, -3.0f, 2.0f, 0.5f,   // keeps 1, 2
                                1.0f, 1.0f, 1.0f, 1.0f,    // all tied: the reference's first pattern, 0101
                                0.0f, 0.0f, -0.0f, 0.0f,   // zeros: 0101 too
                                -2.0f, 0.3f, 2.0f, 0.3f};  // keeps 0, 2
  const auto m = magnitude_24_mask(w.data(), 2, 8);
  const std::vector<std::uint8_t> want = {0, 1, 1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0};
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

// nvidia-modelopt 0.47 on three Linears (make_sparsity_goldens.py): its magnitude masks (also on ties)
// bit for bit; its SparseGPT masks from its own Hessians; the paper's algorithm in float64 within 1e-6.
TEST(SparsityGoldens, MatchTheReferenceOnEachLinear) {
  const auto gold = io::TensorStore::open_file(testing::data_path("sparsity/linear.safetensors"));
  for (const std::string c : {"basic", "multi_block", "dead_columns"}) {
    SCOPED_TRACE(c);
    const Tensor wt = gold.tensor(c + ".weight");
    const std::int64_t out = wt.dim(0), in = wt.dim(1);
    const std::vector<float> w0 = wt.to_f32();
    const auto bytes = [](const Tensor& t) {
      const auto* p = t.data<std::uint8_t>();
      return std::vector<std::uint8_t>(p, p + t.numel());
    };
    EXPECT_EQ(magnitude_24_mask(w0.data(), out, in), bytes(gold.tensor(c + ".mask_magnitude")));

    // The reference's Hessian (f32, 2/n_sequences · XᵀX) and ours from the same inputs agree up to the
    // count's convention (ours: 2/n_tokens) and f32 rounding.
    const Tensor xt = gold.tensor(c + ".input");
    const std::vector<float> x = xt.to_f32();
    const std::int64_t batches = xt.dim(0), seq = xt.dim(1);
    GramAccumulator g;
    for (std::int64_t b = 0; b < batches; ++b) g.add(x.data() + b * seq * in, seq, in);
    const std::vector<double> ours = gptq_hessian(g);
    const std::vector<float> ref_f = gold.tensor(c + ".hessian").to_f32();
    const std::vector<double> ref(ref_f.begin(), ref_f.end());
    double max_rel = 0.0, max_ref = 0.0;
    for (const double v : ref) max_ref = std::max(max_ref, std::fabs(v));
    for (std::size_t i = 0; i < ref.size(); ++i) max_rel = std::max(max_rel, std::fabs(ours[i] * static_cast<double>(seq) - ref[i]) / max_ref);
    EXPECT_LT(max_rel, 1e-5);

    for (const bool theirs : {true, false}) {  // on the reference's Hessian and on ours
      std::vector<float> w = w0;
      SparseGptOptions o;
      o.update_weights = false;
      const SparseGptResult r = sparsegpt_prune(w.data(), out, in, theirs ? ref : ours, o);
      EXPECT_EQ(r.mask, bytes(gold.tensor(c + ".mask_sparsegpt"))) << (theirs ? "reference H" : "our H");
    }
    std::vector<float> w = w0;
    const SparseGptResult r = sparsegpt_prune(w.data(), out, in, ref, SparseGptOptions{});
    const Tensor full = gold.tensor(c + ".weight_sparsegpt_full");
    const std::vector<float> want = full.to_f32();
    double max_diff = 0.0;
    for (std::int64_t i = 0; i < out * in; ++i) max_diff = std::max(max_diff, static_cast<double>(std::fabs(w[i] - want[i])));
    EXPECT_LT(max_diff, 1e-6);
    EXPECT_EQ(r.mask, bytes(gold.tensor(c + ".mask_sparsegpt")));
    std::printf("%-13s full SparseGPT vs the float64 paper implementation: max |dw| %.3g\n", c.c_str(), max_diff);
  }
  const Tensor ties = gold.tensor("ties.weight");
  const std::vector<float> tw = ties.to_f32();
  const auto* want = gold.tensor("ties.mask_magnitude").data<std::uint8_t>();
  EXPECT_EQ(magnitude_24_mask(tw.data(), ties.dim(0), ties.dim(1)),
            std::vector<std::uint8_t>(want, want + ties.numel()));
}

// mts.sparsify on tiny-kjv (its first 2 layers, calibrated on the PTQ goldens' 4 x 128 tokens): the
// pipeline's masks for those layers. Magnitude depends on the weights alone: identical. SparseGPT's
// Hessians come from our forward pass (f32 kernels, not PyTorch's), so a mask may differ where two
// scores are within rounding of each other: at most 1 in 10^4 kept/pruned decisions.
TEST(SparsityGoldens, PipelineMasksMatchMtsSparsify) {
  const io::Checkpoint ckpt = io::Checkpoint::open(std::string(MOPT_MODELS_DIR) + "/tiny-kjv");
  const auto ids = io::TensorStore::open_file(testing::data_path("ptq/export/calib_ids.safetensors"));
  const Tensor t = ids.tensor("calib_ids").to(DType::F64);
  CalibrationSet calib;
  for (std::int64_t s = 0; s < t.dim(0); ++s) {
    std::vector<std::int32_t> seq;
    for (std::int64_t i = 0; i < t.dim(1); ++i) seq.push_back(static_cast<std::int32_t>(t.data<double>()[s * t.dim(1) + i]));
    calib.sequences.push_back(std::move(seq));
  }
  for (const std::string mode : {"magnitude", "sparsegpt"}) {
    SCOPED_TRACE(mode);
    const auto gold = io::TensorStore::open_file(testing::data_path("sparsity/model_" + mode + ".safetensors"));
    quant::Recipe r;
    r.format = "none";
    r.sparsity = "2:4";
    r.sparse_algo = mode == "magnitude" ? "magnitude" : "sparsegpt-mask";
    std::int64_t compared = 0, differ = 0, linears = 0;
    quantize_checkpoint(ckpt, r, calib, {}, [&](quant::QuantizedLayer&& layer) {
      if (layer.index > 1) return;
      for (const auto& l : layer.linears) {
        ASSERT_FALSE(l.sparsity_mask.empty()) << l.name;
        const Tensor packed = gold.tensor(l.name + ".weight");
        const std::int64_t rows = packed.dim(0), bytes = packed.dim(1);
        ASSERT_EQ(static_cast<std::int64_t>(l.sparsity_mask.size()), rows * bytes * 8) << l.name;
        for (std::int64_t i = 0; i < rows * bytes * 8; ++i) {
          const int bit = (packed.data<std::uint8_t>()[i / 8] >> (i % 8)) & 1;
          differ += bit != l.sparsity_mask[static_cast<std::size_t>(i)];
          ++compared;
        }
        ++linears;
      }
    });
    EXPECT_EQ(linears, 14);
    std::printf("%-9s masks: %lld of %lld decisions differ from mts.sparsify\n", mode.c_str(), static_cast<long long>(differ),
                static_cast<long long>(compared));
    if (mode == "magnitude") EXPECT_EQ(differ, 0);
    else EXPECT_LE(differ, compared / 10000);
  }
}

}  // namespace
}  // namespace mopt::algo
