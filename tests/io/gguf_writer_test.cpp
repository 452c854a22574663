// The GGUF writer: its quantizers against the gguf package's reference
// quantization (tests/data/gguf/quant_goldens.*), and files that mopt's own
// reader reads back exactly.
#include "io/gguf_writer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "io/checkpoint.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

TEST(GgufWriter, QuantizersMatchTheGgufPackageByteForByte) {
  const auto gold = TensorStore::open_file(testing::data_path("gguf/quant_goldens.safetensors"));
  const std::vector<float> x = gold.tensor("x").to_f32();
  for (const auto& [name, type] : {std::pair{"F16", GgmlType::F16}, std::pair{"BF16", GgmlType::BF16}, std::pair{"Q8_0", GgmlType::Q8_0},
                                   std::pair{"Q5_0", GgmlType::Q5_0}, std::pair{"Q4_0", GgmlType::Q4_0}}) {
    SCOPED_TRACE(name);
    const Tensor want = gold.tensor(name);
    const std::vector<std::byte> got = ggml_quantize(type, x.data(), x.size());
    ASSERT_EQ(got.size(), want.nbytes());
    std::size_t differ = 0;
    for (std::size_t i = 0; i < got.size(); ++i) differ += got[i] != want.bytes()[i];
    EXPECT_EQ(differ, 0u);
    // And they dequantize to within half a step of the input, plus what storing the step in f16 costs
    // (blocks whose step is below f16's normal range are skipped; F16 overflows to inf by design).
    if (type == GgmlType::Q8_0 || type == GgmlType::Q5_0 || type == GgmlType::Q4_0) {
      std::vector<float> back(x.size());
      ggml_dequantize(type, got, back.data(), back.size());
      for (std::size_t b = 0; b < x.size(); b += 32) {
        float amax = 0.0f;
        for (std::size_t i = b; i < b + 32; ++i) amax = std::max(amax, std::fabs(x[i]));
        const float step = amax / (type == GgmlType::Q8_0 ? 127.0f : type == GgmlType::Q5_0 ? 16.0f : 8.0f);
        if (step < 6.2e-5f) continue;
        // Q4_0's grid is -8..7 steps of the signed extreme: the other side reaches 7 steps, clipping 1.
        const float clip = type == GgmlType::Q4_0 || type == GgmlType::Q5_0 ? step : 0.0f;
        for (std::size_t i = b; i < b + 32; ++i) EXPECT_LE(std::fabs(back[i] - x[i]), step * 0.5f + clip + amax * 1e-3f) << i;
      }
    }
  }
  const std::vector<float> bad = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  EXPECT_THROW(ggml_quantize(GgmlType::F16, bad.data(), 2), Error);
  EXPECT_THROW(ggml_quantize(GgmlType::Q8_0, x.data(), 31), Error);
  EXPECT_THROW(ggml_quantize(GgmlType::Q4_K, x.data(), 255), Error);
}

TEST(GgufReader, Fp4BlocksReadAsTheGgufPackageReadsThem) {
  // llama.cpp's NVFP4 (E4M3 per 16 in blocks of 64, top scale bit ignored, 0x7F zero) and MXFP4 layouts.
  const auto gold = TensorStore::open_file(testing::data_path("gguf/quant_goldens.safetensors"));
  for (const auto& [name, type] : {std::pair{"NVFP4", GgmlType::NVFP4}, std::pair{"MXFP4", GgmlType::MXFP4}}) {
    SCOPED_TRACE(name);
    const Tensor bytes = gold.tensor(name);
    const std::vector<float> want = gold.tensor(std::string(name) + "_values").to_f32();
    std::vector<float> got(want.size());
    ggml_dequantize(type, bytes.bytes(), got.data(), got.size());
    std::size_t differ = 0;
    for (std::size_t i = 0; i < want.size(); ++i) differ += std::memcmp(&got[i], &want[i], 4) != 0 && !(got[i] == 0.0f && want[i] == 0.0f);
    EXPECT_EQ(differ, 0u);
  }
}

