#include "core/dtype.h"

#include "core/error.h"

namespace mopt {

namespace {

struct DTypeInfo {
  DType type;
  int bits;
  int alignment;
  bool is_float;
  std::string_view name;
  std::string_view safetensors;  // empty: no safetensors spelling
};

constexpr DTypeInfo kInfo[] = {
    {DType::F64, 64, 8, true, "f64", "F64"},
    {DType::F32, 32, 4, true, "f32", "F32"},
    {DType::F16, 16, 2, true, "f16", "F16"},
    {DType::BF16, 16, 2, true, "bf16", "BF16"},
    {DType::F8_E4M3, 8, 1, true, "f8_e4m3", "F8_E4M3"},
    {DType::F8_E5M2, 8, 1, true, "f8_e5m2", "F8_E5M2"},
    {DType::E8M0, 8, 1, true, "e8m0", "F8_E8M0"},
    {DType::E2M1, 4, 1, true, "e2m1", "F4"},
    {DType::INT4, 4, 1, false, "int4", ""},
    {DType::I8, 8, 1, false, "i8", "I8"},
    {DType::U8, 8, 1, false, "u8", "U8"},
    {DType::I16, 16, 2, false, "i16", "I16"},
    {DType::U16, 16, 2, false, "u16", "U16"},
    {DType::I32, 32, 4, false, "i32", "I32"},
    {DType::U32, 32, 4, false, "u32", "U32"},
    {DType::I64, 64, 8, false, "i64", "I64"},
    {DType::U64, 64, 8, false, "u64", "U64"},
    {DType::BOOL, 8, 1, false, "bool", "BOOL"},
};

const DTypeInfo& info(DType t) {
  for (const auto& i : kInfo) {
    if (i.type == t) return i;
  }
  fail("unknown dtype code {}", static_cast<int>(t));
}

}  // namespace

int dtype_bits(DType t) { return info(t).bits; }
int dtype_alignment(DType t) { return info(t).alignment; }
bool dtype_is_float(DType t) { return info(t).is_float; }
bool dtype_is_packed(DType t) { return info(t).bits == 4; }
std::string_view dtype_name(DType t) { return info(t).name; }

std::optional<std::string_view> dtype_safetensors_name(DType t) {
  const auto& i = info(t);
  if (i.safetensors.empty()) return std::nullopt;
  return i.safetensors;
}

std::optional<DType> dtype_from_safetensors_name(std::string_view name) {
  for (const auto& i : kInfo) {
    if (!i.safetensors.empty() && i.safetensors == name) return i.type;
  }
  return std::nullopt;
}

std::size_t dtype_storage_bytes(DType t, std::uint64_t count) {
  const auto bits = static_cast<std::uint64_t>(dtype_bits(t));
  if (bits == 4) {
    if (count % 2 != 0) fail("{} packs two elements per byte, but the element count {} is odd", dtype_name(t), count);
    return static_cast<std::size_t>(count / 2);
  }
  return static_cast<std::size_t>(count * (bits / 8));
}

}  // namespace mopt
