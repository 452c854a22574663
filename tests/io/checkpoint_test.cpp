#include "io/checkpoint.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "load/summary.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

json expected_fixtures() {
  std::ifstream in(testing::data_path("hf/expected.json"));
  return json::parse(in);
}

// Every checkpoint transformers wrote opens, holds exactly the tensors
// transformers stored, and has the parameter count transformers reports.
TEST(Checkpoint, MatchesWhatTransformersWrote) {
  const json expected = expected_fixtures();
  ASSERT_GE(expected.size(), 6u);
  for (const auto& [name, facts] : expected.items()) {
    if (name.front() == '_') continue;  // the generator's own notes
    SCOPED_TRACE(name);
    const Checkpoint ckpt = Checkpoint::open(testing::data_path("hf/" + name));
    EXPECT_EQ(ckpt.config().architecture, facts["architecture"]);
    EXPECT_EQ(ckpt.config().num_layers, facts["num_layers"]);
    EXPECT_EQ(ckpt.config().head_dim, facts["head_dim"]);
    EXPECT_EQ(parameter_count(ckpt.config()), facts["num_parameters"].get<std::uint64_t>());
    EXPECT_EQ(ckpt.tensors().size(), facts["tensors"].size());
    for (const auto& [tname, tfacts] : facts["tensors"].items()) {
      const auto* loc = ckpt.tensors().find(tname);
      ASSERT_NE(loc, nullptr) << tname;
      EXPECT_EQ(loc->entry->shape, tfacts["shape"].get<Shape>()) << tname;
      EXPECT_EQ(dtype_safetensors_name(loc->entry->dtype).value(), tfacts["dtype"].get<std::string>()) << tname;
    }
    EXPECT_EQ(load::summarize(testing::data_path("hf/" + name))["parameters"], facts["num_parameters"]);
    EXPECT_EQ(load::summarize(testing::data_path("hf/" + name))["total_bytes"], facts["total_bytes"]);
  }
}

TEST(Checkpoint, ShardedFixtureReadsThroughTheIndex) {
  const Checkpoint ckpt = Checkpoint::open(testing::data_path("hf/llama-sharded"));
  EXPECT_GT(ckpt.tensors().files().size(), 1u);
  EXPECT_EQ(ckpt.tensor("model.norm.weight").shape(), (Shape{64}));
}

// Copies a fixture into a scratch directory so a test can break it.
void copy_fixture(const std::string& name, const fs::path& to) {
  fs::copy(testing::data_path("hf/" + name), to, fs::copy_options::recursive);
}

std::string open_error(const std::string& dir) {
  try {
    Checkpoint::open(dir);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Checkpoint, MismatchesAreListedInOneError) {
  testing::TempDir tmp;
  const fs::path dir = tmp.path() / "m";
  copy_fixture("llama", dir);
  // Rewrite the weights: drop one tensor, add a stranger, reshape another.
  const auto store = TensorStore::open_dir(dir.string());
  std::vector<NamedTensor> tensors;
  for (const auto& loc : store.all()) {
    const std::string& n = loc.entry->name;
    if (n == "model.layers.1.mlp.up_proj.weight") continue;
    Tensor t = store.tensor(n).clone();
    if (n == "model.norm.weight") t = Tensor::zeros(DType::BF16, {65});
    tensors.push_back({n, t});
  }
  tensors.push_back({"model.layers.0.extra.weight", Tensor::zeros(DType::BF16, {2})});
  write_safetensors((dir / "model.safetensors").string(), tensors);
  const std::string msg = open_error(dir.string());
  EXPECT_NE(msg.find("missing 1 [model.layers.1.mlp.up_proj.weight]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unexpected 1 [model.layers.0.extra.weight]"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.norm.weight has shape [65], expected [64]"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

TEST(Checkpoint, BrokenIndexAndMissingFiles) {
  testing::TempDir tmp;
  const fs::path dir = tmp.path() / "m";
  copy_fixture("llama-sharded", dir);
  const fs::path index = dir / "model.safetensors.index.json";
  json j;
  {
    std::ifstream in(index);
    j = json::parse(in);
  }
  json escaped = j;
  escaped["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
  std::ofstream(index) << escaped.dump();
  EXPECT_NE(open_error(dir.string()).find("not a file in this directory"), std::string::npos);
  json wrong = j;
  // Point a tensor that lives in another shard at the first shard.
  const std::string first_shard = wrong["weight_map"]["model.embed_tokens.weight"];
  std::string moved;
  for (const auto& [name, shard] : wrong["weight_map"].items()) {
    if (shard != first_shard) moved = name;
  }
  ASSERT_FALSE(moved.empty()) << "the sharded fixture must have more than one shard";
  wrong["weight_map"][moved] = first_shard;
  std::ofstream(index) << wrong.dump();
  EXPECT_NE(open_error(dir.string()).find("not found there"), std::string::npos);
  json missing = j;
  missing["weight_map"].erase("model.norm.weight");
  std::ofstream(index) << missing.dump();
  EXPECT_NE(open_error(dir.string()).find("missing from the index"), std::string::npos);
  fs::remove(index);
  EXPECT_NE(open_error(dir.string()).find("no model.safetensors"), std::string::npos);
  EXPECT_NE(open_error((tmp.path() / "absent").string()).find("not a directory"), std::string::npos);
}

TEST(Checkpoint, TiedLmHeadAndOldRotaryBuffersAreAccepted) {
  testing::TempDir tmp;
  const fs::path dir = tmp.path() / "m";
  copy_fixture("qwen2", dir);
  const auto store = TensorStore::open_dir(dir.string());
  std::vector<NamedTensor> tensors;
  for (const auto& loc : store.all()) tensors.push_back({loc.entry->name, store.tensor(loc.entry->name).clone()});
  tensors.push_back({"lm_head.weight", store.tensor("model.embed_tokens.weight").clone()});
  tensors.push_back({"model.layers.0.self_attn.rotary_emb.inv_freq", Tensor::zeros(DType::F32, {8})});
  write_safetensors((dir / "model.safetensors").string(), tensors);
  EXPECT_NO_THROW(Checkpoint::open(dir.string()));
}

TEST(Summary, SingleFile) {
  const json s = load::summarize(testing::data_path("hf/llama/model.safetensors"));
  EXPECT_EQ(s["kind"], "file");
  EXPECT_GT(s["parameters"].get<std::uint64_t>(), 0u);
  EXPECT_EQ(s["bytes_by_dtype"].size(), 1u);
  EXPECT_THROW(load::summarize("/nonexistent/thing"), Error);
}

}  // namespace
}  // namespace mopt::io
