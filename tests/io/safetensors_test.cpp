#include "io/safetensors.h"

#include <gtest/gtest.h>
#include <sys/resource.h>

#include <csignal>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/convert.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

using nlohmann::json;
using testing::TempDir;

// A safetensors file's bytes from a header text and a data buffer.
std::vector<std::byte> file_bytes(const std::string& header, std::size_t data_bytes, std::uint64_t claimed_length = ~0ULL) {
  const std::uint64_t n = claimed_length == ~0ULL ? header.size() : claimed_length;
  std::vector<std::byte> out(8 + header.size() + data_bytes, std::byte{0x5A});
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xFF);
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

std::string error_of(const std::string& header, std::size_t data_bytes, std::uint64_t claimed = ~0ULL) {
  try {
    parse_safetensors_header(file_bytes(header, data_bytes, claimed), "f.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(SafetensorsParse, ValidHeader) {
  const auto bytes = file_bytes(
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},"z":{"dtype":"F32","shape":[0],"data_offsets":[16,16]}})",
      16);
  const auto h = parse_safetensors_header(bytes, "f");
  ASSERT_EQ(h.entries.size(), 3u);
  EXPECT_EQ(h.entries[0].name, "a");
  EXPECT_EQ(h.entries[0].dtype, DType::BF16);
  EXPECT_EQ(h.entries[0].shape, (Shape{2, 2}));
  EXPECT_EQ(h.entries[1].name, "b");
  EXPECT_EQ(h.metadata.at("format"), "pt");
}

TEST(SafetensorsParse, F4ShapeIsTheLogicalElementCount) {
  const auto h = parse_safetensors_header(
      file_bytes(R"({"q":{"dtype":"F4","shape":[2,8],"data_offsets":[0,8]}})", 8), "f");
  EXPECT_EQ(h.entries[0].dtype, DType::E2M1);
  EXPECT_NE(error_of(R"({"q":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", 2).find("whole bytes"), std::string::npos);
}

struct BadCase {
  const char* what;
  std::string header;
  std::size_t data;
  std::string expected;  // a piece of the message
};

TEST(SafetensorsParse, EveryMalformationIsNamed) {
  const std::string ok = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const BadCase cases[] = {
      {"invalid JSON", R"({"t":{"dtype":"F32",)", 8, "invalid JSON"},
      {"not an object", R"([1,2,3])", 0, "must be a JSON object"},
      {"duplicate name", "{" + ok + "," + ok + "}", 8, "appears twice"},
      {"unknown dtype", R"({"t":{"dtype":"F7","shape":[2],"data_offsets":[0,2]}})", 2, "unknown or unsupported dtype 'F7'"},
      {"unsupported dtype", R"({"t":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8, "'C64'"},
      {"size mismatch", R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, "needs 12 bytes"},
      {"negative dim", R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8, "non-negative integer"},
      {"float dim", R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", 8, "non-negative integer"},
      {"missing dtype", R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8, "missing \"dtype\""},
      {"one offset", R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8]}})", 8, "[begin, end]"},
      {"reversed offsets", R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8, "end before they begin"},
      {"out of range", R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, "beyond the data buffer"},
      {"overlap", "{" + ok + R"(,"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12, "overlap"},
      {"gap", R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8, "gap of 4 bytes"},
      {"trailing bytes", "{" + ok + "}", 12, "4 bytes after the last tensor"},
      {"metadata not strings", R"({"__metadata__":{"format":1}})", 0, "must be a string"},
      {"overflowing shape", R"({"t":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", 8, "overflow"},
      {"invalid utf-8", "{\"t\xff\":1}", 0, "invalid JSON"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of(c.header, c.data);
    EXPECT_NE(msg.find(c.expected), std::string::npos) << c.what << ": " << msg;
    EXPECT_EQ(msg.rfind("f.safetensors: ", 0), 0u) << c.what << ": the file is named first: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << c.what;
  }
}

