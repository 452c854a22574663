// The calibration algorithms one Linear at a time: SmoothQuant's and AWQ's
// scales against their definitions, AWQ-lite's Gram-matrix loss against the
// direct loss, AWQ-clip against a brute-force search, GPTQ against the
// reference's own GPTQ steps (tests/data/ptq/gptq.*) and its properties.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>

#include "algo/gptq.h"
#include "algo/smoothing.h"
#include "io/gguf.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "quant/fake_quant.h"
#include "quant/qtensor.h"
#include "support/random_values.h"
#include "support/temp_dir.h"

namespace mopt::algo {
namespace {

using quant::Element;
using quant::QuantizerSpec;
using quant::Scaling;

using testing::random_values;

// Activations with a few loud channels, as real ones have.
std::vector<float> activations(std::int64_t rows, std::int64_t cols, std::uint32_t seed) {
  std::vector<float> x = random_values(static_cast<std::size_t>(rows * cols), seed);
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t j = 0; j < cols / 16; ++j) x[r * cols + j] *= 10.0f;
  }
  return x;
}

QuantizerSpec int4_block(std::int64_t b) { return {Element::int4, Scaling::block, b, 0, false}; }

TEST(SmoothQuant, ScaleIsWeightOverActivationMaximaClampedAndDeadChannelsOne) {
  // W [2, 4]: column maxima 2, 0.5, 1, 4.
  const std::vector<float> w = {2.0f, -0.5f, 1.0f, 0.0f, -1.0f, 0.25f, 0.0f, -4.0f};
  const std::vector<float> a = {4.0f, 0.0f, 1e-6f, 8.0f};
  const auto s1 = smoothquant_scale(a, w.data(), 2, 4, 1.0f);
  EXPECT_FLOAT_EQ(s1[0], 0.25f);   // 1 / 4
  EXPECT_FLOAT_EQ(s1[1], 1.0f);    // dead channel
  EXPECT_FLOAT_EQ(s1[2], 1e4f);    // 1 / 1e-6 clamped
  EXPECT_FLOAT_EQ(s1[3], 0.125f);  // 1 / 8
  const auto s5 = smoothquant_scale(a, w.data(), 2, 4, 0.5f);
  EXPECT_FLOAT_EQ(s5[0], std::sqrt(2.0f) / 2.0f);
  EXPECT_FLOAT_EQ(s5[3], 2.0f / std::sqrt(8.0f));
  EXPECT_THROW(smoothquant_scale(std::vector<float>(3, 1.0f), w.data(), 2, 4, 1.0f), Error);
}

TEST(Awq, AlphasAndClipRatiosAreTheReferenceGrids) {
  const auto a = awq_alphas();
  ASSERT_EQ(a.size(), 11u);
  EXPECT_EQ(a[0], 0.0f);
  EXPECT_EQ(a[3], 0.3f);
  EXPECT_EQ(a[10], 1.0f);
  const auto r = awq_clip_ratios();
  ASSERT_EQ(r.size(), 11u);
  EXPECT_EQ(r[0], 0.5f);
  EXPECT_EQ(r[1], 0.55f);
  EXPECT_EQ(r[9], 0.95f);
  EXPECT_EQ(r[10], 1.0f);
}

TEST(Awq, WeightScaleIsTheMeanOverRowsOfBlockNormalizedMagnitudes) {
  // 2 rows, 4 columns, blocks of 2.
  const std::vector<float> w = {1.0f, -2.0f, 3.0f, 0.0f, -4.0f, 4.0f, 1.0f, 2.0f};
  const auto s = awq_weight_scale(w.data(), 2, 4, 2);
  EXPECT_FLOAT_EQ(s[0], (0.5f + 1.0f) / 2.0f);
  EXPECT_FLOAT_EQ(s[1], (1.0f + 1.0f) / 2.0f);
  EXPECT_FLOAT_EQ(s[2], (1.0f + 0.5f) / 2.0f);
  EXPECT_FLOAT_EQ(s[3], (0.0f + 1.0f) / 2.0f);
  const auto whole = awq_weight_scale(w.data(), 2, 4, 0);  // one block per row
  EXPECT_FLOAT_EQ(whole[0], (1.0f / 3.0f + 1.0f) / 2.0f);
}

