// The PTQ passes one at a time, on layer 0 of the two-layer tiny-kjv with random calibration inputs
// (a few loud channels, as real activations have). The whole pipeline's results are held to the
// reference elsewhere (ptq_test, the export fixtures); these check what each pass promises.
#include "algo/layer_passes.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/error.h"
#include "quant/fake_quant.h"
#include "support/tiny_kjv.h"

namespace mopt::algo {
namespace {

using model::LinearKind;

struct Fixture {
  io::Checkpoint checkpoint = io::Checkpoint::open(testing::two_layer_tiny_kjv());
  quant::Recipe recipe;
  PtqOptions options;

  PtqContext context() const { return make_ptq_context(checkpoint, recipe, options); }
};

// Random inputs of every Linear (and keys/values), 64 rows, channel 3 ten times louder.
void observe_random(const LayerState& s, LayerStats& stats) {
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0.0f, 1.0f);
  for (const auto kind : model::kAllLinears) {
    const std::int64_t in = s.fp.linear(kind).weight.dim(1), rows = 64;
    std::vector<float> x(static_cast<std::size_t>(rows * in));
    for (std::int64_t i = 0; i < rows * in; ++i) x[static_cast<std::size_t>(i)] = n(rng) * (i % in == 3 ? 10.0f : 1.0f);
    stats.linear_input(s.index, kind, x.data(), rows, in);
  }
  const std::int64_t kv_dim = s.fp.k.weight.dim(0);
  std::vector<float> k(static_cast<std::size_t>(16 * kv_dim)), v(k.size());
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = n(rng);
    v[i] = 0.5f * n(rng);
  }
  stats.key_value(s.index, k.data(), v.data(), 16, kv_dim);
}

// plan, observe, prune and start_work: the state the algorithm passes start from.
LayerState started(const PtqContext& ctx) {
  LayerState s = plan_layer(ctx, 0);
  s.stats = std::make_unique<LayerStats>(s.want_histogram, stats_needs(ctx, s));
  observe_random(s, *s.stats);
  prune(ctx, s);
  start_work(ctx, s);
  return s;
}

double relative_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

TEST(AlgorithmPasses, InTheOrderTheyRun) {
  using P = AlgorithmPass;
  EXPECT_TRUE(algorithm_passes("max").empty());
  EXPECT_EQ(algorithm_passes("awq_full"), (std::vector<P>{P::awq_lite, P::awq_clip}));
  EXPECT_EQ(algorithm_passes("awq_lite+gptq"), (std::vector<P>{P::awq_lite, P::gptq}));
  EXPECT_EQ(algorithm_passes("smoothquant"), (std::vector<P>{P::smoothquant}));
  EXPECT_THROW(algorithm_passes("awq_fast"), Error);
  // Every algorithm the recipes accept has its passes.
  for (const auto& name : quant::algorithm_names()) EXPECT_NO_THROW(algorithm_passes(name)) << name;
}

TEST(PlanLayer, SchemesSparsityAndTheSharedInputRule) {
  Fixture f;
  f.recipe.format = "fp8";
  f.recipe.overrides = {{"*.mlp.down_proj", "nvfp4"}};
  f.recipe.sparsity = "2:4";
  LayerState s = plan_layer(f.context(), 0);
  EXPECT_EQ(s.prefix, "model.layers.0.");
  EXPECT_EQ(s.schemes[kind_index(LinearKind::q)].format, "fp8");
  EXPECT_EQ(s.schemes[kind_index(LinearKind::down)].format, "nvfp4");
  for (const auto kind : model::kAllLinears) EXPECT_TRUE(s.sparse[kind_index(kind)]) << model::linear_name(kind);
  // k_proj alone in another format splits a fused q/k/v: refused, naming both.
  f.recipe.overrides = {{"*.k_proj", "nvfp4"}};
  try {
    plan_layer(f.context(), 0);
    FAIL() << "q_proj and k_proj in different formats were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("self_attn.q_proj and self_attn.k_proj share an input"), std::string::npos) << e.what();
  }
}