TEST(SafetensorsParse, HeaderLengthChecks) {
  EXPECT_NE(error_of("", 0, 0).find("invalid JSON"), std::string::npos);
  EXPECT_NE(error_of("{}", 0, 100).find("runs past the end"), std::string::npos);
  EXPECT_NE(error_of("{}", 0, 2ULL << 30).find("exceeds the safetensors limit"), std::string::npos);
  EXPECT_NE(error_of("{}", 0, ~0ULL - 1).find("exceeds"), std::string::npos);
  try {
    const std::vector<std::byte> tiny(5);
    parse_safetensors_header(tiny, "tiny");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("too short"), std::string::npos);
  }
}

std::vector<NamedTensor> sample_tensors() {
  std::vector<NamedTensor> t;
  t.push_back({"w.bf16", Tensor::from_f32(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3}).to(DType::BF16)});
  t.push_back({"a.f32", Tensor::from_f32(std::vector<float>{-1.5f}, {1})});
  t.push_back({"q.e4m3", Tensor::from_f32(std::vector<float>{0.5f, 448, -3}, {3}).to(DType::F8_E4M3)});
  t.push_back({"s.e8m0", Tensor::from_f32(std::vector<float>{0.25f, 8}, {2}).to(DType::E8M0)});
  t.push_back({"p.f4", Tensor::from_f32(std::vector<float>{1, -2, 3, 6}, {1, 4}).to(DType::E2M1)});
  t.push_back({"i.i64", Tensor::from_f32(std::vector<float>{7, -9}, {2}).to(DType::I64)});
  t.push_back({"b.bool", Tensor::from_f32(std::vector<float>{1, 0, 1}, {3}).to(DType::BOOL)});
  t.push_back({"scalar", Tensor::from_f32(std::vector<float>{3.5f}, {})});
  return t;
}

TEST(SafetensorsWrite, RoundTripKeepsEveryTensor) {
  TempDir dir;
  const auto tensors = sample_tensors();
  write_safetensors(dir.file("m.safetensors"), tensors, {{"producer", "mopt"}});
  const auto f = SafetensorsFile::open(dir.file("m.safetensors"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("producer"), "mopt");
  ASSERT_EQ(f.entries().size(), tensors.size());
  for (const auto& t : tensors) {
    const Tensor back = f.tensor(t.name);
    EXPECT_EQ(back.dtype(), t.tensor.dtype()) << t.name;
    EXPECT_EQ(back.shape(), t.tensor.shape()) << t.name;
    ASSERT_EQ(back.nbytes(), t.tensor.nbytes());
    EXPECT_EQ(std::memcmp(back.bytes().data(), t.tensor.bytes().data(), back.nbytes()), 0) << t.name;
    // Natural alignment within the file.
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(back.bytes().data()) % static_cast<std::uintptr_t>(dtype_alignment(back.dtype())), 0u) << t.name;
  }
  EXPECT_THROW(f.tensor("absent"), Error);
}

TEST(SafetensorsWrite, LayoutFollowsTheReferenceWriter) {
  TempDir dir;
  write_safetensors(dir.file("m.safetensors"), sample_tensors());
  std::ifstream in(dir.file("m.safetensors"), std::ios::binary);
  std::uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  EXPECT_EQ(n % 8, 0u);
  std::string header(n, '\0');
  in.read(header.data(), static_cast<std::streamsize>(n));
  EXPECT_EQ(header.front(), '{');
  const auto j = json::parse(header);
  // 8-byte types first, then 4, 2 and 1 byte, sub-byte last; by name within.
  EXPECT_EQ(j["i.i64"]["data_offsets"][0], 0);
  EXPECT_EQ(j["a.f32"]["data_offsets"][0], 16);
  EXPECT_EQ(j["p.f4"]["dtype"], "F4");
  EXPECT_EQ(j["p.f4"]["shape"], json::array({1, 4}));
  std::uint64_t last_end = 0;
  for (const auto& [k, v] : j.items()) {
    if (k != "__metadata__") last_end = std::max<std::uint64_t>(last_end, v["data_offsets"][1].get<std::uint64_t>());
  }
  EXPECT_EQ(j["p.f4"]["data_offsets"][1], last_end);
}

