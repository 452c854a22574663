// A quantized lm_head (--quantize-lm-head): exported untied under modelopt's
// names, read back by the kernels and the definition alike, accepted by the
// engines' rules, and refused by the exports that keep a 16-bit head.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "eval/perplexity.h"
#include "export/compressed_tensors.h"
#include "export/conformance.h"
#include "export/gguf_export.h"
#include "export/hf_modelopt.h"
#include "load/load_model.h"
#include "io/json_util.h"
#include "quant/recipe.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::exporter {
namespace {

using load::load_model;
using load::QuantizedRun;

using testing::heldout;
using testing::quantize;
using testing::TempDir;

nlohmann::json read_json(const std::string& path) { return io::parse_json_unique_keys(io::read_text_file(path), path); }

TEST(Recipe, QuantizeLmHeadLiftsOnlyTheDefaultExclusionOfTheHead) {
  quant::Recipe r = quant::parse_recipe(R"({"format": "fp8"})", "r.json");
  EXPECT_FALSE(r.scheme_for("lm_head").quantized());
  r = quant::parse_recipe(R"({"format": "fp8", "quantize_lm_head": true, "overrides": [{"pattern": "lm_head", "format": "int8_wo"}]})", "r.json");
  EXPECT_EQ(r.scheme_for("lm_head").format, "int8_wo");
  EXPECT_FALSE(r.scheme_for("model.layers.0.mlp.router").quantized());
  // The algorithm runs on the head too: an override for it must suit the algorithm, as any other must.
  try {
    quant::parse_recipe(R"({"format": "int8_sq", "quantize_lm_head": true, "overrides": [{"pattern": "lm_head", "format": "int4_rtn"}]})", "r.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("override lm_head: smoothquant"), std::string::npos) << e.what();
  }
  EXPECT_THROW(quant::parse_recipe(R"({"format": "int8_sq", "overrides": [{"pattern": "*.down_proj", "format": "int4_rtn"}]})", "r.json"), Error);
  r.exclude = {"lm_head"};
  EXPECT_FALSE(r.scheme_for("lm_head").quantized());
  EXPECT_THROW(quant::parse_recipe(R"({"format": "fp8", "quantize_lm_head": 1})", "r.json"), Error);
}

TEST(QuantizedLmHead, ExportedUntiedAndRunByTheKernelsAsDefined) {
  struct Case {
    const char* format;
    const char* algorithm;
    bool tied;
  };
  const Case cases[] = {{"int4_rtn", "max", true},         {"int8_sq", "smoothquant", true}, {"fp8", "max", false},
                        {"nvfp4", "max", false},           {"int4_awq", "awq_full", true},  {"int4_awq", "gptq", false},
                        {"nvfp4_awq", "awq_lite+gptq", true}};
  const std::vector<std::int32_t> tokens(heldout().begin(), heldout().begin() + 256);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.format);
    TempDir tmp;
    const std::string with = tmp.file("head"), without = tmp.file("plain");
    const algo::PtqReport report = quantize(c.format, c.algorithm, with, false, std::nullopt, true, c.tied);
    quantize(c.format, c.algorithm, without, false, std::nullopt, false, c.tied);
    ASSERT_TRUE(report.head.has_value());
    EXPECT_GT(report.head->weight_error, 0.0);
    EXPECT_GT(report.head->output_error, 0.0);
    EXPECT_LT(report.head->output_error, 0.5);

    // Untied in the export (the engines would tie a tied head back to the 16-bit embeddings), not excluded.
    EXPECT_FALSE(read_json(with + "/config.json").at("tie_word_embeddings").get<bool>());
    EXPECT_EQ(read_json(without + "/config.json").at("tie_word_embeddings").get<bool>(), c.tied);
    const auto excluded = read_json(with + "/hf_quant_config.json").at("quantization").at("exclude_modules").get<std::vector<std::string>>();
    EXPECT_EQ(std::count(excluded.begin(), excluded.end(), "lm_head"), 0);
    const auto excluded_plain = read_json(without + "/hf_quant_config.json").at("quantization").at("exclude_modules").get<std::vector<std::string>>();
    EXPECT_EQ(std::count(excluded_plain.begin(), excluded_plain.end(), "lm_head"), 1);
    EXPECT_TRUE(check_engine_rules(with, Engine::trtllm).empty());
    if (std::string(c.format) == "fp8" || std::string(c.format) == "nvfp4") EXPECT_TRUE(check_engine_rules(with, Engine::vllm).empty());
    const io::TensorStore store = io::TensorStore::open_dir(with);
    EXPECT_TRUE(store.contains("lm_head.weight_scale"));
    EXPECT_NE(store.tensor("lm_head.weight").dtype(), DType::BF16);
    const std::string algorithm = c.algorithm;
    if (algorithm != "max") {
      // The algorithm ran on the head: its logits on the calibration rows are closer to the 16-bit head's
      // than round-to-nearest's.
      EXPECT_GT(report.head->output_error_rtn, 0.0);
      EXPECT_LT(report.head->output_error, report.head->output_error_rtn);
      EXPECT_EQ(report.head->alphas.size(), algorithm.find("awq") == 0 ? 1u : 0u);
    }
    if (algorithm != "max" && algorithm != "gptq") {
      // SmoothQuant's or AWQ's scale went into the final norm, which feeds only the head.
      const auto plain_norm = io::TensorStore::open_dir(without).tensor("model.norm.weight").to_f32();
      EXPECT_NE(store.tensor("model.norm.weight").to_f32(), plain_norm);
      EXPECT_FALSE(store.contains("lm_head.pre_quant_scale"));
    }

    model::Model kernels = load_model(with, QuantizedRun::kernels);
    model::Model fake = load_model(with, QuantizedRun::fake_quant);
    model::Model plain = load_model(without, QuantizedRun::kernels);
    ASSERT_TRUE(kernels.lm_head().quantized);
    ASSERT_FALSE(plain.lm_head().quantized);
    EXPECT_FALSE(kernels.head_is_embedding_table());
    EXPECT_EQ(plain.head_is_embedding_table(), c.tied);
    EXPECT_LT(kernels.resident_weight_bytes(), plain.resident_weight_bytes() + (c.tied ? kernels.embedding_bytes() : 0));
    const double definition = eval::perplexity(fake, tokens, 128, 128).perplexity;
    const double ppl = eval::perplexity(kernels, tokens, 128, 128).perplexity;
    const double ppl_plain = eval::perplexity(plain, tokens, 128, 128).perplexity;
    EXPECT_NEAR(ppl / definition, 1.0, 0.005) << ppl << " vs " << definition;
    // The head's quantization changes the result a little, not much.
    EXPECT_NE(ppl, ppl_plain);
    EXPECT_NEAR(ppl / ppl_plain, 1.0, 0.1) << ppl << " vs " << ppl_plain;
  }
}

