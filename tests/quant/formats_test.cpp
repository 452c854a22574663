// The format table: every preset one row, read back by the recipes and the modelopt reader; and a
// format defined only here, carried through quantize, export (modelopt, GGUF), load and eval.
#include "quant/formats.h"

#include <gtest/gtest.h>

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
  EXPECT_THROW(add_format(*find_format("fp8")), Error);  // a name already taken
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

}  // namespace
}  // namespace mopt::quant
