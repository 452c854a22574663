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
#include "load/load_model.h"
#include "io/checkpoint.h"
#include "io/gguf_convert.h"
#include "io/gguf_writer.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"
#include "model/llama.h"
#include "support/sha256.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::exporter {
namespace {

using load::load_model;
using load::QuantizedRun;

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
  // The GGUF file's own tokenizer, read in place (mopt tokenize FILE.gguf).
  const io::Tokenizer tg = io::Tokenizer::load(tmp.file("m.gguf"));
  EXPECT_EQ(ta.encode(sample_text(), true), tg.encode(sample_text(), true));
  EXPECT_EQ(ta.decode(ta.encode(sample_text(), false), false), tg.decode(ta.encode(sample_text(), false), false));
  EXPECT_THROW(export_gguf(tiny_kjv(), tmp.file("m.gguf"), {}), Error);  // exists
}

TEST(GgufExport, IntegerTypesHoldTheReferenceBlocksAndKeepThePerplexity) {
  testing::TempDir tmp;
  auto base = model::Model::load(tiny_kjv());
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
    model::Model back = model::Model::load(tmp.file(std::string(name) + "-back"));
    const double ppl = eval::perplexity(back, text, 256, 256).perplexity;
    EXPECT_NE(ppl, base_ppl);
    EXPECT_LT(ppl, base_ppl * limit) << base_ppl;
  }
}

