// `mopt export --to gguf`: what it writes reads back through `mopt convert`
// (the GGUF -> Hugging Face path, itself checked against transformers' GGUF
// loader) as the same model, tokenizer included.
#include "export/gguf_export.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "core/error.h"
#include "eval/perplexity.h"
#include "export/hf_modelopt.h"
#include "io/checkpoint.h"
#include "io/gguf_convert.h"
#include "io/gguf_writer.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"
#include "model/llama.h"
#include "support/temp_dir.h"

namespace mopt::exporter {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string tiny_kjv() { return std::string(MOPT_MODELS_DIR) + "/tiny-kjv"; }

std::string sample_text() {
  return io::read_text_file(std::string(MOPT_SOURCE_DIR) + "/data/kjv-heldout.txt").substr(0, 3000) +
         " Ünïcödé, numbers 12345 and 3.14159, tabs\tand\nnew lines  ";
}

TEST(GgufExport, Bf16RoundTripsThroughConvertExactly) {
  testing::TempDir tmp;
  export_gguf(tiny_kjv(), tmp.file("m.gguf"), {});
  const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
  EXPECT_EQ(g.get_string("general.architecture"), "llama");
  EXPECT_EQ(g.get_string("tokenizer.ggml.pre"), "llama-bpe");
  EXPECT_EQ(g.find_tensor("blk.0.attn_q.weight")->type.type, io::GgmlType::BF16);
  EXPECT_EQ(g.find_tensor("blk.0.attn_norm.weight")->type.type, io::GgmlType::F32);
  io::convert_gguf_to_hf(tmp.file("m.gguf"), tmp.file("back"));
  const auto a = io::TensorStore::open_dir(tiny_kjv());
  const auto b = io::TensorStore::open_dir(tmp.file("back"));
  ASSERT_EQ(a.all().size(), b.all().size());
  for (const auto& loc : a.all()) {
    SCOPED_TRACE(loc.entry->name);
    ASSERT_TRUE(b.contains(loc.entry->name));
    EXPECT_EQ(a.tensor(loc.entry->name).to_f32(), b.tensor(loc.entry->name).to_f32());  // permuted and back
  }
  const io::ModelConfig ca = io::Checkpoint::open(tiny_kjv()).config(), cb = io::Checkpoint::open(tmp.file("back")).config();
  EXPECT_EQ(ca.hidden_size, cb.hidden_size);
  EXPECT_EQ(ca.num_heads, cb.num_heads);
  EXPECT_EQ(ca.num_kv_heads, cb.num_kv_heads);
  EXPECT_EQ(ca.num_layers, cb.num_layers);
  EXPECT_EQ(ca.vocab_size, cb.vocab_size);
  EXPECT_EQ(ca.rope_theta, cb.rope_theta);
  EXPECT_FLOAT_EQ(static_cast<float>(ca.rms_norm_eps), static_cast<float>(cb.rms_norm_eps));
  EXPECT_EQ(ca.tie_word_embeddings, cb.tie_word_embeddings);
  EXPECT_EQ(ca.bos_token_ids, cb.bos_token_ids);
  const io::Tokenizer ta = io::Tokenizer::load(tiny_kjv()), tb = io::Tokenizer::load(tmp.file("back"));
  EXPECT_EQ(ta.encode(sample_text(), true), tb.encode(sample_text(), true));
  EXPECT_THROW(export_gguf(tiny_kjv(), tmp.file("m.gguf"), {}), Error);  // exists
}

TEST(GgufExport, IntegerTypesHoldTheReferenceBlocksAndKeepThePerplexity) {
  testing::TempDir tmp;
  const auto base = model::Model::load(tiny_kjv());
  const std::vector<std::int32_t> text = base.require_tokenizer().encode(sample_text(), false);
  const double base_ppl = eval::perplexity(base, text, 256, 256).perplexity;
  // Perplexity for three of them (limit 0: blocks only, to keep the test short).
  for (const auto& [name, limit] : {std::pair{"q8_0", 1.005}, std::pair{"q6_k", 0.0}, std::pair{"q5_0", 0.0}, std::pair{"q4_k_m", 1.08},
                                     std::pair{"q4_k", 0.0}, std::pair{"q4_0", 1.15}}) {
    SCOPED_TRACE(name);
    const GgufExportOptions o = gguf_options_from_name(name);
    const std::string path = tmp.file(std::string(name) + ".gguf");
    export_gguf(tiny_kjv(), path, o);
    const io::GgufFile g = io::GgufFile::open(path);
    // v_proj is not permuted: its blocks are the quantizer's of the checkpoint's values.
    const std::vector<float> v = io::Checkpoint::open(tiny_kjv()).tensor("model.layers.2.self_attn.v_proj.weight").to_f32();
    const io::GgmlType v_type = g.find_tensor("blk.2.attn_v.weight")->type.type;
    EXPECT_EQ(v_type, o.q4_k_m ? io::GgmlType::Q6_K : o.type);  // Q4_K_M gives layer 2 of 6 more bits
    const std::vector<std::byte> want = io::ggml_quantize(v_type, v.data(), v.size());
    if (o.q4_k_m) {
      EXPECT_EQ(g.find_tensor("blk.1.attn_v.weight")->type.type, io::GgmlType::Q4_K);
      EXPECT_EQ(g.find_tensor("output.weight")->type.type, io::GgmlType::Q6_K);
      EXPECT_EQ(g.find_tensor("token_embd.weight")->type.type, io::GgmlType::Q4_K);
      EXPECT_EQ(g.find_tensor("blk.5.ffn_down.weight")->type.type, io::GgmlType::Q8_0);  // 704 inputs: Q6_K falls back
      EXPECT_EQ(g.find_tensor("blk.4.ffn_down.weight")->type.type, io::GgmlType::Q5_0);  // and Q4_K to Q5_0
      EXPECT_EQ(g.get_uint("general.file_type"), 15u);
    }
    const auto raw = g.raw(*g.find_tensor("blk.2.attn_v.weight"));
    ASSERT_EQ(raw.size(), want.size());
    EXPECT_TRUE(std::equal(raw.begin(), raw.end(), want.begin()));
    if (limit == 0.0) continue;
    io::convert_gguf_to_hf(path, tmp.file(std::string(name) + "-back"));
    const double ppl = eval::perplexity(model::Model::load(tmp.file(std::string(name) + "-back")), text, 256, 256).perplexity;
    EXPECT_NE(ppl, base_ppl);
    EXPECT_LT(ppl, base_ppl * limit) << base_ppl;
  }
}

TEST(GgufExport, Llama3RopeScalingTravelsAsRopeFreqs) {
  testing::TempDir tmp;
  const std::string dir = tmp.file("scaled");
  fs::create_directories(dir);
  json config = io::parse_json_unique_keys(io::read_text_file(tiny_kjv() + "/config.json"), "config.json");
  config["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 10000.0}, {"factor", 8.0}, {"low_freq_factor", 1.0},
                               {"high_freq_factor", 4.0}, {"original_max_position_embeddings", 64}};
  config["max_position_embeddings"] = 1024;
  std::ofstream(dir + "/config.json") << config.dump(2);
  for (const char* f : {"tokenizer.json", "model.safetensors"}) fs::copy_file(tiny_kjv() + "/" + f, dir + "/" + f);
  export_gguf(dir, tmp.file("s.gguf"), {});
  const io::GgufFile g = io::GgufFile::open(tmp.file("s.gguf"));
  ASSERT_NE(g.find_tensor("rope_freqs.weight"), nullptr);
  const json back = io::gguf_to_hf_config(g);
  EXPECT_EQ(back["rope_scaling"]["rope_type"], "llama3");
  EXPECT_EQ(back["rope_scaling"]["factor"], 8.0);
  EXPECT_EQ(back["rope_scaling"]["high_freq_factor"], 4.0);
  EXPECT_EQ(back["rope_scaling"]["original_max_position_embeddings"], 64);
}

// A byte-level BPE tokenizer of the 256 byte symbols (GPT-2's byte-to-unicode alphabet), no merges, with
// Qwen2's pre-tokenizer: enough for the 256-row test checkpoints.
json byte_tokenizer_qwen2() {
  std::vector<int> bytes;
  for (int b = 33; b <= 126; ++b) bytes.push_back(b);
  for (int b = 161; b <= 172; ++b) bytes.push_back(b);
  for (int b = 174; b <= 255; ++b) bytes.push_back(b);
  std::vector<int> code(256, -1);
  for (int b : bytes) code[static_cast<std::size_t>(b)] = b;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    if (code[static_cast<std::size_t>(b)] < 0) code[static_cast<std::size_t>(b)] = 256 + extra++;
  }
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    const auto cp = static_cast<std::uint32_t>(code[static_cast<std::size_t>(b)]);
    std::string utf8;
    if (cp < 0x80) {
      utf8 = std::string(1, static_cast<char>(cp));
    } else {
      utf8 += static_cast<char>(0xC0 | (cp >> 6));
      utf8 += static_cast<char>(0x80 | (cp & 0x3F));
    }
    vocab[utf8] = b;
  }
  const json split = {{"type", "Split"}, {"pattern", {{"Regex", io::kQwen2SplitRegex}}}, {"behavior", "Isolated"}, {"invert", false}};
  return {{"version", "1.0"},
          {"added_tokens", json::array()},
          {"normalizer", {{"type", "NFC"}}},
          {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", {split, {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}}}}}},
          {"post_processor", nullptr},
          {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model", {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
                     {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
                     {"vocab", vocab}, {"merges", json::array()}}}};
}

