#include "core/convert.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/convert_simd.h"
#include "core/cpu_features.h"
#include "core/error.h"

namespace mopt {

namespace {

// A small binary floating-point format: sign, `exp_bits` of exponent with
// `bias`, `man_bits` of mantissa, subnormals when the exponent field is 0.
struct MiniFloat {
  int exp_bits;
  int man_bits;
  int bias;
  bool ieee_special;         // top exponent holds infinity (mantissa 0) and NaNs
  std::uint32_t max_finite;  // magnitude code of the largest finite value
  std::uint32_t nan_code;    // magnitude code written for NaN
};

constexpr MiniFloat kF16{5, 10, 15, true, 0x7BFF, 0x7E00};
constexpr MiniFloat kE4M3{4, 3, 7, false, 0x7E, 0x7F};
constexpr MiniFloat kE5M2{5, 2, 15, true, 0x7B, 0x7F};
constexpr MiniFloat kE2M1{2, 1, 1, false, 0x7, 0x7};

float decode_minifloat(const MiniFloat& f, std::uint32_t code) {
  const std::uint32_t sign = code >> (f.exp_bits + f.man_bits);
  const std::uint32_t exp_field = (code >> f.man_bits) & ((1u << f.exp_bits) - 1);
  const std::uint32_t man = code & ((1u << f.man_bits) - 1);
  const std::uint32_t magnitude = code & ((1u << (f.exp_bits + f.man_bits)) - 1);
  float value;
  if (f.ieee_special && exp_field == (1u << f.exp_bits) - 1) {
    value = man == 0 ? std::numeric_limits<float>::infinity() : std::numeric_limits<float>::quiet_NaN();
  } else if (!f.ieee_special && magnitude > f.max_finite) {
    value = std::numeric_limits<float>::quiet_NaN();
  } else if (exp_field == 0) {
    value = std::ldexp(static_cast<float>(man), 1 - f.bias - f.man_bits);
  } else {
    value = std::ldexp(static_cast<float>(man + (1u << f.man_bits)), static_cast<int>(exp_field) - f.bias - f.man_bits);
  }
  return sign ? -value : value;
}

// Round-to-nearest-even encoding of |x| (finite, non-NaN) into the magnitude
// code of `f`; the result may exceed max_finite when |x| is beyond the range.
std::uint32_t encode_magnitude(const MiniFloat& f, float a) {
  const int min_normal_exp = 1 - f.bias;
  if (a < std::ldexp(1.0f, min_normal_exp)) {
    // Subnormal range: a multiple of the smallest subnormal. The scaling is by a
    // power of two, so exact; nearbyint rounds half to even. A result of
    // 2^man_bits is the smallest normal, which is the right code as it stands.
    const float q = std::nearbyint(std::ldexp(a, f.man_bits - min_normal_exp));
    return static_cast<std::uint32_t>(q);
  }
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(a);
  int exponent = static_cast<int>(bits >> 23) - 127;
  const std::uint32_t fraction = bits & 0x7FFFFFu;
  const int shift = 23 - f.man_bits;
  std::uint32_t man = fraction >> shift;
  const std::uint32_t rest = fraction & ((1u << shift) - 1);
  const std::uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (man & 1u))) ++man;
  if (man == (1u << f.man_bits)) {
    man = 0;
    ++exponent;
  }
  const int exp_field = exponent + f.bias;
  if (exp_field >= (1 << f.exp_bits)) return std::numeric_limits<std::uint32_t>::max();
  return (static_cast<std::uint32_t>(exp_field) << f.man_bits) | man;
}

std::uint32_t encode_minifloat(const MiniFloat& f, float x, bool saturate) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const std::uint32_t sign = (bits >> 31) << (f.exp_bits + f.man_bits);
  const float a = std::fabs(x);
  if (std::isnan(a)) return sign | f.nan_code;
  std::uint32_t magnitude;
  if (std::isinf(a)) {
    magnitude = std::numeric_limits<std::uint32_t>::max();
  } else {
    magnitude = encode_magnitude(f, a);
  }
  if (magnitude > f.max_finite) {
    if (saturate || !f.ieee_special) {
      magnitude = f.max_finite;
    } else {
      magnitude = ((1u << f.exp_bits) - 1) << f.man_bits;  // infinity
    }
  }
  return sign | magnitude;
}

