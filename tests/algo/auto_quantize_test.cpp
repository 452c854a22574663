#include "algo/auto_quantize.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "core/error.h"
#include "eval/perplexity.h"
#include "export/hf_modelopt.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::algo {
namespace {

using testing::TempDir;

TEST(AutoQuantize, EffectiveBitsCountBlockScales) {
  EXPECT_EQ(effective_bits(quant::format_scheme("fp8")), 8.0);
  EXPECT_EQ(effective_bits(quant::format_scheme("int8")), 8.0);
  EXPECT_EQ(effective_bits(quant::format_scheme("int8_wo")), 8.0);
  EXPECT_EQ(effective_bits(quant::format_scheme("nvfp4")), 4.5);
  EXPECT_EQ(effective_bits(quant::format_scheme("nvfp4_awq")), 4.5);
  EXPECT_EQ(effective_bits(quant::format_scheme("mxfp4")), 4.25);
  EXPECT_EQ(effective_bits(quant::format_scheme("mxfp8")), 8.25);
  EXPECT_EQ(effective_bits(quant::format_scheme("int4_awq")), 4.125);
  EXPECT_EQ(effective_bits(quant::format_scheme("int4_rtn", 64)), 4.25);
  EXPECT_EQ(effective_bits(quant::format_scheme("fp8_block")), 8.0 + 32.0 / (128.0 * 128.0));
  EXPECT_EQ(effective_bits(quant::format_scheme("none")), 16.0);
}

TEST(AutoQuantize, GroupsCoverEveryDecoderLinearOnce) {
  model::Model m = model::Model::load(testing::tiny_kjv());
  std::int64_t all = 0;
  for (std::int64_t l = 0; l < m.num_layers(); ++l) {
    for (const auto k : model::kAllLinears) all += m.layer(l).linear(k).in_features() * m.layer(l).linear(k).out_features();
  }
  for (const bool whole : {false, true}) {
    const auto groups = linear_groups(m.config(), whole);
    ASSERT_EQ(groups.size(), static_cast<std::size_t>(m.num_layers() * (whole ? 2 : 4)));
    std::int64_t weights = 0;
    std::set<std::string> modules;
    for (const auto& g : groups) {
      weights += g.weights;
      std::int64_t own = 0;
      for (const auto k : g.kinds) own += m.layer(g.layer).linear(k).in_features() * m.layer(g.layer).linear(k).out_features();
      EXPECT_EQ(g.weights, own) << g.name;
      for (const auto& name : g.modules) EXPECT_TRUE(modules.insert(name).second) << name;
    }
    EXPECT_EQ(weights, all);
    EXPECT_EQ(modules.size(), static_cast<std::size_t>(m.num_layers() * 7));
    EXPECT_EQ(groups[0].name, whole ? "model.layers.0.self_attn.q_proj,k_proj,v_proj,o_proj" : "model.layers.0.self_attn.q_proj,k_proj,v_proj");
  }
  // Tensors a candidate changes go with the group that owns them.
  const auto split = linear_groups(m.config(), false), whole = linear_groups(m.config(), true);
  EXPECT_EQ(group_of_tensor(split, "model.layers.2.input_layernorm.weight"), 8u);
  EXPECT_EQ(group_of_tensor(split, "model.layers.2.self_attn.o_proj.weight"), 9u);
  EXPECT_EQ(group_of_tensor(split, "model.layers.2.post_attention_layernorm.weight"), 10u);
  EXPECT_EQ(group_of_tensor(split, "model.layers.2.mlp.up_proj.bias"), 10u);
  EXPECT_EQ(group_of_tensor(split, "model.layers.2.mlp.down_proj.weight"), 11u);
  EXPECT_EQ(group_of_tensor(whole, "model.layers.2.self_attn.v_proj.bias"), 4u);
  EXPECT_EQ(group_of_tensor(whole, "model.layers.2.mlp.up_proj.weight"), 5u);
  EXPECT_THROW(group_of_tensor(split, "model.norm.weight"), Error);
  EXPECT_THROW(group_of_tensor(split, "model.layers.9.mlp.up_proj.weight"), Error);
}

// Every assignment enumerated, scores made non-increasing in bits as the solver makes them.
double brute_force(const std::vector<LinearGroup>& groups, std::vector<std::vector<double>> scores, const std::vector<double>& bits, double budget) {
  std::vector<double> all_bits = bits;
  all_bits.push_back(16.0);
  std::int64_t weights = 0;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    scores[g].push_back(0.0);
    for (std::size_t c = 0; c < all_bits.size(); ++c) {
      for (std::size_t d = 0; d < all_bits.size(); ++d) {
        if (all_bits[d] < all_bits[c]) scores[g][c] = std::min(scores[g][c], scores[g][d]);
      }
    }
    weights += groups[g].weights;
  }
  double best = std::numeric_limits<double>::infinity();
  std::vector<std::size_t> choice(groups.size(), 0);
  while (true) {
    double s = 0.0, b = 0.0;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      s += scores[g][choice[g]];
      b += all_bits[choice[g]] * static_cast<double>(groups[g].weights);
    }
    if (b <= budget * static_cast<double>(weights) + 1e-9) best = std::min(best, s);
    std::size_t g = 0;
    while (g < groups.size() && ++choice[g] == all_bits.size()) choice[g++] = 0;
    if (g == groups.size()) break;
  }
  return best;
}