TEST(GgufExport, QwenAndBiasedLlamaModelsRoundTripWithQkNorms) {
  for (const std::string variant : {"qwen2", "qwen3", "llama-mlp-bias"}) {
    SCOPED_TRACE(variant);
    const std::string arch = variant == "llama-mlp-bias" ? "llama" : variant;
    testing::TempDir tmp;
    const std::string src = testing::data_path("hf/" + arch), dir = tmp.file("m");
    fs::create_directories(dir);
    for (const auto& e : fs::directory_iterator(src)) fs::copy_file(e.path(), dir + "/" + e.path().filename().string());
    std::ofstream(dir + "/tokenizer.json") << byte_tokenizer_qwen2().dump();
    if (variant == "llama-mlp-bias") {
      // The Llama fixture with MLP biases (llama.cpp's ffn_*.bias).
      json config = io::parse_json_unique_keys(io::read_text_file(dir + "/config.json"), "config.json");
      config["mlp_bias"] = true;
      std::ofstream(dir + "/config.json") << config.dump(2);
      const auto store = io::TensorStore::open_dir(src);
      std::vector<io::NamedTensor> tensors;
      for (const auto& loc : store.all()) tensors.push_back({loc.entry->name, store.tensor(loc.entry->name)});
      const io::ModelConfig c = io::Checkpoint::open(src).config();
      for (std::int64_t l = 0; l < c.num_layers; ++l) {
        for (const auto& [name, n] : {std::pair{"gate_proj", c.intermediate_size}, std::pair{"up_proj", c.intermediate_size},
                                      std::pair{"down_proj", c.hidden_size}}) {
          std::vector<float> b(static_cast<std::size_t>(n));
          for (std::size_t i = 0; i < b.size(); ++i) b[i] = 0.01f * static_cast<float>((i * 7 + static_cast<std::size_t>(l)) % 13) - 0.06f;
          tensors.push_back({fmt::format("model.layers.{}.mlp.{}.bias", l, name), Tensor::from_f32(b, {n}).to(c.dtype)});
        }
      }
      fs::remove(dir + "/model.safetensors");
      io::write_safetensors(dir + "/model.safetensors", tensors);
    }
    export_gguf(dir, tmp.file("m.gguf"), {});
    const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
    EXPECT_EQ(g.get_string("general.architecture"), arch);
    EXPECT_EQ(g.get_string("tokenizer.ggml.pre"), "qwen2");
    io::convert_gguf_to_hf(tmp.file("m.gguf"), tmp.file("back"));
    const auto a = io::TensorStore::open_dir(dir), b = io::TensorStore::open_dir(tmp.file("back"));
    ASSERT_EQ(a.all().size(), b.all().size());
    for (const auto& loc : a.all()) {
      SCOPED_TRACE(loc.entry->name);
      ASSERT_TRUE(b.contains(loc.entry->name));
      EXPECT_EQ(a.tensor(loc.entry->name).to_f32(), b.tensor(loc.entry->name).to_f32());
    }
    // The same logits: the configs agree on everything the forward pass reads.
    const auto ma = model::Model::load(dir), mb = model::Model::load(tmp.file("back"));
    const std::vector<std::int32_t> ids = {1, 17, 99, 200, 3, 42, 255, 7};
    const std::vector<model::SequenceSpan> spans = {{0, 8, 0, 0}};
    std::vector<float> la, lb;
    ma.forward(ids, spans, nullptr, model::LogitsFor::all_rows, la);
    mb.forward(ids, spans, nullptr, model::LogitsFor::all_rows, lb);
    EXPECT_EQ(la, lb);
  }
}