TEST(Prune, MagnitudeKeepsTwoOfEveryFour) {
  Fixture f;
  f.recipe.format = "none";
  f.recipe.sparsity = "2:4";
  const PtqContext ctx = f.context();
  LayerState s = started(ctx);
  EXPECT_EQ(s.report.sparse_linears, 7);
  EXPECT_GT(s.report.sparse_weight_error, 0.1);
  for (const auto kind : model::kAllLinears) {
    const std::vector<float>& w = s.pruned[kind_index(kind)];
    const std::vector<float> original = s.fp.linear(kind).weight.to_f32();
    ASSERT_EQ(w.size(), original.size());
    for (std::size_t g = 0; g < w.size(); g += 4) {
      int kept = 0;
      for (std::size_t t = g; t < g + 4; ++t) {
        if (w[t] != 0.0f) {
          ++kept;
          EXPECT_EQ(w[t], original[t]);
        }
      }
      ASSERT_LE(kept, 2) << model::linear_name(kind) << " group " << g / 4;
    }
    EXPECT_EQ(s.qw.linear(kind).weight.to_f32(), w);
  }
  // Unquantized and pruned: each weight goes to the output as replaced.
  EXPECT_EQ(s.ql.replaced.size(), 7u);
}

TEST(SmoothQuantPass, MovesTheScaleIntoTheInputAndKeepsTheProduct) {
  Fixture f;
  f.recipe.format = "int8_sq";
  f.recipe.algorithm = "smoothquant";
  const PtqContext ctx = f.context();
  LayerState s = started(ctx);
  const auto before = s.work;
  smoothquant_pass(ctx, s);
  for (const auto kind : model::kAllLinears) {
    const LinearWork& wk = s.work[kind_index(kind)];
    ASSERT_EQ(wk.pqs.size(), static_cast<std::size_t>(wk.in)) << model::linear_name(kind);
    // The loud channel's input is scaled down the most.
    EXPECT_LT(wk.pqs[3], *std::max_element(wk.pqs.begin(), wk.pqs.end())) << model::linear_name(kind);
    // W / s with the input times s: the same product, up to the model dtype's rounding.
    EXPECT_LT(relative_difference(effective_weight(wk.w, wk), before[kind_index(kind)].w), 1e-2) << model::linear_name(kind);
    ASSERT_EQ(wk.input_amax.size(), 1u);
    EXPECT_NE(wk.input_amax[0], before[kind_index(kind)].input_amax[0]);
  }
}