template <typename T, std::size_t N>
std::array<float, N> make_table(T decode) {
  std::array<float, N> table{};
  for (std::size_t i = 0; i < N; ++i) table[i] = decode(static_cast<std::uint8_t>(i));
  return table;
}

}  // namespace

// ---------------------------------------------------------------------------
float bf16_to_f32(std::uint16_t code) { return std::bit_cast<float>(static_cast<std::uint32_t>(code) << 16); }

std::uint16_t f32_to_bf16(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  const std::uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<std::uint16_t>((bits + rounding) >> 16);
}

float f16_to_f32(std::uint16_t code) {
  if ((code & 0x7C00u) == 0x7C00u && (code & 0x03FFu) != 0) {
    // NaN: keep sign and payload, set the quiet bit, as the F16C instruction does.
    const std::uint32_t sign = static_cast<std::uint32_t>(code & 0x8000u) << 16;
    return std::bit_cast<float>(sign | 0x7FC00000u | (static_cast<std::uint32_t>(code & 0x03FFu) << 13));
  }
  return decode_minifloat(kF16, code);
}
std::uint16_t f32_to_f16(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    // Keep the sign and the top of the payload, set the quiet bit.
    return static_cast<std::uint16_t>(((bits >> 16) & 0x8000u) | 0x7E00u | ((bits >> 13) & 0x01FFu));
  }
  return static_cast<std::uint16_t>(encode_minifloat(kF16, x, false));
}

float e4m3_to_f32(std::uint8_t code) {
  static const auto table = make_table<float (*)(std::uint8_t), 256>(
      [](std::uint8_t c) { return decode_minifloat(kE4M3, c); });
  return table[code];
}
std::uint8_t f32_to_e4m3(float x) { return static_cast<std::uint8_t>(encode_minifloat(kE4M3, x, true)); }

float e5m2_to_f32(std::uint8_t code) {
  static const auto table = make_table<float (*)(std::uint8_t), 256>(
      [](std::uint8_t c) { return decode_minifloat(kE5M2, c); });
  return table[code];
}
std::uint8_t f32_to_e5m2(float x, Saturation saturation) {
  return static_cast<std::uint8_t>(encode_minifloat(kE5M2, x, saturation == Saturation::finite));
}

float e8m0_to_f32(std::uint8_t code) {
  if (code == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(code) - 127);
}

std::uint8_t f32_to_e8m0(float x, E8M0Rounding rounding) {
  if (std::isnan(x)) return 0xFF;
  const float a = std::fabs(x);
  if (std::isinf(a)) return 0xFE;
  if (a < std::numeric_limits<float>::min()) {
    // Subnormal f32 (or zero): every such value is below 2^-126, so it lands on
    // 2^-127 unless rounding up or to nearest takes it to 2^-126.
    if (a == 0.0f) return 0x00;
    const float lowest = std::ldexp(1.0f, -127);
    switch (rounding) {
      case E8M0Rounding::toward_zero:
        return 0x00;
      case E8M0Rounding::up:
        return a > lowest ? 0x01 : 0x00;
      case E8M0Rounding::nearest_even:
        // Midpoint between 2^-127 and 2^-126 is 1.5 * 2^-127; a tie goes to the even code 0.
        return a > 1.5f * lowest ? 0x01 : 0x00;
    }
  }
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(a);
  std::uint32_t code = bits >> 23;  // biased exponent: E8M0 has the same bias
  const std::uint32_t fraction = bits & 0x7FFFFFu;
  switch (rounding) {
    case E8M0Rounding::toward_zero:
      break;
    case E8M0Rounding::up:
      if (fraction != 0) ++code;
      break;
    case E8M0Rounding::nearest_even:
      if (fraction > 0x400000u || (fraction == 0x400000u && (code & 1u))) ++code;
      break;
  }
  return static_cast<std::uint8_t>(code > 0xFE ? 0xFE : code);
}

