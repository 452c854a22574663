#include "io/gguf.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <cctype>
#include <random>

#include "core/convert.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/gguf_convert.h"
#include "io/safetensors.h"
#include "io/tokenizer.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Builds GGUF bytes by hand, for tests of the parser's checks.
class GgufBuilder {
 public:
  GgufBuilder& u32(std::uint32_t v) { return put(v); }
  GgufBuilder& u64(std::uint64_t v) { return put(v); }
  GgufBuilder& str(const std::string& s) {
    u64(s.size());
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  GgufBuilder& raw(const std::vector<std::uint8_t>& b) {
    bytes_.insert(bytes_.end(), b.begin(), b.end());
    return *this;
  }
  GgufBuilder& pad_to(std::size_t alignment) {
    while (bytes_.size() % alignment) bytes_.push_back(0);
    return *this;
  }
  std::span<const std::byte> span() const { return {reinterpret_cast<const std::byte*>(bytes_.data()), bytes_.size()}; }
  std::vector<std::uint8_t> bytes_;

 private:
  template <typename T>
  GgufBuilder& put(T v) {
    std::uint8_t b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    bytes_.insert(bytes_.end(), b, b + sizeof(T));
    return *this;
  }
};

// A valid file: two metadata entries and one F32 tensor [2, 4].
GgufBuilder valid_file() {
  GgufBuilder b;
  b.u32(0x46554747).u32(3).u64(1).u64(2);
  b.str("general.architecture").u32(8).str("llama");
  b.str("general.alignment").u32(4).u32(32);
  b.str("w").u32(2).u64(4).u64(2).u32(0).u64(0);
  b.pad_to(32);
  for (int i = 0; i < 8; ++i) {
    const float v = static_cast<float>(i) - 3.5f;
    std::uint8_t f[4];
    std::memcpy(f, &v, 4);
    b.raw({f[0], f[1], f[2], f[3]});
  }
  return b;
}

std::string error_of(const GgufBuilder& b) {
  try {
    parse_gguf(b.span(), "m.gguf");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Gguf, ParsesAValidFile) {
  const GgufBuilder b = valid_file();
  const GgufHeader h = parse_gguf(b.span(), "m.gguf");
  EXPECT_EQ(h.version, 3u);
  EXPECT_EQ(h.alignment, 32u);
  ASSERT_EQ(h.metadata.size(), 2u);
  EXPECT_EQ(h.metadata[0].first, "general.architecture");
  EXPECT_EQ(h.metadata[0].second.value, "llama");
  ASSERT_EQ(h.tensors.size(), 1u);
  EXPECT_EQ(h.tensors[0].shape(), (Shape{2, 4}));  // ne [4, 2] reversed
  EXPECT_EQ(h.tensors[0].bytes, 32u);
  EXPECT_EQ(h.data_offset % 32, 0u);
}

TEST(Gguf, MalformedHeadersAreNamed) {
  struct Case {
    const char* what;
    GgufBuilder file;
    const char* expected;
  };
  std::vector<Case> cases;
  {
    GgufBuilder b;
    b.u32(0x12345678).u32(3).u64(0).u64(0);
    cases.push_back({"magic", b, "not a GGUF file"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(1).u64(0).u64(0);
    cases.push_back({"version 1", b, "version 1 is not supported"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0);
    cases.push_back({"truncated counts", b, "truncated"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0).u64(1ULL << 60);
    cases.push_back({"huge kv count", b, "larger than the file can hold"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(1ULL << 60).u64(0);
    cases.push_back({"huge tensor count", b, "larger than the file can hold"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0).u64(1).str("k").u32(8).u64(1ULL << 62);
    cases.push_back({"huge string", b, "runs past the end"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0).u64(1).str("k").u32(9).u32(4).u64(1ULL << 40);
    cases.push_back({"huge array", b, "array of 1099511627776 elements"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0).u64(1).str("k").u32(99).u32(0);
    cases.push_back({"value type", b, "unknown value type 99"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0).u64(2).str("k").u32(4).u32(1).str("k").u32(4).u32(2);
    cases.push_back({"duplicate key", b, "metadata 'k' appears twice"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(0).u64(1).str("general.alignment").u32(4).u32(24);
    cases.push_back({"alignment", b, "not a power of two"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(1).u64(0).str("w").u32(2).u64(4).u64(2).u32(200).u64(0);
    cases.push_back({"ggml type", b, "unknown ggml type 200"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(1).u64(0).str("w").u32(5).u64(1).u64(1).u64(1).u64(1).u64(1).u32(0).u64(0);
    cases.push_back({"dims", b, "5 dimensions"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(1).u64(0).str("w").u32(1).u64(33).u32(2).u64(0);
    cases.push_back({"block size", b, "not a multiple of the Q4_0 block size 32"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(1).u64(0).str("w").u32(1).u64(8).u32(0).u64(64);
    b.pad_to(32).raw(std::vector<std::uint8_t>(32, 0));
    cases.push_back({"offset past end", b, "run past the end of the file"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(1).u64(0).str("w").u32(1).u64(8).u32(0).u64(4);
    b.pad_to(32).raw(std::vector<std::uint8_t>(64, 0));
    cases.push_back({"unaligned", b, "not a multiple of the alignment"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(2).u64(0).str("a").u32(1).u64(16).u32(0).u64(0).str("b").u32(1).u64(8).u32(0).u64(32);
    b.pad_to(32).raw(std::vector<std::uint8_t>(64, 0));
    cases.push_back({"overlap", b, "overlap"});
  }
  {
    GgufBuilder b;
    b.u32(0x46554747).u32(3).u64(2).u64(0).str("a").u32(1).u64(8).u32(0).u64(0).str("a").u32(1).u64(8).u32(0).u64(32);
    b.pad_to(32).raw(std::vector<std::uint8_t>(64, 0));
    cases.push_back({"duplicate tensor", b, "tensor 'a' appears twice"});
  }
  for (const auto& c : cases) {
    const std::string msg = error_of(c.file);
    EXPECT_NE(msg.find(c.expected), std::string::npos) << c.what << ": " << msg;
    EXPECT_EQ(msg.rfind("m.gguf: ", 0), 0u) << c.what << ": " << msg;
  }
  // Every truncation of a valid file is refused, never read past.
  const GgufBuilder b = valid_file();
  for (std::size_t n = 0; n < b.bytes_.size(); ++n) {
    GgufBuilder cut;
    cut.bytes_.assign(b.bytes_.begin(), b.bytes_.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_NE(error_of(cut), "") << "truncated to " << n << " bytes";
  }
}

// Blocks built by hand, dequantized by the definitions in FORMATS.md 7.5.
TEST(GgufDequantize, BlockLayouts) {
  const std::uint16_t half = f32_to_f16(0.5f), quarter = f32_to_f16(0.25f);
  // Q8_0: d = 0.5, q = j - 16.
  std::vector<std::uint8_t> q8 = {static_cast<std::uint8_t>(half & 0xFF), static_cast<std::uint8_t>(half >> 8)};
  for (int j = 0; j < 32; ++j) q8.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(j - 16)));
  std::vector<float> out(32);
  ggml_dequantize(GgmlType::Q8_0, std::as_bytes(std::span(q8)), out.data(), 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 0.5f * static_cast<float>(j - 16));
  // Q4_0: byte j holds element j (low nibble) and j + 16 (high nibble), offset 8.
  std::vector<std::uint8_t> q4 = {static_cast<std::uint8_t>(half & 0xFF), static_cast<std::uint8_t>(half >> 8)};
  for (int j = 0; j < 16; ++j) q4.push_back(static_cast<std::uint8_t>(j | ((15 - j) << 4)));
  ggml_dequantize(GgmlType::Q4_0, std::as_bytes(std::span(q4)), out.data(), 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(out[j], 0.5f * static_cast<float>(j - 8));
    EXPECT_EQ(out[j + 16], 0.5f * static_cast<float>(15 - j - 8));
  }
  // Q4_1: d * q + m.
  std::vector<std::uint8_t> q41 = {static_cast<std::uint8_t>(half & 0xFF), static_cast<std::uint8_t>(half >> 8),
                                   static_cast<std::uint8_t>(quarter & 0xFF), static_cast<std::uint8_t>(quarter >> 8)};
  for (int j = 0; j < 16; ++j) q41.push_back(static_cast<std::uint8_t>(j | (3 << 4)));
  ggml_dequantize(GgmlType::Q4_1, std::as_bytes(std::span(q41)), out.data(), 32);
  EXPECT_EQ(out[5], 0.5f * 5 + 0.25f);
  EXPECT_EQ(out[20], 0.5f * 3 + 0.25f);
  EXPECT_THROW(ggml_dequantize(GgmlType::Q4_1, std::as_bytes(std::span(q41)), out.data(), 64), Error);
  EXPECT_THROW(ggml_dequantize(GgmlType::Q5_1, std::as_bytes(std::span(q41)), out.data(), 32), Error);
}

// llama.cpp's permutation, written from its definition (FORMATS.md 7.6):
// W_gguf = W_hf.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(out, in).
std::vector<float> permute_like_llama_cpp(const std::vector<float>& w, std::int64_t rows, std::int64_t cols, std::int64_t heads) {
  const std::int64_t d = rows / heads;
  std::vector<float> out(w.size());
  for (std::int64_t h = 0; h < heads; ++h) {
    for (std::int64_t two = 0; two < 2; ++two) {
      for (std::int64_t i = 0; i < d / 2; ++i) {
        const std::int64_t src = h * d + two * (d / 2) + i;  // [h][two][i]
        const std::int64_t dst = h * d + i * 2 + two;        // [h][i][two]
        std::copy(w.begin() + src * cols, w.begin() + (src + 1) * cols, out.begin() + dst * cols);
      }
    }
  }
  return out;
}

TEST(GgufConvert, UnpermuteUndoesLlamaCppsPermutation) {
  const std::int64_t heads = 3, d = 8, cols = 5, rows = heads * d;
  std::vector<float> w(static_cast<std::size_t>(rows * cols));
  std::mt19937 rng(3);
  std::normal_distribution<float> n;
  for (auto& v : w) v = n(rng);
  std::vector<float> p = permute_like_llama_cpp(w, rows, cols, heads);
  ASSERT_NE(p, w);
  unpermute_rope_rows(p.data(), rows, cols, heads);
  EXPECT_EQ(p, w);
  EXPECT_THROW(unpermute_rope_rows(p.data(), rows, cols, 5), Error);
  // And mopt's own permutation (the GGUF export's) is llama.cpp's.
  std::vector<float> q = w;
  permute_rope_rows(q.data(), rows, cols, heads);
  EXPECT_EQ(q, permute_like_llama_cpp(w, rows, cols, heads));
  EXPECT_THROW(permute_rope_rows(q.data(), rows, cols, 5), Error);
}

}  // namespace
}  // namespace mopt::io

namespace mopt::io {
namespace {

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

std::string upper(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

// A file written by the gguf PyPI package with one metadata entry of every
// value type and one tensor of every type we dequantize; the expectations
// come from gguf-py's reader and its dequantize (tools/fixtures/make_gguf_fixtures.py).
TEST(GgufFixture, EveryValueTypeAndTensorTypeAsGgufPyReadsThem) {
  const json expected = read_json(testing::data_path("gguf/types.expected.json"));
  const GgufFile g = GgufFile::open(testing::data_path("gguf/types.gguf"));
  EXPECT_EQ(g.header().version, expected["gguf_version"]);
  EXPECT_EQ(g.header().alignment, expected["alignment"]);
  EXPECT_EQ(g.header().data_offset, expected["data_offset"]);
  ASSERT_EQ(g.header().metadata.size(), expected["metadata"].size());
  for (const auto& [key, facts] : expected["metadata"].items()) {
    const GgufValue* v = g.find(key);
    ASSERT_NE(v, nullptr) << key;
    EXPECT_EQ(upper(gguf_value_type_name(v->type)), facts["type"] == "BOOL" ? "BOOL" : facts["type"].get<std::string>()) << key;
    if (facts.contains("element_type")) EXPECT_EQ(upper(gguf_value_type_name(v->element_type)), facts["element_type"]) << key;
    EXPECT_EQ(v->value, facts["value"]) << key;
  }
  const auto values = SafetensorsFile::open(testing::data_path("gguf/types.expected.safetensors"));
  ASSERT_EQ(g.header().tensors.size(), expected["tensors"].size());
  int dequantized = 0;
  for (const auto& facts : expected["tensors"]) {
    const std::string name = facts["name"];
    const GgufTensorInfo* t = g.find_tensor(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->type.name, facts["ggml_type"].get<std::string>()) << name;
    EXPECT_EQ(t->ne, facts["ne"].get<std::vector<std::uint64_t>>()) << name;
    EXPECT_EQ(t->offset, facts["offset"]) << name;
    EXPECT_EQ(t->bytes, facts["n_bytes"]) << name;
    if (values.find(name) == nullptr) continue;  // a type we only read, not dequantize
    ++dequantized;
    const auto want = values.tensor(name).to_f32();
    const auto got = g.dequantize(*t).to_f32();
    ASSERT_EQ(got.size(), want.size()) << name;
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < want.size(); ++i) mismatches += got[i] != want[i];
    EXPECT_EQ(mismatches, 0u) << name << ": dequantized values differ from gguf-py's";
  }
  EXPECT_GE(dequantized, 8);  // F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K at least
}

TEST(GgufFixture, MalformedFilesAreRefused) {
  const std::string dir = testing::data_path("gguf/bad");
  int checked = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.path().extension() != ".gguf") continue;
    const std::string name = entry.path().filename().string();
    if (name == "nested-array.gguf") {
      // The format allows arrays of arrays (llama.cpp does not); we read them.
      EXPECT_NO_THROW(GgufFile::open(entry.path().string())) << name;
      continue;
    }
    try {
      GgufFile::open(entry.path().string());
      ADD_FAILURE() << name << " was accepted";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(name), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
    ++checked;
  }
  EXPECT_GE(checked, 30);
  EXPECT_NO_THROW(GgufFile::open(testing::data_path("gguf/minimal.gguf")));
}

// A llama-architecture GGUF laid out as llama.cpp's converter lays it out
// (Q/K rows permuted, llama3 scaling as rope_freqs), made from a transformers
// checkpoint and checked by transformers' own GGUF loader, whose weights are
// the expectation here.
TEST(GgufFixture, ConvertTinyLlamaToHuggingFace) {
  testing::TempDir tmp;
  const std::string out = tmp.file("converted");
  convert_gguf_to_hf(testing::data_path("gguf/tiny-llama.gguf"), out);
  const Checkpoint ckpt = Checkpoint::open(out);
  const ModelConfig& c = ckpt.config();
  EXPECT_EQ(c.architecture, "LlamaForCausalLM");
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.num_kv_heads, 2);
  EXPECT_EQ(c.rope_scaling.type, RopeScalingType::llama3);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  const auto expected = SafetensorsFile::open(testing::data_path("gguf/tiny-llama.expected.safetensors"));
  for (const auto& e : expected.entries()) {
    ASSERT_TRUE(ckpt.tensors().contains(e.name)) << e.name;
    const auto want = expected.tensor(e.name).to_f32();
    const auto got = ckpt.tensor(e.name).to_f32();
    ASSERT_EQ(got.size(), want.size()) << e.name;
    for (std::size_t i = 0; i < want.size(); ++i) {
      // Stored as bf16: within half a bf16 step of transformers' f32 value.
      ASSERT_NEAR(got[i], want[i], std::fabs(want[i]) * 0.004 + 1e-30) << e.name << " element " << i;
    }
  }
  // The tokenizer rebuilt from the metadata encodes as transformers' does.
  const json facts = read_json(testing::data_path("gguf/tiny-llama.expected.json"));
  const Tokenizer tok = Tokenizer::load(out);
  const auto& v = facts["verification"];
  EXPECT_EQ(tok.encode(v["tokenizer_sample"].get<std::string>()), v["tokenizer_sample_ids"].get<std::vector<std::int32_t>>());
  // An existing target is refused and left untouched.
  EXPECT_THROW(convert_gguf_to_hf(testing::data_path("gguf/tiny-llama.gguf"), out), Error);
}

TEST(GgufFixture, ConvertRefusesWhatItCannotRepresent) {
  testing::TempDir tmp;
  EXPECT_THROW(convert_gguf_to_hf(testing::data_path("gguf/types.gguf"), tmp.file("x")), Error);  // architecture mopt-types
  EXPECT_FALSE(fs::exists(tmp.file("x")));
  for (const auto& entry : fs::directory_iterator(tmp.path())) ADD_FAILURE() << "left behind: " << entry.path();
}

TEST(Gguf, TensorNamesTranslateBothWaysFromOneTable) {
  const std::pair<const char*, const char*> pairs[] = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"},
      {"model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"},
      {"model.layers.12.post_attention_layernorm.weight", "blk.12.ffn_norm.weight"},
      {"model.layers.3.self_attn.q_proj.weight", "blk.3.attn_q.weight"},
      {"model.layers.3.self_attn.q_proj.bias", "blk.3.attn_q.bias"},
      {"model.layers.3.self_attn.k_proj.bias", "blk.3.attn_k.bias"},
      {"model.layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight"},
      {"model.layers.3.self_attn.o_proj.weight", "blk.3.attn_output.weight"},
      {"model.layers.7.self_attn.q_norm.weight", "blk.7.attn_q_norm.weight"},
      {"model.layers.7.self_attn.k_norm.weight", "blk.7.attn_k_norm.weight"},
      {"model.layers.31.mlp.gate_proj.weight", "blk.31.ffn_gate.weight"},
      {"model.layers.31.mlp.up_proj.bias", "blk.31.ffn_up.bias"},
      {"model.layers.31.mlp.down_proj.weight", "blk.31.ffn_down.weight"},
  };
  for (const auto& [hf, gguf] : pairs) {
    EXPECT_EQ(gguf_tensor_name(hf).value_or("?"), gguf) << hf;
    EXPECT_EQ(hf_tensor_name(gguf).value_or("?"), hf) << gguf;
  }
  EXPECT_EQ(hf_tensor_name("rope_freqs.weight").value_or("?"), "");
  for (const char* bad : {"blk.x.attn_q.weight", "blk.3.attn_q.scale", "blk.3.attn_qq.weight", "blk..attn_q.weight", "blk.3", "output", ""}) {
    EXPECT_FALSE(hf_tensor_name(bad).has_value()) << bad;
  }
  for (const char* bad : {"model.layers.3.self_attn.rotary_emb.inv_freq", "model.layers.a.mlp.up_proj.weight", "model.layers.3.mlp.up_proj",
                          "lm_head.bias"}) {
    EXPECT_FALSE(gguf_tensor_name(bad).has_value()) << bad;
  }
}

}  // namespace
}  // namespace mopt::io