TEST(Awq, ScaleIsNormalizedSoItsExtremesMultiplyToOne) {
  const std::vector<float> a = {1.0f, 4.0f, 0.25f, 2.0f}, w = {0.5f, 1.0f, 0.25f, 1.0f};
  for (const float alpha : awq_alphas()) {
    const auto s = awq_scale(a, w, alpha);
    float lo = s[0], hi = s[0];
    for (float v : s) lo = std::min(lo, v), hi = std::max(hi, v);
    EXPECT_NEAR(lo * hi, 1.0f, 1e-5f) << alpha;
  }
  // alpha 1: s proportional to a.
  const auto s = awq_scale(a, w, 1.0f);
  EXPECT_NEAR(s[1] / s[0], 4.0f, 1e-5f);
  // alpha 0: s proportional to 1 / w.
  const auto s0 = awq_scale(a, w, 0.0f);
  EXPECT_NEAR(s0[2] / s0[1], 4.0f, 1e-5f);
}

TEST(Awq, MeanAbsIsTheMeanOfBatchMeans) {
  MeanAbsAccumulator m;
  const std::vector<float> b1 = {1.0f, -2.0f, 3.0f, 4.0f};  // 2 rows x 2: means 2, 3
  const std::vector<float> b2 = {-6.0f, 0.0f};              // 1 row: 6, 0
  m.add(b1.data(), 2, 2);
  m.add(b2.data(), 1, 2);
  const auto v = m.mean();
  EXPECT_EQ(m.batches(), 2);
  EXPECT_FLOAT_EQ(v[0], 4.0f);
  EXPECT_FLOAT_EQ(v[1], 1.5f);
}

// The loss as the reference computes it: run the Linear on every batch for every alpha.
// Weights in ggml blocks: quantized with `importance` / s^2, the mean square of the scaled input.
std::vector<double> direct_awq_loss(const QuantizerSpec& spec, const std::vector<float>& w, std::int64_t out, std::int64_t in,
                                    const std::vector<std::vector<float>>& batches, const std::vector<float>& act_scale,
                                    const std::vector<float>& importance = {}) {
  const auto ws = awq_weight_scale(w.data(), out, in, spec.block);
  std::vector<double> loss;
  for (const float alpha : awq_alphas()) {
    const auto s = awq_scale(act_scale, ws, alpha);
    std::vector<float> wq(w.size());
    for (std::int64_t r = 0; r < out; ++r) {
      for (std::int64_t j = 0; j < in; ++j) wq[r * in + j] = w[r * in + j] * s[j];
    }
    if (spec.grid == quant::IntGrid::ggml) {
      std::vector<float> imp = importance;
      for (std::int64_t j = 0; j < in; ++j) imp[j] = imp[j] * (1.0f / s[j]) * (1.0f / s[j]);
      quant::fake_quantize_ggml(spec, wq.data(), out, in, imp, wq.data());
    } else {
      quant::fake_quantize(spec, wq.data(), out, in, quant::compute_amax(spec, wq.data(), out, in), wq.data());
    }
    double total = 0.0;
    for (const auto& x : batches) {
      const std::int64_t rows = static_cast<std::int64_t>(x.size()) / in;
      double sum = 0.0;
      for (std::int64_t t = 0; t < rows; ++t) {
        for (std::int64_t o = 0; o < out; ++o) {
          double y = 0.0, yq = 0.0;
          for (std::int64_t j = 0; j < in; ++j) {
            y += static_cast<double>(x[t * in + j]) * w[o * in + j];
            yq += static_cast<double>(x[t * in + j] * (1.0f / s[j])) * wq[o * in + j];
          }
          sum += (yq - y) * (yq - y);
        }
      }
      total += sum / static_cast<double>(rows * out);
    }
    loss.push_back(total);
  }
  return loss;
}

