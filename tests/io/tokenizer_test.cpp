#include "io/tokenizer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/utf8.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string hex_to_bytes(const std::string& hex) {
  std::string out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) out += static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16));
  return out;
}

std::string ids_string(const std::vector<std::int32_t>& ids) {
  std::string s;
  for (const auto id : ids) s += std::to_string(id) + " ";
  return s;
}

// Golden encodings and decodings produced by the Hugging Face tokenizers
// package (tools/fixtures/make_tokenizer_goldens.py) for a real tokenizer.json.
void check_golden(const std::string& golden_file, const std::string& tokenizer_path) {
  std::ifstream in(golden_file);
  ASSERT_TRUE(in) << golden_file;
  const json golden = json::parse(in);
  const Tokenizer tok = Tokenizer::load(tokenizer_path);
  int checked = 0;
  for (const auto& c : golden["cases"]) {
    // Invalid UTF-8 cases feed the raw bytes; the golden ids are those of the repaired text.
    const std::string input = c.contains("bytes_hex") ? hex_to_bytes(c["bytes_hex"]) : c["text"].get<std::string>();
    const std::string shown = c["text"].get<std::string>().substr(0, 60);
    const auto expected = c["ids"].get<std::vector<std::int32_t>>();
    const auto expected_special = c["ids_special"].get<std::vector<std::int32_t>>();
    const auto ids = tok.encode(input, false);
    EXPECT_EQ(ids, expected) << "encode '" << shown << "'\n ours:   " << ids_string(ids) << "\n golden: " << ids_string(expected);
    EXPECT_EQ(tok.encode(input, true), expected_special) << "encode with special tokens '" << shown << "'";
    EXPECT_EQ(tok.decode(expected, false), c["decoded"].get<std::string>()) << "decode of '" << shown << "'";
    EXPECT_EQ(tok.decode(expected_special, true), c["decoded_skip_special"].get<std::string>()) << "decode skipping specials of '" << shown << "'";
    ++checked;
  }
  for (const auto& c : golden["decode_cases"]) {
    const auto ids = c["ids"].get<std::vector<std::int32_t>>();
    if (std::any_of(ids.begin(), ids.end(), [&](std::int32_t id) { return id >= tok.vocab_size(); })) {
      // HF drops ids it does not know without a word; we refuse them on purpose.
      EXPECT_THROW(tok.decode(ids, false), Error) << c["name"];
      continue;
    }
    EXPECT_EQ(tok.decode(ids, false), c["decoded"].get<std::string>()) << c["name"];
    EXPECT_EQ(tok.decode(ids, true), c["decoded_skip_special"].get<std::string>()) << c["name"];
  }
  EXPECT_GT(checked, 100);
}

std::string shared_tokenizer(const std::string& name) { return std::string(MOPT_SHARED_DATA_DIR) + "/tokenizers/" + name; }

class RealTokenizer : public ::testing::TestWithParam<std::string> {};

TEST_P(RealTokenizer, MatchesHuggingFace) {
  const std::string dir = shared_tokenizer(GetParam());
  if (!fs::exists(dir + "/tokenizer.json")) GTEST_SKIP() << dir << "/tokenizer.json not found (the team's shared data)";
  check_golden(testing::data_path("tokenizers/golden-" + GetParam() + ".json"), dir);
}

INSTANTIATE_TEST_SUITE_P(Tokenizer, RealTokenizer, ::testing::Values("llama3", "qwen3", "mistral"));

// The tokenizer.json `mopt convert` rebuilt from SmolLM2's GGUF metadata.
TEST(Tokenizer, ConvertedSmolLM2MatchesHuggingFace) {
  const std::string dir = std::string(MOPT_MODELS_DIR) + "/smollm2-135m";
  if (!fs::exists(dir + "/tokenizer.json")) GTEST_SKIP() << dir << " not found: run scripts/get-smollm2.sh";
  check_golden(testing::data_path("tokenizers/golden-smollm2.json"), dir);
}

