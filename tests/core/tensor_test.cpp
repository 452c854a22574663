#include "core/tensor.h"

#include <gtest/gtest.h>

#include <fstream>
#include <vector>

#include "core/convert.h"
#include "core/error.h"
#include "support/temp_dir.h"

namespace mopt {
namespace {

TEST(Tensor, ZerosAreOwnedAlignedAndZero) {
  Tensor t = Tensor::zeros(DType::BF16, {3, 5});
  EXPECT_EQ(t.numel(), 15u);
  EXPECT_EQ(t.nbytes(), 30u);
  EXPECT_EQ(t.rank(), 2u);
  EXPECT_EQ(t.dim(1), 5);
  EXPECT_FALSE(t.is_view());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.bytes().data()) % 64, 0u);
  for (const auto b : t.bytes()) EXPECT_EQ(b, std::byte{0});
}

TEST(Tensor, ScalarHasOneElement) {
  Tensor t = Tensor::zeros(DType::F32, {});
  EXPECT_EQ(t.numel(), 1u);
  EXPECT_EQ(shape_string(t.shape()), "[]");
}

TEST(Tensor, ConversionRoundTripThroughBf16) {
  const std::vector<float> v = {1.0f, -2.5f, 3.140625f, 1e-3f, 65504.0f, -0.0f};
  const Tensor f = Tensor::from_f32(v, {2, 3});
  const Tensor b = f.to(DType::BF16);
  EXPECT_EQ(b.dtype(), DType::BF16);
  EXPECT_EQ(b.shape(), (Shape{2, 3}));
  const auto back = b.to_f32();
  for (std::size_t i = 0; i < v.size(); ++i) EXPECT_EQ(back[i], bf16_to_f32(f32_to_bf16(v[i])));
  EXPECT_EQ(b.data<std::uint16_t>()[0], 0x3F80);
}

TEST(Tensor, PackedTypesConvert) {
  const std::vector<float> v = {0.5f, -6.0f, 1.4f, 7.0f};
  const Tensor q = Tensor::from_f32(v, {4}).to(DType::E2M1);
  EXPECT_EQ(q.nbytes(), 2u);
  EXPECT_EQ(q.to_f32(), (std::vector<float>{0.5f, -6.0f, 1.5f, 6.0f}));
  EXPECT_THROW(Tensor::zeros(DType::INT4, {3}), Error);
}

TEST(Tensor, TypedAccessChecksElementSize) {
  Tensor t = Tensor::zeros(DType::F32, {4});
  t.mutable_data<float>()[2] = 7.0f;
  EXPECT_EQ(t.data<float>()[2], 7.0f);
  EXPECT_THROW(t.data<std::uint16_t>(), Error);
}

TEST(Tensor, CopiesShareCloneDoesNot) {
  Tensor a = Tensor::zeros(DType::F32, {2});
  Tensor shared = a;
  Tensor deep = a.clone();
  a.mutable_data<float>()[0] = 1.0f;
  EXPECT_EQ(shared.data<float>()[0], 1.0f);
  EXPECT_EQ(deep.data<float>()[0], 0.0f);
}

TEST(Tensor, ReshapeKeepsElementCount) {
  const Tensor t = Tensor::zeros(DType::F32, {2, 6});
  EXPECT_EQ(t.reshaped({3, 4}).shape(), (Shape{3, 4}));
  EXPECT_THROW(t.reshaped({5}), Error);
}

TEST(Tensor, ViewIntoMappedFile) {
  testing::TempDir dir;
  const std::string path = dir.file("data.bin");
  {
    std::ofstream out(path, std::ios::binary);
    const float values[] = {0.0f, 1.0f, 2.0f, 3.0f};
    out.write(reinterpret_cast<const char*>(values), sizeof values);
  }
  auto file = MappedFile::open(path);
  Tensor v = Tensor::view(file, 4, DType::F32, {3});
  EXPECT_TRUE(v.is_view());
  EXPECT_EQ(v.to_f32(), (std::vector<float>{1.0f, 2.0f, 3.0f}));
  EXPECT_THROW(v.mutable_bytes(), Error);
  EXPECT_THROW(Tensor::view(file, 8, DType::F32, {3}), Error);  // runs past the end
  EXPECT_THROW(Tensor::view(file, 100, DType::F32, {0}), Error);
  file.reset();
  EXPECT_EQ(v.to_f32()[2], 3.0f);  // the view keeps the mapping alive
}

TEST(Tensor, ShapeErrors) {
  EXPECT_THROW(shape_numel({-1, 3}), Error);
  EXPECT_THROW(shape_numel({1LL << 40, 1LL << 40}), Error);
  EXPECT_EQ(shape_numel({0, 5}), 0u);
  EXPECT_THROW(Tensor::from_f32(std::vector<float>(3), {2, 2}), Error);
}

TEST(MappedFile, MissingFileNamesIt) {
  try {
    MappedFile::open("/nonexistent/mopt/file.bin");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/mopt/file.bin"), std::string::npos);
  }
}

}  // namespace
}  // namespace mopt