TEST(Awq, LiteSearchLossEqualsRunningTheLinearOnEveryBatch) {
  const std::int64_t out = 24, in = 64;
  const QuantizerSpec spec = int4_block(16);
  const std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 3, 0.05f);
  std::vector<std::vector<float>> batches = {activations(40, in, 4), activations(25, in, 5)};
  MeanAbsAccumulator m;
  GramAccumulator gram;
  for (const auto& x : batches) {
    const std::int64_t rows = static_cast<std::int64_t>(x.size()) / in;
    m.add(x.data(), rows, in);
    gram.add(x.data(), rows, in, 1.0 / static_cast<double>(rows));
  }
  const AwqLiteSearch search(spec, w.data(), out, in, m.mean(), gram.full(), DType::F32);
  const std::vector<double> want = direct_awq_loss(spec, w, out, in, batches, m.mean());
  ASSERT_EQ(search.losses().size(), want.size());
  std::size_t best = 0;
  for (std::size_t a = 0; a < want.size(); ++a) {
    EXPECT_NEAR(search.losses()[a], want[a], 1e-5 * want[a]) << a;
    if (want[a] < want[best]) best = a;
  }
  EXPECT_EQ(search.best_alpha(), awq_alphas()[best]);
  EXPECT_EQ(search.scale(0.5f), awq_scale(m.mean(), awq_weight_scale(w.data(), out, in, 16), 0.5f));
}

TEST(Awq, LiteSearchOnGgmlBlocksWeighsTheQuantizerByTheScaledInputsMeanSquare) {
  // Q4_K blocks with the importance of each input channel (mean x^2): for each alpha the quantizer
  // sees importance / s^2, the mean square of x / s; the loss is still the Linear's on every batch.
  const std::int64_t out = 8, in = 256;
  QuantizerSpec spec{Element::int4, Scaling::block, 256, 0, false};
  spec.grid = quant::IntGrid::ggml;
  spec.ggml_type = io::GgmlType::Q4_K;
  const std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 6, 0.05f);
  std::vector<std::vector<float>> batches = {activations(40, in, 7), activations(25, in, 8)};
  MeanAbsAccumulator m;
  GramAccumulator gram;
  std::vector<float> importance(static_cast<std::size_t>(in), 0.0f);
  std::int64_t tokens = 0;
  for (const auto& x : batches) {
    const std::int64_t rows = static_cast<std::int64_t>(x.size()) / in;
    m.add(x.data(), rows, in);
    gram.add(x.data(), rows, in, 1.0 / static_cast<double>(rows));
    for (std::int64_t t = 0; t < rows; ++t) {
      for (std::int64_t j = 0; j < in; ++j) importance[j] += x[t * in + j] * x[t * in + j];
    }
    tokens += rows;
  }
  for (float& v : importance) v /= static_cast<float>(tokens);
  const AwqLiteSearch search(spec, w.data(), out, in, m.mean(), gram.full(), DType::F32, importance);
  const AwqLiteSearch unweighted(spec, w.data(), out, in, m.mean(), gram.full(), DType::F32);
  const std::vector<double> want = direct_awq_loss(spec, w, out, in, batches, m.mean(), importance);
  ASSERT_EQ(search.losses().size(), want.size());
  std::size_t differ = 0;
  for (std::size_t a = 0; a < want.size(); ++a) {
    EXPECT_NEAR(search.losses()[a], want[a], 1e-5 * want[a]) << a;
    differ += search.losses()[a] != unweighted.losses()[a];
  }
  EXPECT_GT(differ, want.size() / 2);  // the importance changes what the quantizer chooses
  EXPECT_THROW(AwqLiteSearch(spec, w.data(), out, in, m.mean(), gram.full(), DType::F32, std::vector<float>(in - 1, 1.0f)), Error);
}

TEST(Awq, ClipSamplerKeepsEveryKthRowOfEachBatch) {
  ClipSampler s;
  std::vector<float> x(200 * 2);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i / 2);  // row index
  s.add(x.data(), 200, 2);  // step 200 / 64 = 3: rows 0, 3, ..., 198
  s.add(x.data(), 10, 2);   // step 1: all 10
  ASSERT_EQ(s.batch_rows().size(), 2u);
  EXPECT_EQ(s.batch_rows()[0], 67);
  EXPECT_EQ(s.batch_rows()[1], 10);
  EXPECT_EQ(s.rows()[2], 3.0f);
  EXPECT_EQ(s.rows()[66 * 2], 198.0f);
  EXPECT_EQ(s.cols(), 2);
}