float e2m1_to_f32(std::uint8_t code) {
  static constexpr float kValues[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  return kValues[code & 0xF];
}
std::uint8_t f32_to_e2m1(float x) {
  if (std::isnan(x)) return 0x7;  // as CUDA: NaN becomes +6
  return static_cast<std::uint8_t>(encode_minifloat(kE2M1, x, true));
}

float int4_to_f32(std::uint8_t code) {
  const int v = static_cast<int>(code & 0xF);
  return static_cast<float>(v >= 8 ? v - 16 : v);
}
std::uint8_t f32_to_int4(float x) {
  if (std::isnan(x)) return 0;
  const float r = std::nearbyint(std::fmin(std::fmax(x, -8.0f), 7.0f));
  return static_cast<std::uint8_t>(static_cast<int>(r) & 0xF);
}

void pack_nibbles(std::span<const std::uint8_t> codes, std::span<std::uint8_t> packed) {
  if (codes.size() % 2 != 0 || packed.size() != codes.size() / 2) {
    fail("pack_nibbles: {} codes do not fill {} bytes", codes.size(), packed.size());
  }
  for (std::size_t i = 0; i < packed.size(); ++i) {
    packed[i] = static_cast<std::uint8_t>((codes[2 * i] & 0xF) | ((codes[2 * i + 1] & 0xF) << 4));
  }
}

void unpack_nibbles(std::span<const std::uint8_t> packed, std::span<std::uint8_t> codes) {
  if (codes.size() != packed.size() * 2) fail("unpack_nibbles: {} bytes do not fill {} codes", packed.size(), codes.size());
  for (std::size_t i = 0; i < packed.size(); ++i) {
    codes[2 * i] = packed[i] & 0xF;
    codes[2 * i + 1] = static_cast<std::uint8_t>(packed[i] >> 4);
  }
}

template <typename Int>
Int f32_to_int(float x) {
  if (std::isnan(x)) return 0;
  constexpr double lo = static_cast<double>(std::numeric_limits<Int>::min());
  constexpr double hi = static_cast<double>(std::numeric_limits<Int>::max());
  const double r = std::nearbyint(static_cast<double>(x));
  if (r <= lo) return std::numeric_limits<Int>::min();
  if (r >= hi) return std::numeric_limits<Int>::max();
  return static_cast<Int>(r);
}

template std::int8_t f32_to_int<std::int8_t>(float);
template std::uint8_t f32_to_int<std::uint8_t>(float);
template std::int16_t f32_to_int<std::int16_t>(float);
template std::uint16_t f32_to_int<std::uint16_t>(float);
template std::int32_t f32_to_int<std::int32_t>(float);
template std::uint32_t f32_to_int<std::uint32_t>(float);
template std::int64_t f32_to_int<std::int64_t>(float);
template std::uint64_t f32_to_int<std::uint64_t>(float);

// ---------------------------------------------------------------------------
namespace ref {
void convert_bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) dst[i] = bf16_to_f32(src[i]);
}
void convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) dst[i] = f32_to_bf16(src[i]);
}
void convert_f16_to_f32(const std::uint16_t* src, float* dst, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) dst[i] = f16_to_f32(src[i]);
}
void convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) dst[i] = f32_to_f16(src[i]);
}
void convert_e4m3_to_f32(const std::uint8_t* src, float* dst, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) dst[i] = e4m3_to_f32(src[i]);
}
void convert_f32_to_e4m3(const float* src, std::uint8_t* dst, std::size_t count) {
  for (std::size_t i = 0; i < count; ++i) dst[i] = f32_to_e4m3(src[i]);
}
}  // namespace ref

