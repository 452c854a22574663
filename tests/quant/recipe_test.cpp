#include <gtest/gtest.h>

#include <random>

#include "core/error.h"
#include "quant/calibrator.h"
#include "quant/recipe.h"

namespace mopt::quant {
namespace {

TEST(Recipe, GlobMatching) {
  EXPECT_TRUE(glob_match("*lm_head*", "lm_head"));
  EXPECT_TRUE(glob_match("*.mlp.down_proj", "model.layers.3.mlp.down_proj"));
  EXPECT_FALSE(glob_match("*.mlp.down_proj", "model.layers.3.mlp.up_proj"));
  EXPECT_TRUE(glob_match("model.layers.?.mlp.*", "model.layers.3.mlp.up_proj"));
  EXPECT_FALSE(glob_match("model.layers.?.mlp.*", "model.layers.13.mlp.up_proj"));
  EXPECT_TRUE(glob_match("*", ""));
  EXPECT_FALSE(glob_match("a", ""));
}

TEST(Recipe, PresetsFollowTheReference) {
  const auto fp8 = format_scheme("fp8");
  EXPECT_EQ(fp8.quant_algo, "FP8");
  EXPECT_EQ(fp8.weight->scaling, Scaling::per_tensor);
  EXPECT_EQ(fp8.input->element, Element::e4m3);
  const auto int4 = format_scheme("int4_awq");
  EXPECT_EQ(int4.quant_algo, "W4A16_AWQ");
  EXPECT_EQ(int4.weight->block, 128);
  EXPECT_FALSE(int4.input.has_value());
  EXPECT_EQ(int4.default_algorithm, "awq_lite");
  EXPECT_EQ(format_scheme("int4_rtn", 64).weight->block, 64);
  const auto nv = format_scheme("nvfp4");
  EXPECT_EQ(nv.weight->block, 16);
  EXPECT_EQ(nv.input->scaling, Scaling::nvfp4);
  EXPECT_TRUE(format_scheme("w4a8_awq").weight->fp8_second_stage);
  EXPECT_EQ(format_scheme("mxfp8").weight->block, 32);
  EXPECT_THROW(format_scheme("int3"), Error);
  EXPECT_THROW(format_scheme("fp8", 64), Error);  // group size is for INT4
  for (const auto& name : format_names()) EXPECT_EQ(format_scheme(name).format, name);
}

TEST(Recipe, ExclusionsAndOverrides) {
  Recipe r;
  r.format = "nvfp4";
  r.exclude = {"*.layers.0.*"};
  r.overrides = {{"*.mlp.down_proj", "fp8"}, {"*.layers.5.mlp.down_proj", "none"}};
  EXPECT_FALSE(r.scheme_for("lm_head").quantized());
  EXPECT_FALSE(r.scheme_for("model.layers.0.self_attn.q_proj").quantized());
  EXPECT_EQ(r.scheme_for("model.layers.1.self_attn.q_proj").format, "nvfp4");
  EXPECT_EQ(r.scheme_for("model.layers.1.mlp.down_proj").format, "fp8");
  EXPECT_FALSE(r.scheme_for("model.layers.5.mlp.down_proj").quantized());
}

TEST(Recipe, ParsesJsonAndRefusesUnknownKeys) {
  const Recipe r = parse_recipe(R"({"format": "int4_rtn", "group_size": 64, "kv_cache": "fp8", "calibrator": "percentile",
                                    "percentile": 99.9, "overrides": [{"pattern": "*down_proj", "format": "int8_wo"}],
                                    "calib_size": 16, "seq_len": 128, "seed": 7})",
                                "r.json");
  EXPECT_EQ(r.format, "int4_rtn");
  EXPECT_EQ(r.group_size, 64);
  EXPECT_EQ(*r.kv_cache, "fp8");
  EXPECT_EQ(r.calibrator, CalibMethod::percentile);
  EXPECT_EQ(r.overrides.size(), 1u);
  EXPECT_EQ(r.seed, 7u);
  try {
    parse_recipe(R"({"format": "fp8", "colour": "blue"})", "r.json");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("r.json: unknown key 'colour'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(parse_recipe(R"({"format": "fp8", "kv_cache": "int2"})", "r.json"), Error);
  EXPECT_THROW(parse_recipe(R"({"format": 3})", "r.json"), Error);
  EXPECT_THROW(parse_recipe(R"({"format": "int4_rtn", "group_size": 6.3e60})", "r.json"), Error);  // found by the fuzzer
  EXPECT_THROW(parse_recipe(R"({"format": "int4_rtn", "group_size": 64.5})", "r.json"), Error);
  EXPECT_THROW(parse_recipe(R"({"format": "int4_rtn", "seed": -1})", "r.json"), Error);
  EXPECT_THROW(parse_recipe(R"([1,2])", "r.json"), Error);
  EXPECT_THROW(parse_recipe(R"({"format": "fp8", "calibrator": "entropy"})", "r.json"), Error);  // FP8 activations
}

TEST(Recipe, AlgorithmsRunOnlyWhereTheyAreDefined) {
  Recipe r;
  r.format = "int4_awq";
  EXPECT_EQ(r.effective_algorithm(), "awq_lite");
  EXPECT_NO_THROW(r.validate());
  for (const char* a : {"max", "awq_lite", "awq_clip", "awq_full", "gptq", "awq_lite+gptq"}) {
    r.algorithm = a;
    EXPECT_NO_THROW(r.validate()) << a;
  }
  r.algorithm = "smoothquant";  // SmoothQuant is W8A8's
  EXPECT_THROW(r.validate(), Error);
  r.algorithm = "awq_fast";
  EXPECT_THROW(r.validate(), Error);
  r.format = "nvfp4";
  r.algorithm = "gptq";
  EXPECT_NO_THROW(r.validate());
  r.format = "mxfp4";  // power-of-two scales computed from the weight itself
  EXPECT_THROW(r.validate(), Error);
  r.format = "nvfp4";
  r.algorithm = "awq_clip";
  EXPECT_THROW(r.validate(), Error);
  r.algorithm = "awq_lite";
  EXPECT_NO_THROW(r.validate());
  r.format = "w4a8_awq";
  r.algorithm = "gptq";
  EXPECT_THROW(r.validate(), Error);
  r.format = "int8_sq";
  r.algorithm = "";
  EXPECT_EQ(r.effective_algorithm(), "smoothquant");
  EXPECT_NO_THROW(r.validate());
  r.algorithm = "gptq";
  EXPECT_NO_THROW(r.validate());
  // An override to a format the algorithm cannot run on is refused too.
  r.format = "int4_rtn";
  r.algorithm = "awq_clip";
  r.overrides.push_back({"*down_proj", "nvfp4"});
  EXPECT_THROW(r.validate(), Error);
}

// ---- Calibrators: the reference's test_calibrator.py behaviours ----

TEST(Calibrator, PercentileOfARange) {
  std::vector<float> x(100);
  for (int i = 0; i < 100; ++i) x[static_cast<std::size_t>(i)] = static_cast<float>(i);
  HistogramCalibrator h;
  h.collect(x.data(), 100);
  EXPECT_NEAR(h.percentile_amax(90.0), 89.0, 100.0 / 1024.0);
  EXPECT_THROW(h.percentile_amax(101.0), Error);
  EXPECT_THROW(h.percentile_amax(-1.0), Error);
}

TEST(Calibrator, EntropyDiscardsAnOutlier) {
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> x(10000);
  for (auto& v : x) v = u(rng);
  x[0] = 10.0f;
  HistogramCalibrator h;
  h.collect(x.data(), static_cast<std::int64_t>(x.size()));
  EXPECT_LT(h.entropy_amax(Element::int8), 1.1f);
}

TEST(Calibrator, MseChoosesRangeOverAnOutlier) {
  std::vector<float> x(256);
  for (int i = 0; i < 256; ++i) x[static_cast<std::size_t>(i)] = static_cast<float>(i);
  x[255] = 256.0f;  // 0..254 and an outlier
  HistogramCalibrator h;
  h.collect(x.data(), 256);
  const float amax = h.mse_amax(Element::int8);
  EXPECT_GT(amax, 200.0f);
  EXPECT_LE(amax, 256.0f);
}

TEST(Calibrator, HistogramGrowsWithTheSameBinWidth) {
  HistogramCalibrator h;
  const std::vector<float> a = {0.5f, 1.0f}, b = {2.0f, 0.25f, -3.0f};
  h.collect(a.data(), 2);
  const float width = h.edges()[1] - h.edges()[0];
  h.collect(b.data(), 3);
  EXPECT_FLOAT_EQ(h.edges()[1] - h.edges()[0], width);
  EXPECT_GE(h.edges().back(), 3.0f);
  double total = 0;
  for (double c : h.counts()) total += c;
  EXPECT_EQ(total, 5.0);
  EXPECT_THROW(h.collect(std::vector<float>{INFINITY}.data(), 1), Error);
}

TEST(Calibrator, TorchLinspaceEndpoints) {
  const auto v = torch_linspace(0.0f, 3.0f, 2049);
  EXPECT_EQ(v.front(), 0.0f);
  EXPECT_EQ(v.back(), 3.0f);
  EXPECT_EQ(v[1024], 1.5f);
}

}  // namespace
}  // namespace mopt::quant