TEST(GgufWriter, KQuantsMatchLlamaCppByteForByte) {
  // tools/fixtures/make_gguf_kquant_goldens.sh: llama.cpp's own ggml library quantized these values.
  const auto gold = TensorStore::open_file(testing::data_path("gguf/kquant_goldens.safetensors"));
  const std::vector<float> x = gold.tensor("x").to_f32();
  for (const auto& [name, type] : {std::pair{"Q4_K", GgmlType::Q4_K}, std::pair{"Q6_K", GgmlType::Q6_K}}) {
    SCOPED_TRACE(name);
    const Tensor want = gold.tensor(name);
    const std::vector<std::byte> got = ggml_quantize(type, x.data(), x.size());
    ASSERT_EQ(got.size(), want.nbytes());
    const std::size_t block = type == GgmlType::Q4_K ? 144 : 210;
    for (std::size_t b = 0; b < got.size() / block; ++b) {
      std::size_t differ = 0;
      for (std::size_t i = b * block; i < (b + 1) * block; ++i) differ += got[i] != want.bytes()[i];
      EXPECT_EQ(differ, 0u) << "super-block " << b;
    }
    // What they stand for is close to the input: relative RMS error per super-block.
    std::vector<float> back(x.size());
    ggml_dequantize(type, got, back.data(), back.size());
    for (std::size_t b = 0; b < x.size(); b += 256) {
      double num = 0.0, den = 0.0;
      for (std::size_t i = b; i < b + 256; ++i) num += (back[i] - x[i]) * (back[i] - x[i]), den += x[i] * x[i];
      if (den > 1e-20) EXPECT_LT(std::sqrt(num / den), type == GgmlType::Q4_K ? 0.12 : 0.05) << "super-block " << b / 256;
    }
  }
}

TEST(GgufWriter, ImportanceWeightedQuantizersAreLlamaCppsByteForByte) {
  // tools/fixtures/make_gguf_kquant_goldens.sh: llama.cpp's ggml_quantize_chunk with an importance per
  // column (rows of 512; zeros among them, a zero block, a 1.6e6 spread), as llama-quantize --imatrix
  // calls it; and the same values without (the "_plain" tensors). Q8_0 ignores the importance.
  const auto gold = TensorStore::open_file(testing::data_path("gguf/imatrix_goldens.safetensors"));
  const std::vector<float> x = gold.tensor("x").to_f32();
  const std::vector<float> importance = gold.tensor("importance").to_f32();
  ASSERT_EQ(importance.size(), 512u);
  for (const auto& [name, type] : {std::pair{"Q4_0", GgmlType::Q4_0}, std::pair{"Q5_0", GgmlType::Q5_0}, std::pair{"Q8_0", GgmlType::Q8_0},
                                   std::pair{"Q4_K", GgmlType::Q4_K}, std::pair{"Q6_K", GgmlType::Q6_K}}) {
    SCOPED_TRACE(name);
    for (const bool weighted : {true, false}) {
      const Tensor want = gold.tensor(std::string(name) + (weighted ? "" : "_plain"));
      const std::vector<std::byte> got = ggml_quantize(type, x.data(), x.size(), name, weighted ? std::span<const float>(importance) : std::span<const float>{});
      ASSERT_EQ(got.size(), want.nbytes());
      const std::size_t block = ggml_type_info(static_cast<std::uint32_t>(type))->block_bytes;
      std::size_t differ = 0;
      for (std::size_t i = 0; i < got.size(); ++i) differ += got[i] != want.bytes()[i];
      EXPECT_EQ(differ, 0u) << (weighted ? "with" : "without") << " importance, blocks of " << block << " bytes";
    }
  }
  // Bad importance: negative, non-finite, or not whole rows of blocks.
  std::vector<float> bad = importance;
  bad[3] = -1.0f;
  EXPECT_THROW(ggml_quantize(GgmlType::Q4_K, x.data(), x.size(), "w", bad), Error);
  bad[3] = std::numeric_limits<float>::infinity();
  EXPECT_THROW(ggml_quantize(GgmlType::Q4_0, x.data(), x.size(), "w", bad), Error);
  EXPECT_THROW(ggml_quantize(GgmlType::Q4_0, x.data(), x.size(), "w", std::span<const float>(importance).first(48)), Error);
  EXPECT_THROW(ggml_quantize(GgmlType::Q4_K, x.data(), x.size(), "w", std::span<const float>(importance).first(96)), Error);
}

