// load/: telling the checkpoint formats apart, opening each under its own tensor layout, and
// loading each into a model that computes what the plain loader computes for the same weights.
#include "load/load_model.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "eval/perplexity.h"
#include "export/compressed_tensors.h"
#include "export/gguf_export.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "load/compressed_tensors.h"
#include "load/modelopt.h"
#include "load/summary.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::load {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

// A copy of the two-layer model with `config_text` as its config.json.
std::string copy_with_config(const TempDir& tmp, const std::string& name, const std::string& config_text) {
  const std::string dir = tmp.file(name);
  fs::copy(testing::two_layer_tiny_kjv(), dir, fs::copy_options::recursive);
  fs::remove(dir + "/config.json");
  std::ofstream(dir + "/config.json") << config_text;
  return dir;
}

TEST(CheckpointFormat, TellsEveryFormatApart) {
  TempDir tmp;
  testing::quantize("int4_rtn", "max", tmp.file("modelopt"));
  exporter::export_compressed_tensors(tmp.file("modelopt"), tmp.file("ct"));
  exporter::export_gguf(testing::two_layer_tiny_kjv(), tmp.file("m.gguf"), {});
  EXPECT_EQ(checkpoint_format(testing::two_layer_tiny_kjv()), CheckpointFormat::plain);
  EXPECT_EQ(checkpoint_format(tmp.file("modelopt")), CheckpointFormat::modelopt);
  EXPECT_EQ(checkpoint_format(tmp.file("ct")), CheckpointFormat::compressed_tensors);
  EXPECT_EQ(checkpoint_format(tmp.file("m.gguf")), CheckpointFormat::gguf);
  EXPECT_EQ(checkpoint_format(tmp.file("nothing-here")), CheckpointFormat::plain);
  EXPECT_FALSE(is_quantized_checkpoint(testing::two_layer_tiny_kjv()));
  EXPECT_TRUE(is_quantized_checkpoint(tmp.file("modelopt")));
  EXPECT_TRUE(is_quantized_checkpoint(tmp.file("ct")));
  EXPECT_FALSE(is_quantized_checkpoint(tmp.file("m.gguf")));
  EXPECT_FALSE(quantized_reader(testing::two_layer_tiny_kjv()).has_value());
  EXPECT_TRUE(quantized_reader(tmp.file("modelopt")).has_value());
  EXPECT_EQ(config_quant_method(tmp.file("ct")), "compressed-tensors");
  EXPECT_EQ(config_quant_method(testing::two_layer_tiny_kjv()), "");
}

TEST(CheckpointFormat, AnUnreadableConfigIsLeftForOpeningToReport) {
  TempDir tmp;
  const std::string dir = copy_with_config(tmp, "bad", "{\"quantization_config\": ");
  EXPECT_EQ(config_quant_method(dir), "");
  EXPECT_EQ(checkpoint_format(dir), CheckpointFormat::plain);
  try {
    open_checkpoint(dir);
    FAIL() << "opened a checkpoint with a malformed config.json";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
  }
}

TEST(OpenCheckpoint, EachFormatUnderItsOwnLayout) {
  TempDir tmp;
  testing::quantize("int4_rtn", "max", tmp.file("modelopt"));
  exporter::export_compressed_tensors(tmp.file("modelopt"), tmp.file("ct"));
  // Under the plain layout neither validates: their Linears are codes, with tensors config.json does not name.
  EXPECT_THROW(io::Checkpoint::open(tmp.file("modelopt")), Error);
  EXPECT_THROW(io::Checkpoint::open(tmp.file("ct")), Error);
  // Each format's layout knows only its own names.
  EXPECT_THROW(io::Checkpoint::open(tmp.file("ct"), modelopt_layout()), Error);
  EXPECT_NO_THROW(io::Checkpoint::open(tmp.file("modelopt"), modelopt_layout()));
  EXPECT_NO_THROW(io::Checkpoint::open(tmp.file("ct"), compressed_tensors_layout()));
  EXPECT_EQ(open_checkpoint(tmp.file("ct")).config().num_layers, 2);
  EXPECT_TRUE(modelopt_layout().is_format_tensor("model.layers.0.mlp.up_proj.weight_scale"));
  EXPECT_FALSE(modelopt_layout().is_format_tensor("model.layers.0.mlp.up_proj.weight_packed"));
  EXPECT_TRUE(compressed_tensors_layout().is_format_tensor("model.layers.0.mlp.up_proj.weight_packed"));
  EXPECT_FALSE(compressed_tensors_layout().is_format_tensor("model.layers.0.mlp.up_proj.pre_quant_scale"));
}