TEST(Awq, ClipSearchPicksPerBlockTheRatioOfLeastPartialProductError) {
  const std::int64_t out = 6, in = 48, B = 16;
  const QuantizerSpec spec = int4_block(B);
  std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 11, 0.05f);
  w[5] = 0.6f;  // an outlier: clipping it pays off for its block
  ClipSampler samples;
  const std::vector<float> x1 = activations(130, in, 12), x2 = activations(70, in, 13);
  samples.add(x1.data(), 130, in);
  samples.add(x2.data(), 70, in);
  std::vector<float> scale(static_cast<std::size_t>(in));
  for (std::int64_t j = 0; j < in; ++j) scale[j] = 0.5f + static_cast<float>(j % 5) * 0.25f;
  const std::vector<float> got = awq_clip_search(spec, w.data(), out, in, samples, scale);
  const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
  ASSERT_EQ(got.size(), amax.size());
  // Brute force in f64.
  std::size_t clipped = 0;
  for (std::int64_t o = 0; o < out; ++o) {
    for (std::int64_t b = 0; b < in / B; ++b) {
      double best = std::numeric_limits<double>::infinity();
      float want = 0.0f;
      for (const float r : awq_clip_ratios()) {
        const float a = amax[o * (in / B) + b] * r;
        double loss = 0.0;
        std::int64_t t0 = 0;
        for (const std::int64_t n : samples.batch_rows()) {
          double s = 0.0;
          for (std::int64_t t = t0; t < t0 + n; ++t) {
            double d = 0.0;
            for (std::int64_t j = b * B; j < (b + 1) * B; ++j) {
              const float xv = samples.rows()[t * in + j] * scale[j];
              d += static_cast<double>(xv) * (quant::fake_quant_int(w[o * in + j], a, 4) - w[o * in + j]);
            }
            s += d * d;
          }
          loss += s / static_cast<double>(n);
          t0 += n;
        }
        if (loss < best * (1.0 - 1e-9)) best = loss, want = a;
      }
      EXPECT_EQ(got[o * (in / B) + b], want) << o << "," << b;
      clipped += want < amax[o * (in / B) + b];
    }
  }
  EXPECT_GT(clipped, 0u);  // the search is not a no-op on this data
  EXPECT_THROW(awq_clip_search({Element::e2m1, Scaling::nvfp4, 16, 0, false}, w.data(), out, in, samples, {}), Error);
}

TEST(Smoothing, RoundToDtypeRoundsToTheStorageType) {
  std::vector<float> v = {1.0f + 1.0f / 1024.0f, 3.14159f};
  round_to_dtype(DType::BF16, v);
  EXPECT_EQ(v[0], 1.0f);
  EXPECT_EQ(v[1], 3.140625f);
  std::vector<float> f = {3.14159f};
  round_to_dtype(DType::F32, f);
  EXPECT_EQ(f[0], 3.14159f);
}

TEST(Gptq, GramAndHessian) {
  const std::vector<float> x = {1.0f, 2.0f, 3.0f, -1.0f};  // 2 rows x 2
  GramAccumulator g;
  g.add(x.data(), 2, 2);
  g.add(x.data(), 1, 2, 0.5);
  const auto full = g.full();
  EXPECT_DOUBLE_EQ(full[0], 1 + 9 + 0.5);
  EXPECT_DOUBLE_EQ(full[1], 2 - 3 + 0.5 * 2);
  EXPECT_DOUBLE_EQ(full[2], full[1]);
  EXPECT_DOUBLE_EQ(full[3], 4 + 1 + 0.5 * 4);
  EXPECT_EQ(g.samples(), 3);
  const auto h = gptq_hessian(g);
  EXPECT_DOUBLE_EQ(h[0], full[0] * 2.0 / 3.0);
  EXPECT_TRUE(GramAccumulator().full().empty());
}