namespace {

struct ConvertKernels {
  const char* isa;
  void (*bf16_to_f32)(const std::uint16_t*, float*, std::size_t);
  void (*f32_to_bf16)(const float*, std::uint16_t*, std::size_t);
  void (*f16_to_f32)(const std::uint16_t*, float*, std::size_t);
  void (*f32_to_f16)(const float*, std::uint16_t*, std::size_t);
  void (*e4m3_to_f32)(const std::uint8_t*, float*, std::size_t);
  void (*f32_to_e4m3)(const float*, std::uint8_t*, std::size_t);
};

const ConvertKernels& kernels() {
  static const ConvertKernels chosen = [] {
    if (avx2_kernels_available()) {
      return ConvertKernels{"avx2",
                            avx2::convert_bf16_to_f32,
                            avx2::convert_f32_to_bf16,
                            avx2::convert_f16_to_f32,
                            avx2::convert_f32_to_f16,
                            avx2::convert_e4m3_to_f32,
                            avx2::convert_f32_to_e4m3};
    }
    return ConvertKernels{"scalar",
                          ref::convert_bf16_to_f32,
                          ref::convert_f32_to_bf16,
                          ref::convert_f16_to_f32,
                          ref::convert_f32_to_f16,
                          ref::convert_e4m3_to_f32,
                          ref::convert_f32_to_e4m3};
  }();
  return chosen;
}

}  // namespace

const char* convert_isa() { return kernels().isa; }

void convert_bf16_to_f32(const std::uint16_t* src, float* dst, std::size_t count) {
  kernels().bf16_to_f32(src, dst, count);
}
void convert_f32_to_bf16(const float* src, std::uint16_t* dst, std::size_t count) {
  kernels().f32_to_bf16(src, dst, count);
}
void convert_f16_to_f32(const std::uint16_t* src, float* dst, std::size_t count) {
  kernels().f16_to_f32(src, dst, count);
}
void convert_f32_to_f16(const float* src, std::uint16_t* dst, std::size_t count) {
  kernels().f32_to_f16(src, dst, count);
}
void convert_e4m3_to_f32(const std::uint8_t* src, float* dst, std::size_t count) {
  kernels().e4m3_to_f32(src, dst, count);
}
void convert_f32_to_e4m3(const float* src, std::uint8_t* dst, std::size_t count) {
  kernels().f32_to_e4m3(src, dst, count);
}

// ---------------------------------------------------------------------------
namespace {

template <typename T, typename F>
void each_to_f32(const void* src, float* dst, std::size_t count, F decode) {
  const auto* s = static_cast<const T*>(src);
  for (std::size_t i = 0; i < count; ++i) dst[i] = decode(s[i]);
}

template <typename T, typename F>
void each_from_f32(const float* src, void* dst, std::size_t count, F encode) {
  auto* d = static_cast<T*>(dst);
  for (std::size_t i = 0; i < count; ++i) d[i] = encode(src[i]);
}

template <typename Int>
void ints_to_f32(const void* src, float* dst, std::size_t count) {
  each_to_f32<Int>(src, dst, count, [](Int v) { return static_cast<float>(v); });
}

template <typename Int>
void ints_from_f32(const float* src, void* dst, std::size_t count) {
  each_from_f32<Int>(src, dst, count, [](float v) { return f32_to_int<Int>(v); });
}

void nibbles_to_f32(const void* src, float* dst, std::size_t count, float (*decode)(std::uint8_t)) {
  if (count % 2 != 0) fail("packed 4-bit data needs an even element count, got {}", count);
  const auto* s = static_cast<const std::uint8_t*>(src);
  for (std::size_t i = 0; i < count / 2; ++i) {
    dst[2 * i] = decode(s[i] & 0xF);
    dst[2 * i + 1] = decode(static_cast<std::uint8_t>(s[i] >> 4));
  }
}

void nibbles_from_f32(const float* src, void* dst, std::size_t count, std::uint8_t (*encode)(float)) {
  if (count % 2 != 0) fail("packed 4-bit data needs an even element count, got {}", count);
  auto* d = static_cast<std::uint8_t*>(dst);
  for (std::size_t i = 0; i < count / 2; ++i) {
    d[i] = static_cast<std::uint8_t>((encode(src[2 * i]) & 0xF) | ((encode(src[2 * i + 1]) & 0xF) << 4));
  }
}

}  // namespace

