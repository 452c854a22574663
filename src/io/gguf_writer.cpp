#include "io/gguf_writer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "core/convert.h"
#include "core/error.h"
#include "io/atomic_file.h"

namespace mopt::io {

namespace {

constexpr std::uint32_t kBlock = 32;

void put_bytes(std::vector<std::byte>& out, const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}

template <typename T>
void put(std::vector<std::byte>& out, T v) {
  put_bytes(out, &v, sizeof v);
}

void put_string(std::vector<std::byte>& out, const std::string& s) {
  put<std::uint64_t>(out, s.size());
  put_bytes(out, s.data(), s.size());
}

void put_scalar(std::vector<std::byte>& out, GgufValueType type, const nlohmann::json& v, const std::string& key) {
  const auto need_number = [&] {
    if (!v.is_number() && !v.is_boolean()) fail("GGUF metadata {}: {} is not a number", key, v.dump());
  };
  switch (type) {
    case GgufValueType::u8: need_number(); put<std::uint8_t>(out, v.get<std::uint8_t>()); break;
    case GgufValueType::i8: need_number(); put<std::int8_t>(out, v.get<std::int8_t>()); break;
    case GgufValueType::u16: need_number(); put<std::uint16_t>(out, v.get<std::uint16_t>()); break;
    case GgufValueType::i16: need_number(); put<std::int16_t>(out, v.get<std::int16_t>()); break;
    case GgufValueType::u32: need_number(); put<std::uint32_t>(out, v.get<std::uint32_t>()); break;
    case GgufValueType::i32: need_number(); put<std::int32_t>(out, v.get<std::int32_t>()); break;
    case GgufValueType::f32: need_number(); put<float>(out, v.get<float>()); break;
    case GgufValueType::u64: need_number(); put<std::uint64_t>(out, v.get<std::uint64_t>()); break;
    case GgufValueType::i64: need_number(); put<std::int64_t>(out, v.get<std::int64_t>()); break;
    case GgufValueType::f64: need_number(); put<double>(out, v.get<double>()); break;
    case GgufValueType::boolean:
      if (!v.is_boolean()) fail("GGUF metadata {}: {} is not a bool", key, v.dump());
      put<std::uint8_t>(out, v.get<bool>() ? 1 : 0);
      break;
    case GgufValueType::string:
      if (!v.is_string()) fail("GGUF metadata {}: {} is not a string", key, v.dump());
      put_string(out, v.get<std::string>());
      break;
    case GgufValueType::array: fail("GGUF metadata {}: nested arrays are not written", key);
  }
}

std::uint64_t round_up(std::uint64_t n, std::uint64_t a) { return (n + a - 1) / a * a; }

// ---- K-quants, as llama.cpp's reference quantizers compute them (ggml-quants.c, without an importance
// matrix). Every float operation is in the reference's order: the goldens are byte-identical.

constexpr int kSuperBlock = 256;

// Round to nearest (ties to even) through the float mantissa, as ggml's nearest_int does.
int nearest_int(float v) {
  const float shifted = v + 12582912.0f;
  std::int32_t bits = 0;
  std::memcpy(&bits, &shifted, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

// Q4_K's fit of one 32-value sub-block as scale * L + min (L in 0..nmax, min <= 0), by weighted least
// squares over steps + 1 candidate grids from nmax + rmin in steps of rdelta; returns the scale and
// stores -min. llama.cpp's make_qkx2_quants (-1, 0.1, 20 steps; a flat block only when max == min)
// and, with an importance matrix, make_qkx3_quants (-0.9, 0.05, 36; also when max < min).
struct SubBlockSearch {
  float rmin, rdelta;
  int steps;
  bool flat_below_min;
};
constexpr SubBlockSearch kPlainSearch{-1.0f, 0.1f, 20, false}, kWeightedSearch{-0.9f, 0.05f, 36, true};

float fit_scale_and_min(const float* x, const float* w, std::uint8_t* levels, float* neg_min, const SubBlockSearch& search) {
  constexpr int n = 32, nmax = 15;
  const float rmin = search.rmin, rdelta = search.rdelta;
  const int steps = search.steps;
  float lo = x[0], hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < lo) lo = x[i];
    if (x[i] > hi) hi = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;
  if (hi == lo || (search.flat_below_min && hi < lo)) {
    std::fill(levels, levels + n, std::uint8_t{0});
    *neg_min = -lo;
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / (hi - lo);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    levels[i] = static_cast<std::uint8_t>(std::clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax));
    const float diff = scale * levels[i] + lo - x[i];
    best_error += w[i] * (diff * diff);
  }
  std::uint8_t trial[n];
  for (int step = 0; step <= steps; ++step) {
    iscale = (rmin + rdelta * static_cast<float>(step) + static_cast<float>(nmax)) / (hi - lo);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax);
      trial[i] = static_cast<std::uint8_t>(l);
      sum_l += w[i] * static_cast<float>(l);
      sum_l2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
      sum_xl += w[i] * static_cast<float>(l) * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (det > 0) {
      float trial_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
      float trial_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
      if (trial_min > 0) {
        trial_min = 0;
        trial_scale = sum_xl / sum_l2;
      }
      float error = 0;
      for (int i = 0; i < n; ++i) {
        const float diff = trial_scale * trial[i] + trial_min - x[i];
        error += w[i] * (diff * diff);
      }
      if (error < best_error) {
        std::copy(trial, trial + n, levels);
        best_error = error;
        scale = trial_scale;
        lo = trial_min;
      }
    }
  }
  *neg_min = -lo;
  return scale;
}

// The symmetric fit of n values to levels -nmax..nmax-1 (stored + nmax), choosing among 19 grids the
// one with the least weighted squared error (weights `w`, or x^2 without them); returns the scale
// (llama.cpp's make_qx_quants with rmse_type 1): Q6_K's sub-blocks of 16, and with an importance
// matrix Q4_0's and Q5_0's blocks of 32.
float fit_symmetric_scale(const float* x, int n, int nmax, const float* w, std::uint8_t* levels) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < 1e-15f) {
    std::fill(levels, levels + n, std::uint8_t{0});
    return 0.0f;
  }
  const auto level = [nmax](float iscale, float v) { return std::clamp(nearest_int(iscale * v), -nmax, nmax - 1); };
  const auto weight = [&](int i) { return w != nullptr ? w[i] : x[i] * x[i]; };
  float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = level(iscale, x[i]);
    levels[i] = static_cast<std::uint8_t>(l + nmax);
    const float wi = weight(i);
    sumlx += wi * x[i] * static_cast<float>(l);
    suml2 += wi * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int step = -9; step <= 9; ++step) {
    if (step == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(step)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = level(iscale, x[i]);
      const float wi = weight(i);
      sumlx += wi * x[i] * static_cast<float>(l);
      suml2 += wi * static_cast<float>(l) * static_cast<float>(l);
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) levels[i] = static_cast<std::uint8_t>(nmax + level(iscale, x[i]));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Q4_K's 6-bit super-block scale of n non-negative values with weights w (llama.cpp's make_qp_quants):
// the best of 9 grids by weighted squared error, then up to 5 passes moving single levels while the
// least-squares fit improves; stores the levels (0..nmax) and returns the scale.
float fit_positive_scale(int n, int nmax, const float* x, const float* w, std::uint8_t* levels) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < 1e-15f) {
    std::fill(levels, levels + n, std::uint8_t{0});
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / max;
  for (int i = 0; i < n; ++i) levels[i] = static_cast<std::uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * levels[i];
    best += w[i] * diff * diff;
  }
  for (int step = -4; step <= 4; ++step) {
    if (step == 0) continue;
    const float trial_iscale = (0.1f * static_cast<float>(step) + static_cast<float>(nmax)) / max;
    const float trial_scale = 1 / trial_iscale;
    float error = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, nearest_int(trial_iscale * x[i]));
      const float diff = x[i] - trial_scale * static_cast<float>(l);
      error += w[i] * diff * diff;
    }
    if (error < best) {
      best = error;
      iscale = trial_iscale;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, nearest_int(iscale * x[i]));
    levels[i] = static_cast<std::uint8_t>(l);
    sumlx += w[i] * x[i] * static_cast<float>(l);
    suml2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      float slx = sumlx - w[i] * x[i] * static_cast<float>(levels[i]);
      float sl2 = suml2 - w[i] * static_cast<float>(levels[i]) * static_cast<float>(levels[i]);
      if (slx > 0 && sl2 > 0) {
        const int l = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (l != levels[i]) {
          slx += w[i] * x[i] * static_cast<float>(l);
          sl2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            levels[i] = static_cast<std::uint8_t>(l);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (changed == 0) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// `importance` (256 values or null): llama.cpp's quantize_row_q4_K_impl, each value's error weighed by
// importance * sqrt(sigma^2 + x^2) and the super-block scales fitted to the sub-blocks' weights.
void quantize_q4_k(const float* x, const float* importance, std::vector<std::byte>& out) {
  std::uint8_t levels[kSuperBlock];
  float weights[32], scales[8], mins[8];
  std::uint8_t sc[8], mn[8];
  std::uint16_t d16 = 0, dmin16 = 0;
  if (importance == nullptr) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      const float* v = x + 32 * j;
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += v[l] * v[l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(v[l]);
      scales[j] = fit_scale_and_min(v, weights, levels + 32 * j, &mins[j], kPlainSearch);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < 8; ++j) {
      sc[j] = std::min<std::uint8_t>(63, static_cast<std::uint8_t>(nearest_int(inv_scale * scales[j])));
      mn[j] = std::min<std::uint8_t>(63, static_cast<std::uint8_t>(nearest_int(inv_min * mins[j])));
    }
    d16 = f32_to_f16(max_scale / 63.0f);
    dmin16 = f32_to_f16(max_min / 63.0f);
  } else {
    float sum_x2 = 0;
    for (int l = 0; l < kSuperBlock; ++l) sum_x2 += x[l] * x[l];
    const float sigma2 = 2 * sum_x2 / kSuperBlock;
    float sum_weights[8];
    for (int j = 0; j < 8; ++j) {
      for (int l = 0; l < 32; ++l) weights[l] = importance[32 * j + l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
      float sw = 0;
      for (int l = 0; l < 32; ++l) sw += weights[l];
      sum_weights[j] = sw;
      scales[j] = fit_scale_and_min(x + 32 * j, weights, levels + 32 * j, &mins[j], kWeightedSearch);
    }
    d16 = f32_to_f16(fit_positive_scale(8, 63, scales, sum_weights, sc));
    dmin16 = f32_to_f16(fit_positive_scale(8, 63, mins, sum_weights, mn));
  }
  // Eight 6-bit scales and mins in 12 bytes: j < 4 in the low 6 bits of bytes j and j+4; j >= 4 split
  // into a nibble of byte j+4 and the top 2 bits of bytes j-4 (scale) and j (min).
  std::uint8_t packed[12] = {};
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      packed[j] = sc[j];
      packed[j + 4] = mn[j];
    } else {
      packed[j + 4] = static_cast<std::uint8_t>((sc[j] & 0xF) | ((mn[j] & 0xF) << 4));
      packed[j - 4] = static_cast<std::uint8_t>(packed[j - 4] | ((sc[j] >> 4) << 6));
      packed[j] = static_cast<std::uint8_t>(packed[j] | ((mn[j] >> 4) << 6));
    }
  }
  for (int j = 0; j < 8; ++j) {
    const float d = f16_to_f32(d16) * static_cast<float>(sc[j]);
    if (d == 0.0f) continue;
    const float dm = f16_to_f32(dmin16) * static_cast<float>(mn[j]);
    for (int i = 0; i < 32; ++i) levels[32 * j + i] = static_cast<std::uint8_t>(std::clamp(nearest_int((x[32 * j + i] + dm) / d), 0, 15));
  }
  put<std::uint16_t>(out, d16);
  put<std::uint16_t>(out, dmin16);
  put_bytes(out, packed, 12);
  for (int j = 0; j < kSuperBlock; j += 64) {
    for (int l = 0; l < 32; ++l) put<std::uint8_t>(out, static_cast<std::uint8_t>(levels[j + l] | (levels[j + l + 32] << 4)));
  }
}