TEST(AutoQuantize, ChoiceUnderBudgetIsTheBestWithinIt) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> score(0.0, 1.0);
  std::uniform_int_distribution<int> size(1, 6);
  const std::vector<double> bits = {4.5, 8.0, 4.25};
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<LinearGroup> groups(static_cast<std::size_t>(1 + trial % 5));
    std::vector<std::vector<double>> scores;
    for (auto& g : groups) {
      g.weights = 1024 * size(rng);
      scores.push_back({score(rng), score(rng), score(rng)});
    }
    const double budget = 4.25 + 12.0 * score(rng);
    const MixedChoice c = choose_under_budget(groups, scores, bits, budget);
    EXPECT_NEAR(c.score, brute_force(groups, scores, bits, budget), 1e-12) << "trial " << trial;
    EXPECT_LE(c.effective_bits, budget + 1e-12);
  }
  // The ends: the cheapest everywhere at its own bits; nothing quantized at 16; below the cheapest, an error.
  std::vector<LinearGroup> groups(3);
  for (auto& g : groups) g.weights = 4096;
  const std::vector<std::vector<double>> scores(3, {0.2, 0.1, 0.3});
  const MixedChoice cheapest = choose_under_budget(groups, scores, bits, 4.25);
  for (const auto c : cheapest.choice) EXPECT_EQ(c, 2u);
  EXPECT_EQ(cheapest.effective_bits, 4.25);
  const MixedChoice all = choose_under_budget(groups, scores, bits, 16.0);
  for (const auto c : all.choice) EXPECT_EQ(c, 3u);
  EXPECT_EQ(all.score, 0.0);
  try {
    choose_under_budget(groups, scores, bits, 4.0);
    ADD_FAILURE() << "a budget below every candidate was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("below the cheapest candidate's 4.25 bits"), std::string::npos) << e.what();
  }
  EXPECT_THROW(choose_under_budget(groups, scores, bits, std::nan("")), Error);
  EXPECT_THROW(choose_under_budget(groups, {{0.1, 0.2}}, bits, 6.0), Error);
}

