// Element types mopt reads, computes in and writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace mopt {

enum class DType : std::uint8_t {
  F64,
  F32,
  F16,
  BF16,
  F8_E4M3,  // OCP "fn": bias 7, max 448, NaN 0x7F/0xFF, no infinity
  F8_E5M2,  // IEEE-like: bias 15, max 57344, infinities and NaNs
  E8M0,     // unsigned power of two 2^(e-127), 0xFF is NaN
  E2M1,     // FP4, two per byte, even element in the low nibble
  INT4,     // signed 4-bit integer, two per byte, even element in the low nibble
  I8,
  U8,
  I16,
  U16,
  I32,
  U32,
  I64,
  U64,
  BOOL,
};

inline constexpr DType kAllDTypes[] = {
    DType::F64,  DType::F32, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2,
    DType::E8M0, DType::E2M1, DType::INT4, DType::I8,  DType::U8,      DType::I16,
    DType::U16,  DType::I32, DType::U32, DType::I64,  DType::U64,     DType::BOOL,
};

// Bits one element occupies in memory (4 for the packed formats).
int dtype_bits(DType t);
// Natural alignment in bytes of one element (1 for the packed formats).
int dtype_alignment(DType t);
bool dtype_is_float(DType t);   // any floating-point format, including E8M0 and E2M1
bool dtype_is_packed(DType t);  // two elements per byte

// Our name for the type ("f32", "bf16", "f8_e4m3", "int4", ...).
std::string_view dtype_name(DType t);

// The safetensors spelling ("F32", "BF16", "F8_E4M3", "F4", ...). INT4 has none:
// engines store packed int4 as I32/U8 words with their own conventions.
std::optional<std::string_view> dtype_safetensors_name(DType t);
std::optional<DType> dtype_from_safetensors_name(std::string_view name);

// Bytes taken by `count` elements; throws Error if a packed type gets an odd count.
std::size_t dtype_storage_bytes(DType t, std::uint64_t count);

}  // namespace mopt
