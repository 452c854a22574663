#include "core/dtype.h"

#include <gtest/gtest.h>

#include "core/error.h"

namespace mopt {
namespace {

TEST(DType, SafetensorsNamesRoundTrip) {
  int with_name = 0;
  for (const DType t : kAllDTypes) {
    const auto name = dtype_safetensors_name(t);
    if (!name) continue;
    ++with_name;
    EXPECT_EQ(dtype_from_safetensors_name(*name), t) << *name;
  }
  EXPECT_EQ(with_name, 17);  // every type but INT4
  EXPECT_FALSE(dtype_safetensors_name(DType::INT4).has_value());
  EXPECT_EQ(dtype_from_safetensors_name("F8_E4M3"), DType::F8_E4M3);
  EXPECT_EQ(dtype_from_safetensors_name("F8_E8M0"), DType::E8M0);
  EXPECT_EQ(dtype_from_safetensors_name("F4"), DType::E2M1);
  EXPECT_FALSE(dtype_from_safetensors_name("F8_E4M3FNUZ").has_value());
  EXPECT_FALSE(dtype_from_safetensors_name("C64").has_value());
  EXPECT_FALSE(dtype_from_safetensors_name("bf16").has_value());  // case matters
}

TEST(DType, SizesAndKinds) {
  EXPECT_EQ(dtype_bits(DType::F32), 32);
  EXPECT_EQ(dtype_bits(DType::BF16), 16);
  EXPECT_EQ(dtype_bits(DType::F8_E4M3), 8);
  EXPECT_EQ(dtype_bits(DType::E2M1), 4);
  EXPECT_EQ(dtype_bits(DType::INT4), 4);
  EXPECT_EQ(dtype_bits(DType::I64), 64);
  EXPECT_EQ(dtype_alignment(DType::F64), 8);
  EXPECT_EQ(dtype_alignment(DType::E2M1), 1);
  EXPECT_TRUE(dtype_is_float(DType::E8M0));
  EXPECT_FALSE(dtype_is_float(DType::INT4));
  EXPECT_TRUE(dtype_is_packed(DType::INT4));
  EXPECT_FALSE(dtype_is_packed(DType::I8));
  EXPECT_EQ(dtype_name(DType::F8_E5M2), "f8_e5m2");
}

TEST(DType, StorageBytes) {
  EXPECT_EQ(dtype_storage_bytes(DType::F32, 10), 40u);
  EXPECT_EQ(dtype_storage_bytes(DType::BF16, 3), 6u);
  EXPECT_EQ(dtype_storage_bytes(DType::E2M1, 6), 3u);
  EXPECT_EQ(dtype_storage_bytes(DType::INT4, 0), 0u);
  EXPECT_THROW(dtype_storage_bytes(DType::INT4, 7), Error);
}

}  // namespace
}  // namespace mopt