// The reference's GPTQ on fixed inputs (make_ptq_goldens.py, gptq_goldens): ours runs in f64 where it
// runs in f32, so the updated weights agree exactly at first and may drift apart column by column
// once one code flips at a rounding boundary.
TEST(Gptq, MatchesTheReferenceOnFixedInputs) {
  const auto gold = io::TensorStore::open_file(testing::data_path("ptq/gptq.safetensors"));
  const auto model = io::TensorStore::open_dir(std::string(MOPT_MODELS_DIR) + "/tiny-kjv");
  struct Case {
    const char* name;
    const char* weight;
    QuantizerSpec spec;
  } cases[] = {{"q_proj.int4_block64", "model.layers.0.self_attn.q_proj.weight", int4_block(64)},
               {"q_proj.int8_row", "model.layers.0.self_attn.q_proj.weight", {Element::int8, Scaling::per_row, 0, 0, false}},
               {"down_proj.int4_block64", "model.layers.0.mlp.down_proj.weight", int4_block(64)}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string p = std::string(c.name) + ".";
    std::vector<float> w = model.tensor(c.weight).to_f32();
    const std::int64_t out = model.tensor(c.weight).dim(0), in = model.tensor(c.weight).dim(1);
    const std::vector<float> x = gold.tensor(p + "x").to_f32();
    GramAccumulator g;
    for (int b = 0; b < 3; ++b) g.add(x.data() + b * 128 * in, 128, in);
    const std::vector<float> amax = gold.tensor(p + "amax").to_f32();
    EXPECT_EQ(amax, quant::compute_amax(c.spec, w.data(), out, in));
    const GptqResult r = gptq_quantize(c.spec, w.data(), out, in, amax, gptq_hessian(g), GptqOptions{});
    EXPECT_EQ(r.damp_retries, 0);
    EXPECT_FALSE(r.fell_back);
    EXPECT_LT(r.error_gptq, r.error_rtn);
    const Tensor codes = gold.tensor(p + "codes");
    const float bound = c.spec.element == Element::int4 ? 7.0f : 127.0f;
    std::size_t differ = 0, first_block_differ = 0;
    for (std::int64_t o = 0; o < out; ++o) {
      for (std::int64_t j = 0; j < in; ++j) {
        const float a = c.spec.scaling == Scaling::per_row ? amax[o] : amax[o * (in / 64) + j / 64];
        const int mine = static_cast<int>(std::nearbyint(w[o * in + j] * (bound / a)));
        const int want = codes.data<std::int8_t>()[o * in + j];
        differ += mine != want;
        if (j < 128) first_block_differ += mine != want;
      }
    }
    std::printf("%-24s codes differing %zu of %lld (first 128 columns: %zu); error vs H: rtn %.4g gptq %.4g\n", c.name, differ,
                static_cast<long long>(out * in), first_block_differ, r.error_rtn, r.error_gptq);
    EXPECT_LE(first_block_differ, static_cast<std::size_t>(out * 128) / 1000);
    EXPECT_LE(differ, static_cast<std::size_t>(out * in) / 100);
  }
}

TEST(Gptq, LowersTheHessianWeightedErrorAndKeepsTheGrid) {
  const std::int64_t out = 32, in = 96;
  for (const QuantizerSpec spec : {int4_block(32), QuantizerSpec{Element::int8, Scaling::per_row, 0, 0, false},
                                   QuantizerSpec{Element::e4m3, Scaling::per_tensor, 0, 0, false}}) {
    SCOPED_TRACE(spec.describe());
    for (const bool act_order : {false, true}) {
      std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 21, 0.05f);
      for (std::int64_t r = 0; r < out; ++r) w[r * in + 7] = 0.0f;  // a dead column
      const std::vector<float> x = activations(300, in, 22);
      GramAccumulator g;
      g.add(x.data(), 300, in);
      const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
      GptqOptions o;
      o.block = 32;
      o.act_order = act_order;
      const GptqResult r = gptq_quantize(spec, w.data(), out, in, amax, gptq_hessian(g), o);
      EXPECT_LT(r.error_gptq, 0.8 * r.error_rtn) << act_order;
      // Every value is on the quantizer's grid: fake quantization leaves it unchanged.
      std::vector<float> again(w.size());
      quant::fake_quantize(spec, w.data(), out, in, amax, again.data());
      EXPECT_EQ(again, w);
    }
  }
}