TEST(SafetensorsWrite, RefusesBadInput) {
  TempDir dir;
  std::vector<NamedTensor> twice = {{"x", Tensor::zeros(DType::F32, {1})}, {"x", Tensor::zeros(DType::F32, {1})}};
  EXPECT_THROW(write_safetensors(dir.file("a.safetensors"), twice), Error);
  std::vector<NamedTensor> int4 = {{"x", Tensor::zeros(DType::INT4, {2})}};
  EXPECT_THROW(write_safetensors(dir.file("b.safetensors"), int4), Error);
  EXPECT_FALSE(std::filesystem::exists(dir.file("a.safetensors")));
  EXPECT_THROW(write_safetensors("/nonexistent-dir/x.safetensors", sample_tensors()), Error);
}

TEST(SafetensorsWrite, FullDiskLeavesNothingBehind) {
  TempDir dir;
  rlimit old{};
  ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
  auto* previous = std::signal(SIGXFSZ, SIG_IGN);
  rlimit small = old;
  small.rlim_cur = 4096;  // writes past 4 KiB fail with EFBIG, as on a full disk
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
  std::vector<NamedTensor> big = {{"big", Tensor::zeros(DType::F32, {1 << 16})}};
  std::string message;
  try {
    write_safetensors(dir.file("big.safetensors"), big);
  } catch (const Error& e) {
    message = e.what();
  }
  setrlimit(RLIMIT_FSIZE, &old);
  std::signal(SIGXFSZ, previous);
  EXPECT_NE(message.find("big.safetensors: write failed"), std::string::npos) << message;
  EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "the temporary was left behind";
}

TEST(SafetensorsWrite, ShardsWithIndex) {
  TempDir dir;
  std::vector<NamedTensor> tensors;
  for (int i = 0; i < 5; ++i) {
    std::vector<float> v(100, static_cast<float>(i));
    tensors.push_back({"layer." + std::to_string(i), Tensor::from_f32(v, {100})});
  }
  const auto files = write_safetensors_sharded(dir.path().string(), tensors, 900);  // two 400-byte tensors a shard
  EXPECT_EQ(files, (std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                             "model-00003-of-00003.safetensors", "model.safetensors.index.json"}));
  std::ifstream in(dir.file("model.safetensors.index.json"));
  const auto index = json::parse(in);
  EXPECT_EQ(index["metadata"]["total_size"], 2000);
  EXPECT_EQ(index["weight_map"]["layer.4"], "model-00003-of-00003.safetensors");
  const auto store = TensorStore::open_dir(dir.path().string());
  EXPECT_EQ(store.size(), 5u);
  EXPECT_EQ(store.tensor("layer.3").to_f32()[99], 3.0f);

  TempDir single;
  EXPECT_EQ(write_safetensors_sharded(single.path().string(), tensors, 1 << 20), (std::vector<std::string>{"model.safetensors"}));
}

TEST(SafetensorsRead, FileWrittenByTransformers) {
  const auto f = SafetensorsFile::open(testing::data_path("hf/llama/model.safetensors"));
  const auto* e = f.find("model.embed_tokens.weight");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->dtype, DType::BF16);
  EXPECT_EQ(f.metadata().at("format"), "pt");
  // Every weight decodes to finite values, and they are not all zero.
  for (const auto& entry : f.entries()) {
    const auto values = f.tensor(entry.name).to_f32();
    bool any_nonzero = false;
    for (const float v : values) {
      ASSERT_TRUE(std::isfinite(v)) << entry.name;
      any_nonzero |= v != 0.0f;
    }
    EXPECT_TRUE(any_nonzero) << entry.name;
  }
}

}  // namespace
}  // namespace mopt::io
