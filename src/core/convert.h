// Scalar conversions between f32 and every element format, and the bulk
// conversions the rest of mopt uses. The scalar functions are the definition;
// the bulk ones are vectorized where the CPU allows and are tested against them.
//
// Rounding is round-to-nearest, ties to even, everywhere. Overflow:
//  - F8_E4M3, F8_E5M2, E2M1, E8M0 and the integers saturate to the largest
//    finite value (what quantizers and exporters need; CUDA's __NV_SATFINITE).
//    F8_E5M2 can also be asked not to saturate (overflow becomes infinity).
//  - F16 and BF16 overflow to infinity like IEEE casts in PyTorch and the
//    hardware do: they are storage types whose bits must equal what those write.
// NaN: F16, BF16 and FP8 keep the sign and become a quiet NaN; E2M1 has no NaN
// and turns it into +6 (CUDA's rule); E8M0 gives 0xFF; integers give 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "core/dtype.h"

namespace mopt {

// ---- 16-bit floats ----
float bf16_to_f32(std::uint16_t code);
std::uint16_t f32_to_bf16(float x);
float f16_to_f32(std::uint16_t code);
std::uint16_t f32_to_f16(float x);

// ---- 8-bit floats ----
enum class Saturation { finite, none };
inline constexpr float kE4M3Max = 448.0f;
inline constexpr float kE5M2Max = 57344.0f;
float e4m3_to_f32(std::uint8_t code);
std::uint8_t f32_to_e4m3(float x);
float e5m2_to_f32(std::uint8_t code);
std::uint8_t f32_to_e5m2(float x, Saturation saturation = Saturation::finite);

// E8M0: 2^(code-127); 0xFF is NaN. No sign and no zero: zero, negative and tiny
// values saturate to 2^-127, huge ones to 2^127.
// `toward_zero` and `up` are CUDA's cudaRoundZero / cudaRoundPosInf on |x| (the
// OCP MX rule floors the exponent, ModelOpt's MX quantizers take the ceiling);
// `nearest_even` rounds the significand to one bit, ties to an even exponent.
enum class E8M0Rounding { toward_zero, up, nearest_even };
float e8m0_to_f32(std::uint8_t code);
std::uint8_t f32_to_e8m0(float x, E8M0Rounding rounding = E8M0Rounding::nearest_even);

// ---- 4-bit elements (the code is in the low nibble) ----
inline constexpr float kE2M1Max = 6.0f;
// NVFP4's two-level scale: a global amax maps to kE2M1Max * kE4M3Max (block scales in E4M3 over E2M1
// elements), so its stored scale is amax / 2688.
inline constexpr float kNvfp4AmaxBound = kE2M1Max * kE4M3Max;
// An amax at or below 2^-24 (the smallest f16 subnormal) counts as none: the quantizers take it as 1
// (or give zeros), as the reference's do, rather than divide by it.
inline constexpr float kTinyAmax = 0x1p-24f;
float e2m1_to_f32(std::uint8_t code);
std::uint8_t f32_to_e2m1(float x);
float int4_to_f32(std::uint8_t code);  // two's complement nibble, -8..7
std::uint8_t f32_to_int4(float x);    // nibble code of the nearest value in -8..7

// Packing of 4-bit codes, two per byte, element 2i in the low nibble of byte i.
void pack_nibbles(std::span<const std::uint8_t> codes, std::span<std::uint8_t> packed);
void unpack_nibbles(std::span<const std::uint8_t> packed, std::span<std::uint8_t> codes);

// ---- integers: round half to even, saturate to the type's range, NaN -> 0 ----
template <typename Int>
Int f32_to_int(float x);

// ---- bulk ----
// `count` counts elements; for the packed types it must be even.
void convert_to_f32(DType type, const void* src, float* dst, std::size_t count);
void convert_from_f32(DType type, const float* src, void* dst, std::size_t count);

// The hot conversions, dispatched to the best version for this CPU.
void convert_bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t count);
void convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count);
void convert_f16_to_f32(const std::uint16_t* src, float* dst, std::size_t count);
void convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count);
void convert_e4m3_to_f32(const std::uint8_t* src, float* dst, std::size_t count);
void convert_f32_to_e4m3(const float* src, std::uint8_t* dst, std::size_t count);

// The plain loops over the scalar functions: the reference for the fast versions.
namespace ref {
void convert_bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t count);
void convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count);
void convert_f16_to_f32(const std::uint16_t* src, float* dst, std::size_t count);
void convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count);
void convert_e4m3_to_f32(const std::uint8_t* src, float* dst, std::size_t count);
void convert_f32_to_e4m3(const float* src, std::uint8_t* dst, std::size_t count);
}  // namespace ref

// Name of the version the dispatcher picked ("avx2" or "scalar").
const char* convert_isa();

}  // namespace mopt