void convert_to_f32(DType type, const void* src, float* dst, std::size_t count) {
  switch (type) {
    case DType::F64: return each_to_f32<double>(src, dst, count, [](double v) { return static_cast<float>(v); });
    case DType::F32: std::memcpy(dst, src, count * sizeof(float)); return;
    case DType::F16: return convert_f16_to_f32(static_cast<const std::uint16_t*>(src), dst, count);
    case DType::BF16: return convert_bf16_to_f32(static_cast<const std::uint16_t*>(src), dst, count);
    case DType::F8_E4M3: return convert_e4m3_to_f32(static_cast<const std::uint8_t*>(src), dst, count);
    case DType::F8_E5M2: return each_to_f32<std::uint8_t>(src, dst, count, e5m2_to_f32);
    case DType::E8M0: return each_to_f32<std::uint8_t>(src, dst, count, e8m0_to_f32);
    case DType::E2M1: return nibbles_to_f32(src, dst, count, e2m1_to_f32);
    case DType::INT4: return nibbles_to_f32(src, dst, count, int4_to_f32);
    case DType::I8: return ints_to_f32<std::int8_t>(src, dst, count);
    case DType::U8: return ints_to_f32<std::uint8_t>(src, dst, count);
    case DType::I16: return ints_to_f32<std::int16_t>(src, dst, count);
    case DType::U16: return ints_to_f32<std::uint16_t>(src, dst, count);
    case DType::I32: return ints_to_f32<std::int32_t>(src, dst, count);
    case DType::U32: return ints_to_f32<std::uint32_t>(src, dst, count);
    case DType::I64: return ints_to_f32<std::int64_t>(src, dst, count);
    case DType::U64: return ints_to_f32<std::uint64_t>(src, dst, count);
    case DType::BOOL:
      return each_to_f32<std::uint8_t>(src, dst, count, [](std::uint8_t v) { return v ? 1.0f : 0.0f; });
  }
  fail("convert_to_f32: unknown dtype code {}", static_cast<int>(type));
}

void convert_from_f32(DType type, const float* src, void* dst, std::size_t count) {
  switch (type) {
    case DType::F64: return each_from_f32<double>(src, dst, count, [](float v) { return static_cast<double>(v); });
    case DType::F32: std::memcpy(dst, src, count * sizeof(float)); return;
    case DType::F16: return convert_f32_to_f16(src, static_cast<std::uint16_t*>(dst), count);
    case DType::BF16: return convert_f32_to_bf16(src, static_cast<std::uint16_t*>(dst), count);
    case DType::F8_E4M3: return convert_f32_to_e4m3(src, static_cast<std::uint8_t*>(dst), count);
    case DType::F8_E5M2:
      return each_from_f32<std::uint8_t>(src, dst, count, [](float v) { return f32_to_e5m2(v); });
    case DType::E8M0:
      return each_from_f32<std::uint8_t>(src, dst, count, [](float v) { return f32_to_e8m0(v); });
    case DType::E2M1: return nibbles_from_f32(src, dst, count, f32_to_e2m1);
    case DType::INT4: return nibbles_from_f32(src, dst, count, f32_to_int4);
    case DType::I8: return ints_from_f32<std::int8_t>(src, dst, count);
    case DType::U8: return ints_from_f32<std::uint8_t>(src, dst, count);
    case DType::I16: return ints_from_f32<std::int16_t>(src, dst, count);
    case DType::U16: return ints_from_f32<std::uint16_t>(src, dst, count);
    case DType::I32: return ints_from_f32<std::int32_t>(src, dst, count);
    case DType::U32: return ints_from_f32<std::uint32_t>(src, dst, count);
    case DType::I64: return ints_from_f32<std::int64_t>(src, dst, count);
    case DType::U64: return ints_from_f32<std::uint64_t>(src, dst, count);
    case DType::BOOL:
      return each_from_f32<std::uint8_t>(src, dst, count, [](float v) -> std::uint8_t { return v != 0.0f ? 1 : 0; });
  }
  fail("convert_from_f32: unknown dtype code {}", static_cast<int>(type));
}

}  // namespace mopt