// Threads of the process now, from /proc.
std::int64_t process_threads() {
  std::int64_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/task")) ++n;
  return n;
}

// A GPTQ large enough that OpenBLAS, given threads, would split its products (640 columns: five
// blocks of the Cholesky factorization and of the Gram matrix's tiles, with a 1-column tail), under 1,
// 2 and 3 threads: the same bits, and no thread beyond the pool's (OpenBLAS runs single-threaded on each).
TEST(Gptq, SameBitsUnderEveryThreadCountOnThePoolAlone) {
  const int threads = compute_threads();
  const std::int64_t out = 192, in = 641;
  const QuantizerSpec spec{Element::int8, Scaling::per_row, 0, 0, false};
  const std::vector<float> w0 = random_values(static_cast<std::size_t>(out * in), 61, 0.05f);
  const std::vector<float> x = activations(700, in, 62);
  const std::vector<float> amax = quant::compute_amax(spec, w0.data(), out, in);
  std::vector<float> first;
  std::vector<double> first_h;
  for (const int t : {1, 2, 3}) {
    set_compute_threads(t);
    GramAccumulator g;
    g.add(x.data(), 300, in);
    g.add(x.data() + 300 * in, 400, in);
    const std::vector<double> h = gptq_hessian(g);
    std::vector<float> w = w0;
    const GptqResult r = gptq_quantize(spec, w.data(), out, in, amax, h, GptqOptions{});
    EXPECT_LT(r.error_gptq, r.error_rtn);
    if (first.empty()) {
      first = w;
      first_h = h;
    }
    EXPECT_EQ(h, first_h) << "Hessian under " << t << " threads";
    EXPECT_EQ(w, first) << "weights under " << t << " threads";
    EXPECT_LE(process_threads(), t) << "threads beside the pool's " << t;
  }
  set_compute_threads(threads);
}

TEST(Gptq, IndefiniteHessianIsRetriedWithMoreDampingThenFallsBackToRounding) {
  const std::int64_t out = 4, in = 8;
  std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 31, 0.1f);
  const std::vector<float> amax = quant::compute_amax(int4_block(8), w.data(), out, in);
  // A strongly indefinite "Hessian": damping can't rescue it.
  std::vector<double> h(static_cast<std::size_t>(in * in), 0.0);
  for (std::int64_t i = 0; i < in; ++i) h[i * in + i] = i == 0 ? -1e6 : 1.0;
  std::vector<float> rtn = w;
  quant::fake_quantize(int4_block(8), rtn.data(), out, in, amax, rtn.data());
  const GptqResult r = gptq_quantize(int4_block(8), w.data(), out, in, amax, h, GptqOptions{});
  EXPECT_EQ(r.damp_retries, 4);
  EXPECT_TRUE(r.fell_back);
  EXPECT_EQ(w, rtn);
  // A singular one (rank 1) is rescued by the first damping.
  std::vector<double> h1(static_cast<std::size_t>(in * in), 1.0);
  const GptqResult r1 = gptq_quantize(int4_block(8), w.data(), out, in, amax, h1, GptqOptions{});
  EXPECT_EQ(r1.damp_retries, 0);
  EXPECT_FALSE(r1.fell_back);
}

TEST(Gptq, Nvfp4OnBlockStepsFixedFromTheOriginalWeightExportsExactly) {
  const std::int64_t out = 16, in = 64;
  const QuantizerSpec spec{Element::e2m1, Scaling::nvfp4, 16, 0, false};
  std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 41, 0.05f);
  const std::vector<float> x = activations(200, in, 42);
  GramAccumulator g;
  g.add(x.data(), 200, in);
  const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
  const std::vector<float> blocks = quant::nvfp4_block_amax(spec, w.data(), out, in);
  const GptqResult r = gptq_quantize(spec, w.data(), out, in, amax, gptq_hessian(g), GptqOptions{}, blocks);
  EXPECT_LT(r.error_gptq, 0.8 * r.error_rtn);
  // Exported with the same block maxima, the codes stand for exactly the updated weight.
  const quant::QuantizedWeight q = quant::quantize_weight(spec, w.data(), out, in, amax, 0.0f, blocks);
  EXPECT_EQ(quant::dequantize_weight(spec, q, out, in), w);
}