TEST(LoadModel, ModeloptAndCompressedTensorsComputeTheSameModel) {
  TempDir tmp;
  testing::quantize("int4_rtn", "max", tmp.file("modelopt"));
  exporter::export_compressed_tensors(tmp.file("modelopt"), tmp.file("ct"));
  const std::vector<std::int32_t> tokens(testing::heldout().begin(), testing::heldout().begin() + 200);
  model::Model a = load_model(tmp.file("modelopt"), QuantizedRun::fake_quant);
  model::Model b = load_model(tmp.file("ct"), QuantizedRun::fake_quant);
  model::Model plain = load_model(testing::two_layer_tiny_kjv());
  const double pa = eval::perplexity(a, tokens, 128, 128).perplexity, pb = eval::perplexity(b, tokens, 128, 128).perplexity;
  EXPECT_EQ(pa, pb);
  EXPECT_NE(pa, eval::perplexity(plain, tokens, 128, 128).perplexity);
}

TEST(LoadModel, ALinearWithoutAWeightIsNamed) {
  // A layout that says a weight is stored elsewhere, with no reader to fill it in.
  io::TensorLayout layout;
  layout.reader_checks_linears = true;
  layout.stored_elsewhere = [](const io::TensorStore&, std::string_view weight) { return weight == "model.layers.1.mlp.down_proj.weight"; };
  TempDir tmp;
  const std::string dir = tmp.file("m");
  fs::create_directories(dir);
  fs::copy_file(testing::two_layer_tiny_kjv() + "/config.json", dir + "/config.json");
  const io::TensorStore store = io::TensorStore::open_dir(testing::two_layer_tiny_kjv());
  std::vector<io::NamedTensor> kept;
  for (const auto& loc : store.all()) {
    if (loc.entry->name != "model.layers.1.mlp.down_proj.weight") kept.push_back({loc.entry->name, store.tensor(loc.entry->name)});
  }
  io::write_safetensors(dir + "/model.safetensors", kept);
  model::LoadOptions options;
  options.layout = layout;
  try {
    model::Model::load(dir, options);
    FAIL() << "loaded a model with a missing weight";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.down_proj has no weight"), std::string::npos) << e.what();
  }
  EXPECT_THROW(model::Model::load(dir), Error);  // the plain layout lists it as missing
}

// A modelopt checkpoint describes its quantization in hf_quant_config.json or, without that file, in
// config.json's quantization_config (what vLLM reads): inspect and the reader see it either way.
TEST(ModeloptQuantization, FromEitherFile) {
  TempDir tmp;
  testing::quantize("int4_rtn", "max", tmp.file("modelopt"));  // groups of 64 (704 inputs)
  const std::string before = load_model(tmp.file("modelopt")).layer(1).down.describe();
  std::string label;
  EXPECT_EQ(modelopt_quantization(tmp.file("modelopt"), &label)["quant_algo"], "W4A16_AWQ");
  EXPECT_EQ(label, tmp.file("modelopt") + "/hf_quant_config.json");
  EXPECT_EQ(summarize(tmp.file("modelopt"))["quantization"]["quant_algo"], "W4A16_AWQ");
  fs::remove(tmp.file("modelopt/hf_quant_config.json"));
  EXPECT_EQ(modelopt_quantization(tmp.file("modelopt"), &label)["quant_algo"], "W4A16_AWQ");
  EXPECT_EQ(label, tmp.file("modelopt") + "/config.json");
  EXPECT_EQ(summarize(tmp.file("modelopt"))["quantization"]["quant_method"], "modelopt");
  EXPECT_EQ(summarize(tmp.file("modelopt"))["quantization"]["quant_algo"], "W4A16_AWQ");
  // config.json's form has no group_size for INT4 (as the reference writes it): the scales' shape gives it.
  EXPECT_EQ(load_model(tmp.file("modelopt")).layer(1).down.describe(), before);
  EXPECT_NE(before.find("g64"), std::string::npos) << before;
  // Neither: named.
  const std::string plain = copy_with_config(tmp, "plain", io::read_text_file(testing::two_layer_tiny_kjv() + "/config.json"));
  try {
    modelopt_quantization(plain);
    ADD_FAILURE() << "a checkpoint without a quantization config was read";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config.json: no \"quantization_config\" object"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace mopt::load