TEST(GgufExport, Sha256OfKnownMessages) {  // FIPS 180-4's examples and the padding's edge cases
  const auto sha = [](const std::string& m) { return testing::sha256_hex(std::as_bytes(std::span(m))); };
  EXPECT_EQ(sha(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"), "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha(std::string(1000, 'a')), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
}

// llama-quantize's own files (tools/fixtures/make_gguf_mix_goldens.py): it quantized mopt's bf16 export of
// each model; mopt's export in the type of the same name is that file, tensor by tensor and byte for byte.
TEST(GgufExport, TypeMixesAreLlamaQuantizesFilesByteForByte) {
  const json goldens = io::parse_json_unique_keys(io::read_text_file(testing::data_path("gguf/llama_quantize_mixes.json")), "goldens");
  testing::TempDir tmp;
  ASSERT_GE(goldens.at("goldens").size(), 8u);
  for (const json& golden : goldens.at("goldens")) {
    const std::string model = golden.at("model"), type = golden.at("mopt_type");
    SCOPED_TRACE(model + " " + type + " = " + golden.at("llama_quantize").get<std::string>());
    const std::string dir = model == "tiny-kjv" ? tiny_kjv() : testing::two_layer_tiny_kjv(true);
    ASSERT_TRUE(model == "tiny-kjv" || model == "tiny-kjv-2-tied") << model;
    const std::string path = tmp.file(model + "-" + type + ".gguf");
    export_gguf(dir, path, gguf_options_from_name(type));
    const io::GgufFile g = io::GgufFile::open(path);
    EXPECT_EQ(g.get_uint("general.file_type"), golden.at("file_type").get<std::uint64_t>());
    const auto& want = golden.at("tensors");
    ASSERT_EQ(g.header().tensors.size(), want.size());
    for (std::size_t i = 0; i < want.size(); ++i) {
      const io::GgufTensorInfo& t = g.header().tensors[i];
      SCOPED_TRACE(want[i].at("name").get<std::string>());
      EXPECT_EQ(t.name, want[i].at("name"));  // llama.cpp's order
      EXPECT_EQ(t.type.name, want[i].at("type"));
      EXPECT_EQ(t.ne, want[i].at("ne").get<std::vector<std::uint64_t>>());
      EXPECT_EQ(testing::sha256_hex(g.raw(t)), want[i].at("sha256"));
    }
    // The metadata too (its order included): the whole file.
    std::ifstream f(path, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    EXPECT_EQ(bytes.size(), golden.at("file_bytes").get<std::size_t>());
    EXPECT_EQ(testing::sha256_hex(std::as_bytes(std::span(bytes))), golden.at("file_sha256"));
  }
}

TEST(GgufExport, MatrixTypesFollowLlamaQuantizesRules) {
  // llama_tensor_get_type and tensor_type_fallback in llama.cpp's src/llama-quant.cpp (llama-cpp-python 0.3.36).
  using io::GgmlType;
  const auto type = [](const char* name, const std::string& gguf, std::int64_t cols, bool tied, std::int64_t layer = 0) {
    return gguf_matrix_type(gguf_options_from_name(name), gguf, layer, 30, cols, tied);
  };
  // SmolLM2-135M: tied, 576 columns. Q6_K does not fit 576 and falls back to Q8_0.
  EXPECT_EQ(type("q4_0", "token_embd.weight", 576, true), GgmlType::Q8_0);
  EXPECT_EQ(type("q4_0", "blk.0.attn_q.weight", 576, true), GgmlType::Q4_0);
  EXPECT_EQ(type("q4_0", "blk.0.ffn_down.weight", 1536, true), GgmlType::Q4_0);
  EXPECT_EQ(type("q8_0", "token_embd.weight", 576, true), GgmlType::Q8_0);
  // Whole super-blocks: the head gets Q6_K, tied or not; an untied token embedding keeps the type.
  EXPECT_EQ(type("q4_0", "token_embd.weight", 2048, true), GgmlType::Q6_K);
  EXPECT_EQ(type("q4_0", "output.weight", 2048, false), GgmlType::Q6_K);
  EXPECT_EQ(type("q4_0", "token_embd.weight", 2048, false), GgmlType::Q4_0);
  EXPECT_EQ(type("q5_0", "output.weight", 2048, false), GgmlType::Q6_K);
  EXPECT_EQ(type("q6_k", "output.weight", 2048, false), GgmlType::Q6_K);
  EXPECT_EQ(type("q8_0", "output.weight", 2048, false), GgmlType::Q8_0);
  // --pure: every matrix in the type.
  EXPECT_EQ(type("q4_0_pure", "output.weight", 2048, false), GgmlType::Q4_0);
  EXPECT_EQ(type("q4_0_pure", "token_embd.weight", 2048, true), GgmlType::Q4_0);
  EXPECT_EQ(type("q4_k", "output.weight", 2048, false), GgmlType::Q4_K);
  // Rows that are not whole blocks: the head's type is Q8_0, then F16 when 32 does not divide them either.
  EXPECT_EQ(type("q4_0", "output.weight", 48, false), GgmlType::F16);
  EXPECT_EQ(type("q4_0", "blk.3.attn_v.weight", 48, false), GgmlType::F16);
  EXPECT_EQ(type("q8_0", "blk.3.attn_v.weight", 48, false), GgmlType::F16);
  EXPECT_EQ(type("q4_k", "blk.3.attn_v.weight", 704, false), GgmlType::Q5_0);
  EXPECT_EQ(type("q4_k", "blk.3.attn_v.weight", 48, false), GgmlType::F16);
  EXPECT_EQ(type("q4_k_m", "output.weight", 576, true), GgmlType::Q8_0);
  EXPECT_EQ(type("q4_k_m", "blk.0.attn_v.weight", 2048, false, 0), GgmlType::Q6_K);   // first eighth
  EXPECT_EQ(type("q4_k_m", "blk.4.attn_v.weight", 2048, false, 4), GgmlType::Q4_K);   // 30/8 = 3: (4-3)%3 != 2
  EXPECT_EQ(type("q4_k_m", "blk.5.ffn_down.weight", 2048, false, 5), GgmlType::Q6_K); // (5-3)%3 == 2
  EXPECT_EQ(type("q4_k_m", "blk.5.attn_q.weight", 2048, false, 5), GgmlType::Q4_K);
  // Unquantized types are not mixed.
  EXPECT_EQ(type("bf16", "output.weight", 48, false), GgmlType::BF16);
  EXPECT_EQ(type("f16", "token_embd.weight", 576, true), GgmlType::F16);
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
    auto ma = model::Model::load(dir), mb = model::Model::load(tmp.file("back"));
    const std::vector<std::int32_t> ids = {1, 17, 99, 200, 3, 42, 255, 7};
    const std::vector<model::SequenceSpan> spans = {{0, 8, 0, 0}};
    std::vector<float> la, lb;
    ma.forward(ids, spans, nullptr, model::LogitsFor::all_rows, la);
    mb.forward(ids, spans, nullptr, model::LogitsFor::all_rows, lb);
    EXPECT_EQ(la, lb);
  }
}

TEST(GgufExport, EvalAndGenerateLoadAGgufFileDirectly) {
  // load::load_model (what `mopt eval` and `mopt generate` use) reads a .gguf file: its values dequantized
  // to f32 exactly, its tokenizer from the metadata.
  testing::TempDir tmp;
  export_gguf(tiny_kjv(), tmp.file("m.gguf"), gguf_options_from_name("q4_0"));
  model::Model m = load_model(tmp.file("m.gguf"));
  const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
  EXPECT_EQ(m.layer(1).v.weight.to_f32(), g.dequantize(*g.find_tensor("blk.1.attn_v.weight")).to_f32());
  auto base = model::Model::load(tiny_kjv());
  EXPECT_EQ(m.require_tokenizer().encode(sample_text(), true), base.require_tokenizer().encode(sample_text(), true));
  const std::vector<std::int32_t> text = base.require_tokenizer().encode(sample_text(), false);
  io::convert_gguf_to_hf(tmp.file("m.gguf"), tmp.file("f32"), {}, DType::F32);
  model::Model f32 = model::Model::load(tmp.file("f32"));
  EXPECT_EQ(eval::perplexity(m, text, 256, 256).perplexity, eval::perplexity(f32, text, 256, 256).perplexity);
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
  // A tokenizer.json whose BPE model lacks its merges: named, nothing written.
  const std::string broken = tmp.file("no-merges");
  fs::copy(testing::two_layer_tiny_kjv(), broken, fs::copy_options::recursive);
  json tok = io::parse_json_unique_keys(io::read_text_file(broken + "/tokenizer.json"), "tokenizer.json");
  tok["model"].erase("merges");
  fs::remove(broken + "/tokenizer.json");
  std::ofstream(broken + "/tokenizer.json") << tok.dump();
  try {
    export_gguf(broken, tmp.file("n.gguf"), {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(tmp.file("n.gguf")));
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