// `importance` (256 values or null): llama.cpp's quantize_row_q6_K_impl, the sub-blocks fitted with those weights.
void quantize_q6_k(const float* x, const float* importance, std::vector<std::byte>& out) {
  std::uint8_t levels[kSuperBlock];
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int b = 0; b < 16; ++b) {
    scales[b] = fit_symmetric_scale(x + 16 * b, 16, 32, importance != nullptr ? importance + 16 * b : nullptr, levels + 16 * b);
    if (std::fabs(scales[b]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[b]);
      max_scale = scales[b];
    }
  }
  if (max_abs_scale < 1e-15f) {  // an all-zero block
    out.resize(out.size() + 210, std::byte{0});
    return;
  }
  const float iscale = -128.0f / max_scale;
  const std::uint16_t d16 = f32_to_f16(1 / iscale);
  std::int8_t sub[16];
  for (int b = 0; b < 16; ++b) sub[b] = static_cast<std::int8_t>(std::min(127, nearest_int(iscale * scales[b])));
  for (int b = 0; b < 16; ++b) {
    const float d = f16_to_f32(d16) * static_cast<float>(sub[b]);
    if (d == 0.0f) continue;
    for (int i = 0; i < 16; ++i) levels[16 * b + i] = static_cast<std::uint8_t>(std::clamp(nearest_int(x[16 * b + i] / d), -32, 31) + 32);
  }
  // Low nibbles: bytes 0..63 of each 128-value half hold values l and l+64 (l < 32) or l and l+64 shifted
  // by 32; high 2 bits: four values per byte.
  std::uint8_t ql[128], qh[64];
  for (int half = 0; half < 2; ++half) {
    const std::uint8_t* L = levels + 128 * half;
    std::uint8_t* lo = ql + 64 * half;
    std::uint8_t* hi = qh + 32 * half;
    for (int l = 0; l < 32; ++l) {
      lo[l] = static_cast<std::uint8_t>((L[l] & 0xF) | ((L[l + 64] & 0xF) << 4));
      lo[l + 32] = static_cast<std::uint8_t>((L[l + 32] & 0xF) | ((L[l + 96] & 0xF) << 4));
      hi[l] = static_cast<std::uint8_t>((L[l] >> 4) | ((L[l + 32] >> 4) << 2) | ((L[l + 64] >> 4) << 4) | ((L[l + 96] >> 4) << 6));
    }
  }
  put_bytes(out, ql, 128);
  put_bytes(out, qh, 64);
  put_bytes(out, sub, 16);
  put<std::uint16_t>(out, d16);
}

}  // namespace