TEST(Gptq, GgmlBlocksOnScalesFixedFromTheOriginalWeightExportExactly) {
  // Q4_K (256-value super-blocks, asymmetric) and Q6_K: llama.cpp's quantizer fixes the grid from the
  // weight before GPTQ; the result stored with those blocks stands for exactly the updated weight.
  const std::int64_t out = 16, in = 512;
  for (const io::GgmlType type : {io::GgmlType::Q4_K, io::GgmlType::Q6_K}) {
    QuantizerSpec spec{Element::int4, Scaling::block, 256, 0, false};
    spec.grid = quant::IntGrid::ggml;
    spec.ggml_type = type;
    SCOPED_TRACE(spec.describe());
    EXPECT_TRUE(gptq_supports(spec));
    std::vector<float> w = random_values(static_cast<std::size_t>(out * in), 43, 0.05f);
    const std::vector<float> original = w;
    const std::vector<float> x = activations(600, in, 44);
    GramAccumulator g;
    g.add(x.data(), 600, in);
    const std::vector<float> amax = quant::compute_amax(spec, w.data(), out, in);
    // The quantizer weighs columns by their inputs' mean square (X^T X / n's diagonal), as with an imatrix.
    const std::vector<double> h = gptq_hessian(g);
    std::vector<float> importance(static_cast<std::size_t>(in));
    for (std::int64_t j = 0; j < in; ++j) importance[j] = static_cast<float>(h[j * in + j] / 2.0);
    GptqOptions options;
    options.ggml_importance = importance;
    const GptqResult r = gptq_quantize(spec, w.data(), out, in, amax, h, options);
    EXPECT_LT(r.error_gptq, 0.9 * r.error_rtn);
    const quant::QuantizedWeight fixed = quant::quantize_weight(spec, original.data(), out, in, amax, 0.0f, {}, {importance, {}});
    const quant::QuantizedWeight plain = quant::quantize_weight(spec, original.data(), out, in, amax);
    EXPECT_NE(std::memcmp(plain.weight.data<std::uint8_t>(), fixed.weight.data<std::uint8_t>(), plain.weight.numel()), 0);
    ASSERT_EQ(r.ggml_grid_blocks.size(), fixed.weight.numel());
    EXPECT_EQ(std::memcmp(r.ggml_grid_blocks.data(), fixed.weight.data<std::uint8_t>(), r.ggml_grid_blocks.size()), 0);
    const quant::QuantizedWeight q = quant::quantize_weight(spec, w.data(), out, in, amax, 0.0f, {}, {{}, r.ggml_grid_blocks});
    EXPECT_EQ(quant::dequantize_weight(spec, q, out, in), w);
  }
}

TEST(Gptq, RefusesWhatItCannotQuantizeOnAFixedGrid) {
  EXPECT_FALSE(gptq_supports({Element::e2m1, Scaling::mx, 32, 0, false}));
  EXPECT_TRUE(gptq_supports({Element::e2m1, Scaling::nvfp4, 16, 0, false}));
  EXPECT_FALSE(gptq_supports({Element::int4, Scaling::block, 128, 0, true}));
  EXPECT_TRUE(gptq_supports(int4_block(128)));
  std::vector<float> w(16, 0.1f);
  EXPECT_THROW(gptq_quantize({Element::e2m1, Scaling::mx, 32, 0, false}, w.data(), 1, 16, {}, std::vector<double>(256, 0.0), {}), Error);
  EXPECT_THROW(gptq_quantize(int4_block(8), w.data(), 2, 8, std::vector<float>(2, 0.1f), std::vector<double>(10, 0.0), {}), Error);
}

}  // namespace
}  // namespace mopt::algo