TEST(GgufWriter, WritesFilesTheReaderReadsBack) {
  testing::TempDir tmp;
  GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u32("llama.block_count", 2);
  w.add_f32("llama.rope.freq_base", 500000.0f);
  w.add("general.alignment", {GgufValueType::u32, GgufValueType::u8, 64});
  w.add("flag", {GgufValueType::boolean, GgufValueType::u8, true});
  w.add("i64", {GgufValueType::i64, GgufValueType::u8, -5});
  w.add("f64", {GgufValueType::f64, GgufValueType::u8, 0.25});
  w.add("tokenizer.ggml.tokens", {GgufValueType::array, GgufValueType::string, nlohmann::json::array({"a", "b", "<s>"})});
  w.add("tokenizer.ggml.token_type", {GgufValueType::array, GgufValueType::i32, nlohmann::json::array({1, 1, 3})});
  std::vector<float> a(64 * 3), v(96);
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::sin(static_cast<float>(i)) * 0.1f;
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) - 40.0f;
  const std::pair<const char*, GgmlType> types[] = {{"f32", GgmlType::F32}, {"f16", GgmlType::F16}, {"bf16", GgmlType::BF16},
                                                    {"q8", GgmlType::Q8_0}, {"q4", GgmlType::Q4_0}};
  for (const auto& [name, type] : types) w.add_tensor(std::string("w.") + name, {3, 64}, type, ggml_quantize(type, a.data(), a.size()));
  w.add_tensor("norm", {96}, GgmlType::F32, ggml_quantize(GgmlType::F32, v.data(), v.size()));
  EXPECT_THROW(w.add_string("general.architecture", "qwen2"), Error);
  EXPECT_THROW(w.add_tensor("norm", {96}, GgmlType::F32, ggml_quantize(GgmlType::F32, v.data(), v.size())), Error);
  EXPECT_THROW(w.add_tensor("short", {3, 64}, GgmlType::Q8_0, std::vector<std::byte>(10)), Error);
  EXPECT_THROW(w.add_tensor("ragged", {2, 48}, GgmlType::Q8_0, std::vector<std::byte>(102)), Error);
  // Produced when written: the same bytes as given up front.
  w.add_tensor("w.lazy", {3, 64}, GgmlType::Q8_0, [&a] { return ggml_quantize(GgmlType::Q8_0, a.data(), a.size()); });

  const std::string path = tmp.file("m.gguf");
  w.write(path);
  const GgufFile f = GgufFile::open(path);
  EXPECT_EQ(f.header().version, 3u);
  EXPECT_EQ(f.header().alignment, 64u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_uint("llama.block_count"), 2u);
  EXPECT_EQ(f.get_float("llama.rope.freq_base"), 500000.0);
  EXPECT_TRUE(f.get_bool("flag"));
  EXPECT_EQ(f.find("i64")->value.get<std::int64_t>(), -5);
  EXPECT_EQ(f.get_float("f64"), 0.25);
  EXPECT_EQ(f.find("tokenizer.ggml.tokens")->value, nlohmann::json::array({"a", "b", "<s>"}));
  EXPECT_EQ(f.find("tokenizer.ggml.token_type")->value, nlohmann::json::array({1, 1, 3}));
  ASSERT_EQ(f.header().tensors.size(), 7u);
  {
    const auto lazy = f.raw(*f.find_tensor("w.lazy"));
    const std::vector<std::byte> want = ggml_quantize(GgmlType::Q8_0, a.data(), a.size());
    ASSERT_EQ(lazy.size(), want.size());
    EXPECT_TRUE(std::equal(lazy.begin(), lazy.end(), want.begin()));
  }
  for (const auto& [name, type] : types) {
    SCOPED_TRACE(name);
    const GgufTensorInfo* t = f.find_tensor(std::string("w.") + name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->shape(), (Shape{3, 64}));
    EXPECT_EQ(t->type.type, type);
    EXPECT_EQ(t->offset % 64, 0u);
    const std::vector<std::byte> blocks = ggml_quantize(type, a.data(), a.size());
    const auto raw = f.raw(*t);
    ASSERT_EQ(raw.size(), blocks.size());
    EXPECT_EQ(std::memcmp(raw.data(), blocks.data(), blocks.size()), 0);
    std::vector<float> want(a.size());
    ggml_dequantize(type, blocks, want.data(), want.size());
    EXPECT_EQ(f.dequantize(*t).to_f32(), want);
  }
  EXPECT_EQ(f.dequantize(*f.find_tensor("norm")).to_f32(), v);
  // The same bytes as bytes() promises.
  EXPECT_EQ(f.header().data_offset % 64, 0u);
}

TEST(GgufWriter, ABadValueLeavesNoFile) {
  testing::TempDir tmp;
  GgufWriter w;
  w.add("bad", {GgufValueType::u32, GgufValueType::u8, "text"});
  EXPECT_THROW(w.write(tmp.file("x.gguf")), Error);
  EXPECT_FALSE(std::filesystem::exists(tmp.file("x.gguf")));
  // A producer failing (or giving the wrong size) midway: no file either.
  GgufWriter w2;
  std::vector<float> a(64, 0.5f);
  w2.add_tensor("ok", {64}, GgmlType::F32, ggml_quantize(GgmlType::F32, a.data(), a.size()));
  w2.add_tensor("short", {64}, GgmlType::F32, [] { return std::vector<std::byte>(10); });
  EXPECT_THROW(w2.write(tmp.file("y.gguf")), Error);
  EXPECT_FALSE(std::filesystem::exists(tmp.file("y.gguf")));
  for (const auto& e : std::filesystem::directory_iterator(tmp.path())) ADD_FAILURE() << "left behind: " << e.path();
}

}  // namespace
}  // namespace mopt::io
