// The format table: every preset one row, read back by the recipes and the modelopt reader; and a
// format defined only here, carried through quantize, export (modelopt, GGUF), load and eval.
#include "quant/formats.h"

#include <gtest/gtest.h>

#include <iterator>
#include <map>
#include <set>

#include "core/error.h"
#include "eval/perplexity.h"
#include "export/compressed_tensors.h"
#include "export/gguf_export.h"
#include "io/json_util.h"
#include "load/load_model.h"
#include "quant/recipe.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::quant {
namespace {

TEST(FormatTable, EveryPresetIsOneRowAndEveryQuantAlgoReadsBackToOne) {
  std::set<std::string> names;
  std::map<std::string, int> reader_rows;
  for (const auto& r : format_table()) {
    EXPECT_TRUE(names.insert(r.name).second) << r.name;
    const LinearScheme s = format_scheme(r.name);
    EXPECT_EQ(s.format, r.name);
    EXPECT_EQ(s.quant_algo, r.quant_algo);
    EXPECT_EQ(*s.weight, r.weight) << r.name;
    EXPECT_EQ(s.input, r.input) << r.name;
    EXPECT_EQ(s.default_algorithm, r.default_algorithm) << r.name;
    EXPECT_EQ(format_takes_group_size(r.name), r.group_size_option) << r.name;
    EXPECT_FALSE(r.gguf_type.empty()) << r.name;
    reader_rows[r.quant_algo] += r.reader_row ? 1 : 0;
  }
  EXPECT_EQ(names.size(), format_names().size());
  for (const auto& [algo, n] : reader_rows) {
    EXPECT_EQ(n, 1) << algo;
    ASSERT_NE(format_for_quant_algo(algo), nullptr) << algo;
    EXPECT_EQ(format_for_quant_algo(algo)->quant_algo, algo);
  }
  // Stored names are matched without case (the reference writes "fp8_pb_wo" and "mxfp4" in lower case).
  EXPECT_EQ(format_for_quant_algo("FP8_PB_WO")->name, "fp8_block");
  EXPECT_EQ(format_for_quant_algo("W4A16_AWQ")->name, "int4_rtn");
  EXPECT_EQ(format_for_quant_algo("NOT_A_FORMAT"), nullptr);
  EXPECT_EQ(find_format("int4_awq")->default_algorithm, "awq_lite");
  EXPECT_FALSE(find_format("fp8")->fused_groups_share_scales);
  EXPECT_TRUE(find_format("nvfp4_awq")->folds_scales_into_rows);
}

// The presets as the reference's configs define them, written out here rather than read from the table.
TEST(FormatTable, PresetsAreTheReferencesConfigs) {
  struct Expected {
    const char* name;
    const char* quant_algo;
    Element w;
    Scaling ws;
    std::int64_t block, block_rows;
    bool has_input;
    Element in;
    Scaling ins;
    const char* algorithm;
    const char* gguf;
  };
  using E = Element;
  using S = Scaling;
  const Expected expected[] = {
      {"fp8", "FP8", E::e4m3, S::per_tensor, 0, 0, true, E::e4m3, S::per_tensor, "max", "q8_0"},
      {"fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", E::e4m3, S::per_row, 0, 0, true, E::e4m3, S::per_token, "max", "q8_0"},
      {"fp8_block", "fp8_pb_wo", E::e4m3, S::block, 128, 128, false, E::e4m3, S::per_tensor, "max", "q8_0"},
      {"int8", "W8A8_SQ_PER_CHANNEL", E::int8, S::per_row, 0, 0, true, E::int8, S::per_tensor, "max", "q8_0"},
      {"int8_sq", "W8A8_SQ_PER_CHANNEL", E::int8, S::per_row, 0, 0, true, E::int8, S::per_tensor, "smoothquant", "q8_0"},
      {"int8_wo", "W8A16", E::int8, S::per_row, 0, 0, false, E::int8, S::per_tensor, "max", "q8_0"},
      {"int4_rtn", "W4A16_AWQ", E::int4, S::block, 128, 0, false, E::int8, S::per_tensor, "max", "q4_0"},
      {"int4_awq", "W4A16_AWQ", E::int4, S::block, 128, 0, false, E::int8, S::per_tensor, "awq_lite", "q4_0"},
      {"w4a8_awq", "W4A8_AWQ", E::int4, S::block, 128, 0, true, E::e4m3, S::per_tensor, "awq_lite", "q4_0"},
      {"nvfp4", "NVFP4", E::e2m1, S::nvfp4, 16, 0, true, E::e2m1, S::nvfp4, "max", "nvfp4"},
      {"nvfp4_awq", "NVFP4_AWQ", E::e2m1, S::nvfp4, 16, 0, true, E::e2m1, S::nvfp4, "awq_lite", "nvfp4"},
      {"mxfp8", "MXFP8", E::e4m3, S::mx, 32, 0, true, E::e4m3, S::mx, "max", "q8_0"},
      {"mxfp4", "mxfp4", E::e2m1, S::mx, 32, 0, true, E::e2m1, S::mx, "max", "mxfp4"},
  };
  ASSERT_EQ(format_table().size(), std::size(expected));
  for (const auto& e : expected) {
    SCOPED_TRACE(e.name);
    const LinearScheme s = format_scheme(e.name);
    EXPECT_EQ(s.quant_algo, e.quant_algo);
    EXPECT_EQ(s.weight->element, e.w);
    EXPECT_EQ(s.weight->scaling, e.ws);
    EXPECT_EQ(s.weight->block, e.block);
    EXPECT_EQ(s.weight->block_rows, e.block_rows);
    EXPECT_EQ(s.weight->fp8_second_stage, std::string(e.name) == "w4a8_awq");
    ASSERT_EQ(s.input.has_value(), e.has_input);
    if (e.has_input) {
      EXPECT_EQ(s.input->element, e.in);
      EXPECT_EQ(s.input->scaling, e.ins);
    }
    EXPECT_EQ(s.default_algorithm, e.algorithm);
    EXPECT_EQ(find_format(e.name)->gguf_type, e.gguf);
    EXPECT_EQ(format_takes_group_size(e.name), s.weight->element == E::int4);
  }
  // A group size replaces the INT4 block and is refused elsewhere; "none" quantizes nothing.
  EXPECT_EQ(format_scheme("int4_awq", 64).weight->block, 64);
  EXPECT_EQ(format_scheme("w4a8_awq", 32).weight->block, 32);
  EXPECT_THROW(format_scheme("fp8", 64), Error);
  const LinearScheme none = format_scheme("none");
  EXPECT_FALSE(none.quantized());
  EXPECT_EQ(none.default_algorithm, "max");
  EXPECT_THROW(format_scheme("none", 64), Error);
  EXPECT_THROW(format_scheme("fp9"), Error);
}

TEST(FormatTable, BadRowsAreRefusedByName) {
  FormatRow row = *find_format("fp8");
  try {
    add_format(row);
    FAIL() << "a second 'fp8' was added";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fp8' is already defined"), std::string::npos) << e.what();
  }
  row.name = "fp8_again";  // still the reader row of "FP8"
  try {
    add_format(row);
    FAIL() << "a second reader row for FP8 was added";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already reads back as format 'fp8'"), std::string::npos) << e.what();
  }
  row.quant_algo.clear();
  EXPECT_THROW(add_format(row), Error);
  row.quant_algo = "MOPT_FP8_AGAIN";
  row.name = "none";
  EXPECT_THROW(add_format(row), Error);
  row.name.clear();
  EXPECT_THROW(add_format(row), Error);
  EXPECT_EQ(find_format("fp8_again"), nullptr);
}

// FP8 weights in 64 x 64 tiles, weight-only: no preset, written under a quant_algo of its own.
TEST(FormatTable, AFormatDefinedHereGoesThroughQuantizeExportLoadAndEval) {
  if (find_format("fp8_tile64") == nullptr) {
    FormatRow row;
    row.name = "fp8_tile64";
    row.quant_algo = "MOPT_FP8_TILE64";
    row.reader_row = true;
    row.weight.element = Element::e4m3;
    row.weight.scaling = Scaling::block;
    row.weight.block = 64;
    row.weight.block_rows = 64;
    row.gguf_type = "q8_0";
    add_format(row);
  }
  testing::TempDir tmp;
  testing::quantize("fp8_tile64", "max", tmp.file("q"));
  const nlohmann::json hq = io::parse_json_unique_keys(io::read_text_file(tmp.file("q") + "/hf_quant_config.json"), "hf_quant_config.json");
  EXPECT_EQ(hq["quantization"]["quant_algo"], "MOPT_FP8_TILE64");
  EXPECT_EQ(load::checkpoint_format(tmp.file("q")), load::CheckpointFormat::modelopt);

  const std::vector<std::int32_t> tokens(testing::heldout().begin(), testing::heldout().begin() + 256);
  model::Model plain = load::load_model(testing::two_layer_tiny_kjv());
  model::Model kernels = load::load_model(tmp.file("q"), load::QuantizedRun::kernels);
  model::Model fake = load::load_model(tmp.file("q"), load::QuantizedRun::fake_quant);
  ASSERT_TRUE(kernels.layer(0).q.quantized);
  EXPECT_EQ(kernels.layer(0).q.describe().rfind("fp8", 0), 0u) << kernels.layer(0).q.describe();
  const double p_plain = eval::perplexity(plain, tokens, 128, 128).perplexity;
  const double p_fake = eval::perplexity(fake, tokens, 128, 128).perplexity;
  const double p_kernels = eval::perplexity(kernels, tokens, 128, 128).perplexity;
  EXPECT_NE(p_fake, p_plain);
  EXPECT_NEAR(p_fake / p_plain, 1.0, 0.02);
  EXPECT_NEAR(p_kernels / p_fake, 1.0, 0.005);

  // GGUF: requantized into the type its row names; compressed-tensors has no form for it and says so.
  const auto r = exporter::export_gguf(tmp.file("q"), tmp.file("q.gguf"), exporter::gguf_options_from_name(find_format("fp8_tile64")->gguf_type));
  EXPECT_EQ(r.requantized_linears, 14);
  model::Model gguf = load::load_model(tmp.file("q.gguf"));
  EXPECT_NEAR(eval::perplexity(gguf, tokens, 128, 128).perplexity / p_fake, 1.0, 0.02);
  EXPECT_THROW(exporter::export_compressed_tensors(tmp.file("q"), tmp.file("ct")), Error);
  EXPECT_FALSE(std::filesystem::exists(tmp.file("ct")));
}

// The KV-cache rows: the reference's kv_cache_quant_algo names read back to their row (exactly; an
// unknown one is nobody's), FP8 per tensor is what compressed-tensors and the E4M3 cache hold, NVFP4
// neither; an unknown name is refused naming the known ones.
TEST(KvSchemeTable, RowsReadBackAndUnknownNamesAreRefused) {
  ASSERT_EQ(kv_scheme_table().size(), 2u);
  for (const auto& r : kv_scheme_table()) {
    EXPECT_EQ(&kv_scheme(r.name), &r);
    EXPECT_EQ(kv_scheme_for_quant_algo(r.quant_algo), &r);
  }
  const KvScheme& fp8 = kv_scheme("fp8");
  EXPECT_EQ(fp8.quant_algo, "FP8");
  EXPECT_EQ(fp8.spec.element, Element::e4m3);
  EXPECT_EQ(fp8.spec.scaling, Scaling::per_tensor);
  EXPECT_TRUE(fp8.compressed_tensors);
  EXPECT_TRUE(fp8.e4m3_cache);
  const KvScheme& nvfp4 = kv_scheme("nvfp4");
  EXPECT_EQ(nvfp4.quant_algo, "NVFP4");
  EXPECT_EQ(nvfp4.spec.scaling, Scaling::nvfp4);
  EXPECT_EQ(nvfp4.spec.block, 16);
  EXPECT_FALSE(nvfp4.compressed_tensors);
  EXPECT_FALSE(nvfp4.e4m3_cache);
  EXPECT_EQ(kv_scheme_for_quant_algo("INT8"), nullptr);
  try {
    kv_scheme("int8");
    ADD_FAILURE() << "an unknown KV format was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "unknown KV-cache format 'int8' (known: fp8, nvfp4)");
  }
}

}  // namespace
}  // namespace mopt::quant