TEST(FoldScales, AwqFoldsOneScalePerInputIntoTheNorms) {
  Fixture f;
  f.recipe.format = "int4_awq";
  f.recipe.group_size = 64;
  f.recipe.algorithm = "awq_lite";
  const PtqContext ctx = f.context();
  LayerState s = started(ctx);
  awq_lite_pass(ctx, s);
  EXPECT_NE(s.work[kind_index(LinearKind::q)].pqs, s.work[kind_index(LinearKind::k)].pqs);  // each searched its own
  fold_scales(ctx, s);
  for (const auto& group : kInputGroups) {
    for (const auto kind : group) {
      const LinearWork& wk = s.work[kind_index(kind)];
      EXPECT_TRUE(wk.pqs.empty()) << model::linear_name(kind);
      EXPECT_EQ(wk.folded_scale, s.work[kind_index(group[0])].folded_scale) << model::linear_name(kind);
      EXPECT_FALSE(wk.folded_scale.empty()) << model::linear_name(kind);
    }
  }
  std::vector<std::string> replaced;
  for (const auto& [name, t] : s.ql.replaced) replaced.push_back(name);
  EXPECT_EQ(replaced, (std::vector<std::string>{"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}));
  // o_proj and down_proj keep their own scale (nothing before them to fold it into).
  EXPECT_FALSE(s.work[kind_index(LinearKind::o)].pqs.empty());
  EXPECT_FALSE(s.work[kind_index(LinearKind::down)].pqs.empty());
}

TEST(FoldScales, SmoothQuantKeepsOneSharedScaleUnlessTheTargetFolds) {
  for (const bool fold : {false, true}) {
    SCOPED_TRACE(fold ? "folding target" : "modelopt");
    Fixture f;
    f.recipe.format = "int8_sq";
    f.recipe.algorithm = "smoothquant";
    f.options.fold_pre_quant_scales = fold;
    const PtqContext ctx = f.context();
    LayerState s = started(ctx);
    smoothquant_pass(ctx, s);
    fold_scales(ctx, s);
    const LinearWork& q = s.work[kind_index(LinearKind::q)];
    const LinearWork& v = s.work[kind_index(LinearKind::v)];
    if (fold) {
      EXPECT_TRUE(q.pqs.empty());
      EXPECT_EQ(q.folded_scale, v.folded_scale);
      // Such a target holds no pre_quant_scale: down_proj's goes into up_proj's output rows; o_proj's
      // cannot go into v_proj's under GQA (8 query heads, 4 KV heads) and is dropped, o_proj unsmoothed.
      const LinearWork& down = s.work[kind_index(LinearKind::down)];
      EXPECT_TRUE(down.pqs.empty());
      EXPECT_FALSE(down.folded_scale.empty());
      EXPECT_EQ(s.work[kind_index(LinearKind::up)].row_scale, down.folded_scale);
      const LinearWork& o = s.work[kind_index(LinearKind::o)];
      EXPECT_TRUE(o.pqs.empty());
      EXPECT_TRUE(o.folded_scale.empty());
      EXPECT_EQ(o.input_amax, s.input_amax_rtn[kind_index(LinearKind::o)]);
    } else {
      EXPECT_FALSE(q.pqs.empty());
      EXPECT_EQ(q.pqs, v.pqs);
      EXPECT_TRUE(s.ql.replaced.empty());
    }
  }
}

TEST(Quantize, CodesScalesAndTheLayerTheModelComputes) {
  Fixture f;
  f.recipe.format = "nvfp4";
  f.recipe.kv_cache = "fp8";
  const PtqContext ctx = f.context();
  LayerState s = started(ctx);
  fold_scales(ctx, s);
  weight_scales(s, s.work);
  // A fused group shares its per-tensor (global) weight amax.
  EXPECT_EQ(s.weight_amax[kind_index(LinearKind::q)], s.weight_amax[kind_index(LinearKind::v)]);
  quantize(ctx, s);
  ASSERT_EQ(s.ql.linears.size(), 7u);
  EXPECT_EQ(s.quantized_linears, 7);
  for (const auto& l : s.ql.linears) {
    ASSERT_TRUE(l.weight.has_value()) << l.name;
    EXPECT_GT(l.weight_error, 0.01) << l.name;
    EXPECT_LT(l.weight_error, 0.2) << l.name;
    EXPECT_EQ(l.input_amax.size(), 1u) << l.name;  // NVFP4's static global input amax
  }
  const std::vector<float> deq = s.qw.q.weight.to_f32();
  EXPECT_NE(deq, s.fp.q.weight.to_f32());
  EXPECT_TRUE(static_cast<bool>(s.qw.q.input_transform));
  EXPECT_TRUE(static_cast<bool>(s.qw.key_transform));
  EXPECT_GT(s.ql.key_amax, 0.0f);
  EXPECT_EQ(s.ql.key_amax, s.stats->key_max);
  EXPECT_EQ(s.report.formats, "nvfp4");
}

TEST(RunLayerPasses, RoundToNearestIsTheBeforeOfAnAlgorithm) {
  Fixture f;
  f.recipe.format = "int4_awq";
  f.recipe.group_size = 64;
  f.recipe.algorithm = "awq_full";
  const PtqContext ctx = f.context();
  LayerState s = plan_layer(ctx, 0);
  run_layer_passes(ctx, s, [](LayerState& st, LayerStats& stats) { observe_random(st, stats); });
  EXPECT_EQ(s.report.alphas.size(), 7u);
  ASSERT_EQ(s.ql.linears.size(), 7u);
  const model::LayerWeights rtn = round_to_nearest_layer(s);
  // The same weights quantized without the algorithm: different codes, the original norms.
  EXPECT_NE(rtn.q.weight.to_f32(), s.qw.q.weight.to_f32());
  EXPECT_EQ(rtn.input_norm.to_f32(), s.fp.input_norm.to_f32());
  EXPECT_NE(s.qw.input_norm.to_f32(), s.fp.input_norm.to_f32());
}

}  // namespace
}  // namespace mopt::algo