TEST(QuantizedLmHead, RefusedWhereTheHeadStays16Bit) {
  TempDir tmp;
  // The pipeline without a head sink (the GGUF and compressed-tensors exports) says so before any work.
  quant::Recipe r;
  r.format = "fp8";
  r.quantize_lm_head = true;
  const io::Checkpoint ckpt = io::Checkpoint::open(testing::two_layer_tiny_kjv());
  try {
    algo::quantize_checkpoint(ckpt, r, testing::calibration(), {}, [](quant::QuantizedLayer&&) {});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lm_head"), std::string::npos) << e.what();
  }
  // Converting a quantized-head export names the head.
  quantize("fp8", "max", tmp.file("head"), false, std::nullopt, true);
  {
    // Such an export whose config.json ties the head back to the embeddings is refused by name.
    const std::string bad = tmp.file("tied-again");
    std::filesystem::copy(tmp.file("head"), bad, std::filesystem::copy_options::recursive);
    nlohmann::json config = read_json(bad + "/config.json");
    config["tie_word_embeddings"] = true;
    std::ofstream(bad + "/config.json") << config.dump(2);
    try {
      load_model(bad);
      FAIL() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("lm_head is stored quantized but config.json ties it"), std::string::npos) << e.what();
    }
  }
  for (const int target : {0, 1}) {
    try {
      if (target == 0) export_gguf(tmp.file("head"), tmp.file("out.gguf"), gguf_options_from_name("q8_0"));
      else export_compressed_tensors(tmp.file("head"), tmp.file("ct"));
      FAIL() << "no error from target " << target;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("lm_head"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(std::filesystem::exists(tmp.file(target == 0 ? "out.gguf" : "ct")));
  }
}

}  // namespace
}  // namespace mopt::exporter