TEST(AutoQuantize, KlScoresSwapOneGroupAndPutItBack) {
  TempDir tmp;
  testing::quantize("fp8", "max", tmp.file("fp8"));
  testing::quantize("nvfp4", "max", tmp.file("nvfp4"));
  model::Model base = model::Model::load(testing::two_layer_tiny_kjv());
  model::Model same = model::Model::load(testing::two_layer_tiny_kjv());
  model::Model fp8 = exporter::load_model(tmp.file("fp8"));
  model::Model nvfp4 = exporter::load_model(tmp.file("nvfp4"));
  const auto groups = linear_groups(base.config(), false);
  const std::vector<std::vector<std::int32_t>> score_set(testing::calibration().sequences.begin(), testing::calibration().sequences.begin() + 2);

  const auto logits_of = [&](model::Model& m) {
    const model::SequenceSpan span{0, static_cast<std::int64_t>(score_set[0].size()), 0, 0};
    std::vector<float> logits;
    m.forward(score_set[0], std::span<const model::SequenceSpan>(&span, 1), nullptr, model::LogitsFor::all_rows, logits);
    return logits;
  };
  const std::vector<float> before = logits_of(base);
  std::int64_t passes = 0;
  const auto scores = kl_scores(base, {&same, &fp8, &nvfp4}, groups, score_set, [&](std::int64_t done, std::int64_t total) {
    EXPECT_EQ(done, ++passes);
    EXPECT_EQ(total, static_cast<std::int64_t>(score_set.size() * groups.size() * 3));
  });
  EXPECT_EQ(passes, static_cast<std::int64_t>(score_set.size() * groups.size() * 3));
  EXPECT_EQ(logits_of(base), before);  // every group put back
  ASSERT_EQ(scores.size(), groups.size());
  double fp8_total = 0.0, nvfp4_total = 0.0;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    EXPECT_LT(scores[g][0], 1e-12) << groups[g].name;  // the unquantized model's own Linears change nothing (rounding of the KL sum)
    EXPECT_GT(scores[g][1], 0.0) << groups[g].name;
    EXPECT_GT(scores[g][2], 0.0) << groups[g].name;
    fp8_total += scores[g][1];
    nvfp4_total += scores[g][2];
  }
  EXPECT_GT(nvfp4_total, 2.0 * fp8_total);  // 4.5 bits cost more than 8
  // One group's score is the KL of a model with that group alone quantized, measured independently.
  model::Model one = model::Model::load(testing::two_layer_tiny_kjv());
  for (const auto k : groups[3].kinds) one.mutable_layer(groups[3].layer).linear(k) = nvfp4.layer(groups[3].layer).linear(k);
  double kl = 0.0;
  std::int64_t rows = 0;
  for (const auto& seq : score_set) {
    const model::SequenceSpan span{0, static_cast<std::int64_t>(seq.size()), 0, 0};
    std::vector<float> a, b;
    base.forward(seq, std::span<const model::SequenceSpan>(&span, 1), nullptr, model::LogitsFor::all_rows, a);
    one.forward(seq, std::span<const model::SequenceSpan>(&span, 1), nullptr, model::LogitsFor::all_rows, b);
    const std::int64_t vocab = base.config().vocab_size;
    for (std::size_t r = 0; r < seq.size(); ++r) {
      std::vector<double> la, lb;
      eval::log_softmax(a.data() + r * static_cast<std::size_t>(vocab), vocab, la);
      eval::log_softmax(b.data() + r * static_cast<std::size_t>(vocab), vocab, lb);
      for (std::int64_t v = 0; v < vocab; ++v) kl += std::exp(la[static_cast<std::size_t>(v)]) * (la[static_cast<std::size_t>(v)] - lb[static_cast<std::size_t>(v)]);
      ++rows;
    }
  }
  EXPECT_NEAR(scores[3][2], kl / static_cast<double>(rows), 1e-6 * kl / static_cast<double>(rows) + 1e-12);
  // A candidate of another shape is refused.
  model::Model full = model::Model::load(testing::tiny_kjv());
  EXPECT_THROW(kl_scores(base, {&full}, groups, score_set), Error);
}

}  // namespace
}  // namespace mopt::algo