TEST(GgufExport, EvalAndGenerateLoadAGgufFileDirectly) {
  // exporter::load_model (what `mopt eval` and `mopt generate` use) reads a .gguf file: its values dequantized
  // to f32 exactly, its tokenizer from the metadata.
  testing::TempDir tmp;
  export_gguf(tiny_kjv(), tmp.file("m.gguf"), gguf_options_from_name("q4_0"));
  const model::Model m = load_model(tmp.file("m.gguf"));
  const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
  EXPECT_EQ(m.layer(1).v.weight.to_f32(), g.dequantize(*g.find_tensor("blk.1.attn_v.weight")).to_f32());
  const auto base = model::Model::load(tiny_kjv());
  EXPECT_EQ(m.require_tokenizer().encode(sample_text(), true), base.require_tokenizer().encode(sample_text(), true));
  const std::vector<std::int32_t> text = base.require_tokenizer().encode(sample_text(), false);
  io::convert_gguf_to_hf(tmp.file("m.gguf"), tmp.file("f32"), {}, DType::F32);
  EXPECT_EQ(eval::perplexity(m, text, 256, 256).perplexity, eval::perplexity(model::Model::load(tmp.file("f32")), text, 256, 256).perplexity);
}

TEST(GgufExport, ABrokenGgufModelIsRefusedAndLeavesNoTemporaryCheckpoint) {
  const auto leftovers = [] {
    int n = 0;
    for (const auto& e : fs::directory_iterator(fs::temp_directory_path())) n += e.path().filename().string().rfind("mopt-gguf", 0) == 0;
    return n;
  };
  const int before = leftovers();
  try {
    load_model(testing::data_path("gguf/bad/truncated-data.gguf"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("truncated-data.gguf"), std::string::npos) << e.what();
  }
  EXPECT_EQ(leftovers(), before);
}

TEST(GgufExport, RefusesWhatItCannotWriteByName) {
  testing::TempDir tmp;
  try {
    export_gguf(testing::data_path("hf/mistral"), tmp.file("q.gguf"), {});  // a sliding window
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sliding window"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(tmp.file("q.gguf")));
  try {
    export_gguf(testing::data_path("hf/llama"), tmp.file("l.gguf"), {});  // no tokenizer.json
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gguf_options_from_name("q3_k"), Error);
}

TEST(GgufExport, PreTokenizerNamesFollowLlamaCpp) {
  const json byte_level_gpt2 = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  json t = {{"model", {{"type", "BPE"}, {"ignore_merges", false}, {"vocab", json::object()}, {"merges", json::array()}}},
            {"normalizer", nullptr},
            {"pre_tokenizer", byte_level_gpt2}};
  EXPECT_EQ(gguf_pre_tokenizer_name(t, "t"), "gpt-2");
  t["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level_gpt2}}};
  EXPECT_EQ(gguf_pre_tokenizer_name(t, "t"), "smollm");
  const json split_qwen = {{"type", "Split"}, {"pattern", {{"Regex", io::kQwen2SplitRegex}}}, {"behavior", "Isolated"}, {"invert", false}};
  const json byte_level_plain = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
  t["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", {split_qwen, byte_level_plain}}};
  EXPECT_THROW(gguf_pre_tokenizer_name(t, "t"), Error);  // qwen2 needs its NFC normalizer
  t["normalizer"] = {{"type", "NFC"}};
  EXPECT_EQ(gguf_pre_tokenizer_name(t, "t"), "qwen2");
  t["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_THROW(gguf_pre_tokenizer_name(t, "t"), Error);
  t["model"]["type"] = "Unigram";
  EXPECT_THROW(gguf_pre_tokenizer_name(t, "t"), Error);
}

}  // namespace
}  // namespace mopt::exporter
