// Vectorized bulk conversions, one namespace per instruction set. Each file is
// compiled with the flags of its instruction set and only called after
// cpu_features() says the CPU has them. convert.cpp dispatches.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mopt::avx2 {
void convert_bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t count);
void convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count);
void convert_f16_to_f32(const std::uint16_t* src, float* dst, std::size_t count);
void convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count);
void convert_e4m3_to_f32(const std::uint8_t* src, float* dst, std::size_t count);
void convert_f32_to_e4m3(const float* src, std::uint8_t* dst, std::size_t count);
}  // namespace mopt::avx2