TEST(Utf8, MaximalSubpartsBecomeOneReplacementEach) {
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(utf8_make_valid("abc"), "abc");
  EXPECT_EQ(utf8_make_valid("\x80"), r);
  EXPECT_EQ(utf8_make_valid("caf\xC3"), "caf" + r);
  EXPECT_EQ(utf8_make_valid("\xC0\xAF"), r + r);              // C0 never starts a sequence
  EXPECT_EQ(utf8_make_valid("\xED\xA0\x80"), r + r + r);      // a surrogate: ED takes 80..9F only
  EXPECT_EQ(utf8_make_valid("a\xE2\x82 b"), "a" + r + " b");  // a truncated 3-byte sequence is one part
  EXPECT_EQ(utf8_make_valid("\xF4\x90\x80\x80"), r + r + r + r);  // beyond U+10FFFF
  EXPECT_EQ(utf8_make_valid("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
  EXPECT_TRUE(utf8_is_valid("\xE6\x97\xA5"));
  EXPECT_FALSE(utf8_is_valid("\xE6\x97"));
}

// A small byte-level tokenizer written by hand, to test the pieces one by one.
std::string tiny_byte_level_json(const std::string& merges_json) {
  json vocab = json::object();
  // Every byte's printable character, as GPT-2 maps them.
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    std::string s;
    utf8_append(s, printable ? static_cast<char32_t>(b) : static_cast<char32_t>(0x100 + extra++));
    vocab[s] = b;
  }
  vocab["he"] = 256;
  vocab["ll"] = 257;
  vocab["hell"] = 258;
  vocab["hello"] = 259;
  vocab["\xC4\xA0w"] = 260;  // "Ġw"
  json j = {{"version", "1.0"},
            {"added_tokens", json::array({{{"id", 261}, {"content", "<|end|>"}, {"special", true}, {"normalized", false}},
                                          {{"id", 262}, {"content", "<tool>"}, {"special", false}, {"normalized", false}}})},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
            {"post_processor",
             {{"type", "TemplateProcessing"},
              {"single", json::array({{{"SpecialToken", {{"id", "<|end|>"}, {"type_id", 0}}}}, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
              {"special_tokens", {{"<|end|>", {{"id", "<|end|>"}, {"ids", {261}}, {"tokens", {"<|end|>"}}}}}}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::parse(merges_json)}}}};
  return j.dump();
}

TEST(Tokenizer, MergesInBothFormsAndLowestRankFirst) {
  const Tokenizer a = Tokenizer::from_json(tiny_byte_level_json(R"(["h e", "l l", "he ll", "hell o", "Ġ w"])"), "a");
  const Tokenizer b = Tokenizer::from_json(tiny_byte_level_json(R"([["h","e"], ["l","l"], ["he","ll"], ["hell","o"], ["Ġ","w"]])"), "b");
  EXPECT_EQ(a.encode("hello world"), (std::vector<std::int32_t>{259, 260, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ(b.encode("hello world"), a.encode("hello world"));
  EXPECT_EQ(a.decode(a.encode("hello world")), "hello world");
  // Without the "he ll" merge, "hell" is never formed.
  const Tokenizer c = Tokenizer::from_json(tiny_byte_level_json(R"(["l l", "h e"])"), "c");
  EXPECT_EQ(c.encode("hello"), (std::vector<std::int32_t>{256, 257, 'o'}));
}

TEST(Tokenizer, AddedTokensAndTemplate) {
  const Tokenizer t = Tokenizer::from_json(tiny_byte_level_json(R"(["h e"])"), "t");
  EXPECT_EQ(t.encode("he<|end|>he"), (std::vector<std::int32_t>{256, 261, 256}));
  EXPECT_EQ(t.encode("he", true), (std::vector<std::int32_t>{261, 256}));
  EXPECT_EQ(t.prefix_special_ids(), (std::vector<std::int32_t>{261}));
  EXPECT_TRUE(t.is_special(261));
  EXPECT_FALSE(t.is_special(262));
  EXPECT_EQ(t.decode(std::vector<std::int32_t>{261, 256, 262}, true), "he<tool>");
  EXPECT_EQ(t.vocab_size(), 263);
  EXPECT_EQ(t.token_to_id("<tool>"), 262);
  EXPECT_THROW(t.decode(std::vector<std::int32_t>{999}), Error);
  EXPECT_THROW(t.decode(std::vector<std::int32_t>{-1}), Error);
}

TEST(Tokenizer, UnsupportedComponentsAreNamed) {
  auto error_of = [](const std::string& text) {
    try {
      Tokenizer::from_json(text, "tokenizer.json");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  json j = json::parse(tiny_byte_level_json("[]"));
  j["model"]["type"] = "WordPiece";
  EXPECT_NE(error_of(j.dump()).find("model type 'WordPiece' is not supported"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["normalizer"] = {{"type", "Lowercase"}};
  EXPECT_NE(error_of(j.dump()).find("normalizer 'Lowercase' is not supported"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_NE(error_of(j.dump()).find("pre_tokenizer 'Whitespace' is not supported"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_NE(error_of(j.dump()).find("decoder 'WordPiece' is not supported"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["post_processor"] = {{"type", "BertProcessing"}};
  EXPECT_NE(error_of(j.dump()).find("post_processor 'BertProcessing' is not supported"), std::string::npos);
  j = json::parse(tiny_byte_level_json(R"(["h zz"])"));
  EXPECT_NE(error_of(j.dump()).find("not in the vocabulary"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  EXPECT_NE(error_of(j.dump()).find("regex does not compile"), std::string::npos);
  EXPECT_NE(error_of("{not json").find("tokenizer.json: invalid JSON"), std::string::npos);
  // Found by the fuzzer: a field read without a check is still an Error, not a crash.
  j = json::parse(tiny_byte_level_json("[]"));
  j["normalizer"] = {{"type", "Replace"}, {"content", "x"}};
  EXPECT_NE(error_of(j.dump()).find("malformed tokenizer.json: key 'pattern' not found"), std::string::npos);
  EXPECT_NE(error_of("{}").find("missing object 'model'"), std::string::npos);
  // Found by the fuzzer in CI: one large id made the id table allocate
  // gigabytes. Ids far beyond the number of tokens are refused before any table.
  j = json::parse(tiny_byte_level_json("[]"));
  j["model"]["vocab"]["far"] = 10000000;
  EXPECT_NE(error_of(j.dump()).find("vocabulary id 10000000 is too large for 264 tokens"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["added_tokens"][1]["id"] = 5000;
  EXPECT_NE(error_of(j.dump()).find("added token id 5000 is out of range for 263 tokens"), std::string::npos);
  j = json::parse(tiny_byte_level_json("[]"));
  j["model"]["vocab"]["hole"] = 1500;  // holes within reason are kept
  EXPECT_EQ(error_of(j.dump()), "");
}

TEST(Tokenizer, MissingFileOrDirectory) {
  testing::TempDir dir;
  try {
    Tokenizer::load(dir.path().string());
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no tokenizer.json"), std::string::npos);
  }
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), Error);
}

}  // namespace
}  // namespace mopt::io