std::vector<std::byte> ggml_quantize(GgmlType type, const float* x, std::uint64_t count, const std::string& label,
                                     std::span<const float> importance) {
  for (std::uint64_t i = 0; i < count; ++i) {
    if (!std::isfinite(x[i])) fail("{}: non-finite value {} at element {}", label, x[i], i);
  }
  const std::uint64_t row = importance.size();
  if (row > 0) {
    if (count % row != 0 || row % kBlock != 0) fail("{}: {} importance values do not divide {} values into whole rows of blocks", label, row, count);
    for (const float v : importance) {
      if (!(v >= 0.0f) || !std::isfinite(v)) fail("{}: an importance value is {} (must be finite and non-negative)", label, v);
    }
  }
  std::vector<std::byte> out;
  switch (type) {
    case GgmlType::F32: put_bytes(out, x, count * 4); return out;
    case GgmlType::F16:
    case GgmlType::BF16: {
      out.resize(count * 2);
      auto* dst = reinterpret_cast<std::uint16_t*>(out.data());
      for (std::uint64_t i = 0; i < count; ++i) dst[i] = type == GgmlType::F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
      return out;
    }
    case GgmlType::Q4_K:
    case GgmlType::Q6_K: {
      if (count % kSuperBlock != 0) fail("{}: {} values are not whole super-blocks of {}", label, count, kSuperBlock);
      if (row % kSuperBlock != 0) fail("{}: rows of {} values are not whole super-blocks of {}", label, row, kSuperBlock);
      out.reserve(count / kSuperBlock * (type == GgmlType::Q4_K ? 144 : 210));
      for (std::uint64_t b = 0; b < count; b += kSuperBlock) {
        const float* w = row > 0 ? importance.data() + b % row : nullptr;
        (type == GgmlType::Q4_K ? quantize_q4_k : quantize_q6_k)(x + b, w, out);
      }
      return out;
    }
    case GgmlType::Q8_0:
    case GgmlType::Q5_0:
    case GgmlType::Q4_0: break;
    default: fail("{}: writing ggml type {} is not supported (F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q4_K, Q6_K)", label, static_cast<std::uint32_t>(type));
  }
  if (count % kBlock != 0) fail("{}: {} values are not whole blocks of {}", label, count, kBlock);
  const bool q8 = type == GgmlType::Q8_0;
  if (row > 0 && !q8) {
    // llama.cpp's quantize_row_q4_0_impl / q5_0_impl: per block the symmetric weighted fit, each value
    // weighed by importance * sqrt(sigma^2 + x^2) with sigma^2 the row's mean square; levels as fitted.
    const int nmax = type == GgmlType::Q4_0 ? 8 : 16;
    out.reserve(count / kBlock * (type == GgmlType::Q5_0 ? 22 : 18));
    for (std::uint64_t r0 = 0; r0 < count; r0 += row) {
      float sum_x2 = 0;
      for (std::uint64_t j = 0; j < row; ++j) sum_x2 += x[r0 + j] * x[r0 + j];
      const float sigma2 = sum_x2 / static_cast<float>(row);
      for (std::uint64_t b = 0; b < row; b += kBlock) {
        const float* v = x + r0 + b;
        float weight[kBlock];
        std::uint8_t q[kBlock];
        for (std::uint32_t j = 0; j < kBlock; ++j) weight[j] = importance[b + j] * std::sqrt(sigma2 + v[j] * v[j]);
        put<std::uint16_t>(out, f32_to_f16(fit_symmetric_scale(v, kBlock, nmax, weight, q)));
        if (type == GgmlType::Q5_0) {
          std::uint32_t high = 0;
          for (std::uint32_t j = 0; j < kBlock; ++j) high |= static_cast<std::uint32_t>((q[j] >> 4) & 1u) << j;
          put<std::uint32_t>(out, high);
          for (std::uint32_t j = 0; j < kBlock / 2; ++j) put<std::uint8_t>(out, static_cast<std::uint8_t>((q[j] & 0xF) | ((q[j + kBlock / 2] & 0xF) << 4)));
        } else {
          for (std::uint32_t j = 0; j < kBlock / 2; ++j) put<std::uint8_t>(out, static_cast<std::uint8_t>(q[j] | (q[j + kBlock / 2] << 4)));
        }
      }
    }
    return out;
  }
  out.reserve(count / kBlock * (q8 ? 34 : type == GgmlType::Q5_0 ? 22 : 18));
  for (std::uint64_t b = 0; b < count; b += kBlock) {
    const float* v = x + b;
    if (q8) {
      float amax = 0.0f;
      for (std::uint32_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.0f;
      const float id = d == 0.0f ? 0.0f : 1.0f / d;
      put<std::uint16_t>(out, f32_to_f16(d));
      for (std::uint32_t i = 0; i < kBlock; ++i) put<std::int8_t>(out, static_cast<std::int8_t>(std::round(v[i] * id)));
    } else if (type == GgmlType::Q5_0) {
      // As Q4_0 with 32 levels: d = m / -16, the fifth bits of the 32 values in a little-endian u32.
      float m = 0.0f, am = 0.0f;
      for (std::uint32_t i = 0; i < kBlock; ++i) {
        if (am < std::fabs(v[i])) am = std::fabs(v[i]), m = v[i];
      }
      const float d = m / -16.0f;
      const float id = d == 0.0f ? 0.0f : 1.0f / d;
      put<std::uint16_t>(out, f32_to_f16(d));
      std::uint8_t q[kBlock];
      std::uint32_t high = 0;
      for (std::uint32_t i = 0; i < kBlock; ++i) {
        q[i] = static_cast<std::uint8_t>(std::min(31.0f, std::trunc(v[i] * id + 16.5f)));
        high |= static_cast<std::uint32_t>((q[i] >> 4) & 1u) << i;
      }
      put<std::uint32_t>(out, high);
      for (std::uint32_t i = 0; i < kBlock / 2; ++i) put<std::uint8_t>(out, static_cast<std::uint8_t>((q[i] & 0xF) | ((q[i + kBlock / 2] & 0xF) << 4)));
    } else {
      // The value of largest magnitude, the first of equals, with its sign.
      float m = 0.0f, am = -1.0f;
      for (std::uint32_t i = 0; i < kBlock; ++i) {
        if (std::fabs(v[i]) > am) am = std::fabs(v[i]), m = v[i];
      }
      const float d = m / -8.0f;
      const float id = d == 0.0f ? 0.0f : 1.0f / d;
      put<std::uint16_t>(out, f32_to_f16(d));
      std::uint8_t q[kBlock];
      for (std::uint32_t i = 0; i < kBlock; ++i) q[i] = static_cast<std::uint8_t>(std::min(15.0f, std::trunc(v[i] * id + 8.5f)));
      for (std::uint32_t i = 0; i < kBlock / 2; ++i) put<std::uint8_t>(out, static_cast<std::uint8_t>(q[i] | (q[i + kBlock / 2] << 4)));
    }
  }
  return out;
}

void GgufWriter::add(const std::string& key, GgufValue value) {
  for (const auto& [k, v] : metadata_) {
    if (k == key) fail("GGUF metadata key {} added twice", key);
  }
  metadata_.emplace_back(key, std::move(value));
}

void GgufWriter::add_string(const std::string& key, const std::string& value) { add(key, {GgufValueType::string, GgufValueType::u8, value}); }
void GgufWriter::add_u32(const std::string& key, std::uint32_t value) { add(key, {GgufValueType::u32, GgufValueType::u8, value}); }
void GgufWriter::add_f32(const std::string& key, float value) { add(key, {GgufValueType::f32, GgufValueType::u8, value}); }

GgmlTypeInfo GgufWriter::check_tensor(const std::string& name, const Shape& shape, GgmlType type, std::uint64_t& bytes) const {
  const auto info = ggml_type_info(static_cast<std::uint32_t>(type));
  if (!info) fail("GGUF tensor {}: unknown ggml type {}", name, static_cast<std::uint32_t>(type));
  if (shape.empty()) fail("GGUF tensor {}: no dimensions", name);
  for (const auto& t : tensors_) {
    if (t.name == name) fail("GGUF tensor {} added twice", name);
  }
  std::uint64_t n = 1;
  for (const auto d : shape) {
    if (d <= 0) fail("GGUF tensor {}: dimension {} is not positive", name, d);
    n *= static_cast<std::uint64_t>(d);
  }
  if (static_cast<std::uint64_t>(shape.back()) % info->block_elements != 0) {
    fail("GGUF tensor {}: its rows of {} are not whole {} blocks of {}", name, shape.back(), info->name, info->block_elements);
  }
  bytes = n / info->block_elements * info->block_bytes;
  return *info;
}

void GgufWriter::add_tensor(const std::string& name, const Shape& shape, GgmlType type, std::vector<std::byte> data) {
  std::uint64_t bytes = 0;
  const GgmlTypeInfo info = check_tensor(name, shape, type, bytes);
  if (data.size() != bytes) fail("GGUF tensor {}: {} bytes for {} of {} bytes", name, data.size(), info.name, bytes);
  tensors_.push_back({name, shape, info, bytes, std::move(data), {}});
}

void GgufWriter::add_tensor(const std::string& name, const Shape& shape, GgmlType type, std::function<std::vector<std::byte>()> produce) {
  std::uint64_t bytes = 0;
  const GgmlTypeInfo info = check_tensor(name, shape, type, bytes);
  tensors_.push_back({name, shape, info, bytes, {}, std::move(produce)});
}

std::vector<std::byte> GgufWriter::Entry::contents() const {
  if (!produce) return data;
  std::vector<std::byte> d = produce();
  if (d.size() != bytes) fail("GGUF tensor {}: {} bytes produced for {} of {} bytes", name, d.size(), type.name, bytes);
  return d;
}

std::uint64_t GgufWriter::alignment() const {
  for (const auto& [k, v] : metadata_) {
    if (k == "general.alignment") {
      const auto a = v.value.get<std::uint64_t>();
      if (a == 0 || (a & (a - 1)) != 0) fail("GGUF general.alignment {} is not a power of two", a);
      return a;
    }
  }
  return 32;
}

void GgufWriter::sort_tensors(const std::function<bool(const std::string&, const std::string&)>& less) {
  std::stable_sort(tensors_.begin(), tensors_.end(), [&](const Entry& a, const Entry& b) { return less(a.name, b.name); });
}

std::vector<std::byte> GgufWriter::bytes() const {
  std::vector<std::byte> out = header_bytes();
  const std::uint64_t align = alignment();
  for (const auto& t : tensors_) {
    const std::vector<std::byte> d = t.contents();
    put_bytes(out, d.data(), d.size());
    out.resize(round_up(out.size(), align), std::byte{0});
  }
  return out;
}

std::vector<std::byte> GgufWriter::header_bytes() const {
  const std::uint64_t align = alignment();
  std::vector<std::byte> out;
  put_bytes(out, "GGUF", 4);
  put<std::uint32_t>(out, 3);
  put<std::uint64_t>(out, tensors_.size());
  put<std::uint64_t>(out, metadata_.size());
  for (const auto& [key, v] : metadata_) {
    put_string(out, key);
    put<std::uint32_t>(out, static_cast<std::uint32_t>(v.type));
    if (v.type == GgufValueType::array) {
      if (!v.value.is_array()) fail("GGUF metadata {}: an array type with a non-array value", key);
      put<std::uint32_t>(out, static_cast<std::uint32_t>(v.element_type));
      put<std::uint64_t>(out, v.value.size());
      for (const auto& e : v.value) put_scalar(out, v.element_type, e, key);
    } else {
      put_scalar(out, v.type, v.value, key);
    }
  }
  std::uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_string(out, t.name);
    put<std::uint32_t>(out, static_cast<std::uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<std::uint64_t>(out, static_cast<std::uint64_t>(*it));
    put<std::uint32_t>(out, static_cast<std::uint32_t>(t.type.type));
    put<std::uint64_t>(out, offset);
    offset = round_up(offset + t.bytes, align);
  }
  out.resize(round_up(out.size(), align), std::byte{0});
  return out;
}

void GgufWriter::write(const std::string& path) const {
  const std::uint64_t align = alignment();
  AtomicFileWriter w(path);
  const std::vector<std::byte> header = header_bytes();
  w.write(header);
  static const std::byte zeros[256] = {};
  for (const auto& t : tensors_) {
    w.write(t.contents());
    const std::uint64_t pad = round_up(t.bytes, align) - t.bytes;
    for (std::uint64_t left = pad; left > 0;) {
      const std::uint64_t n = std::min<std::uint64_t>(left, sizeof zeros);
      w.write(std::span<const std::byte>(zeros, n));
      left -= n;
    }
  }
  w.commit();
}

}  // namespace mopt::io
