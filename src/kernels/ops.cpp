#include "kernels/ops.h"

#include "core/convert.h"

#include <algorithm>
#include <cmath>

#include <cblas.h>

#include <vector>

#include "core/cpu_features.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/ops_simd.h"

namespace mopt::kernels {

void rmsnorm_saving(const float* x, const float* weight, std::int64_t rows, std::int64_t dim, float eps, float* y, float* rstd) {
  parallel_each(rows, 4, rows > 16, [&](std::int64_t r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double sum = 0;
    for (std::int64_t i = 0; i < dim; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const float variance = static_cast<float>(sum / static_cast<double>(dim));
    const float scale = 1.0f / std::sqrt(variance + eps);
    if (rstd != nullptr) rstd[r] = scale;
    for (std::int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * scale);
  });
}

void rmsnorm(const float* x, const float* weight, std::int64_t rows, std::int64_t dim, float eps, float* y) {
  rmsnorm_saving(x, weight, rows, dim, eps, y, nullptr);
}

namespace {

// Rotates each pair (x[i], x[i + d/2]) by the angle position * inv_freq[i], or by minus it.
// A packed batch repeats its positions (every sequence starts at 0): when the span of positions is no
// longer than the rows, cos and sin are computed once per position into one table (the same float
// expressions, so the same values) and every row reads its position's; otherwise once per row.
void rotate_pairs(float* x, std::int64_t rows, std::int64_t heads, std::int64_t head_dim, const std::int32_t* positions,
                  const std::vector<float>& inv_freq, bool inverse) {
  const std::int64_t half = head_dim / 2;
  if (static_cast<std::int64_t>(inv_freq.size()) != half) fail("rope: {} frequencies for head_dim {}", inv_freq.size(), head_dim);
  if (rows <= 0) return;
  const auto angles_of = [&](std::int32_t position, float* cos_v, float* sin_v) {
    const auto pos = static_cast<float>(position);
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[static_cast<std::size_t>(i)];
      cos_v[i] = std::cos(angle);
      sin_v[i] = inverse ? -std::sin(angle) : std::sin(angle);
    }
  };
  const auto rotate_row = [&](std::int64_t r, const float* cos_v, const float* sin_v) {
    for (std::int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * head_dim;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_v[i] - b * sin_v[i];
        v[i + half] = b * cos_v[i] + a * sin_v[i];
      }
    }
  };
  const auto range = std::minmax_element(positions, positions + rows);
  const std::int32_t lowest = *range.first;
  const std::int64_t span = static_cast<std::int64_t>(*range.second) - lowest + 1;
  if (span < rows) {
    std::vector<float> table(static_cast<std::size_t>(2 * span * half));  // per position: cos[half], sin[half]
    parallel_each(span, 8, span > 16, [&](std::int64_t p) {
      float* t = table.data() + 2 * p * half;
      angles_of(static_cast<std::int32_t>(lowest + p), t, t + half);
    });
    parallel_each(rows, 4, rows > 16, [&](std::int64_t r) {
      const float* t = table.data() + 2 * (positions[r] - lowest) * half;
      rotate_row(r, t, t + half);
    });
    return;
  }
  parallel_each(rows, 4, rows > 16, [&](std::int64_t r) {
    thread_local std::vector<float> angles;
    angles.resize(static_cast<std::size_t>(2 * half));
    angles_of(positions[r], angles.data(), angles.data() + half);
    rotate_row(r, angles.data(), angles.data() + half);
  });
}

}  // namespace

void apply_rope(float* x, std::int64_t rows, std::int64_t heads, std::int64_t head_dim, const std::int32_t* positions,
                const std::vector<float>& inv_freq) {
  rotate_pairs(x, rows, heads, head_dim, positions, inv_freq, false);
}

void apply_rope_inverse(float* x, std::int64_t rows, std::int64_t heads, std::int64_t head_dim, const std::int32_t* positions,
                        const std::vector<float>& inv_freq) {
  rotate_pairs(x, rows, heads, head_dim, positions, inv_freq, true);
}

namespace {

bool simd_ops() {
  static const bool yes = avx2_kernels_available();
  return yes;
}

}  // namespace

void silu_mul(float* gate, const float* up, std::int64_t n) {
  const bool simd = simd_ops();
  auto range = [&](std::int64_t i0, std::int64_t i1) {
    if (simd) {
      avx2::silu_mul(gate + i0, up + i0, i1 - i0);
      return;
    }
    for (std::int64_t i = i0; i < i1; ++i) {
      const float g = gate[i];
      gate[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  };
  // Ranges of whole 4096s: every element is computed the same way whatever the thread count.
  if (n > 65536) {
    parallel_ranges(n, 4096, range);
  } else {
    range(0, n);
  }
}

namespace {

float largest(const float* x, std::int64_t n) {
  if (simd_ops()) return avx2::max_of(x, n);
  float m = x[0];
  for (std::int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

}  // namespace

double log_sum_exp(const float* x, std::int64_t n) {
  const double shift = largest(x, n);
  if (!std::isfinite(shift)) return shift;
  double sum = 0;
  if (simd_ops()) {
    sum = avx2::exp_sum_f64(x, n, shift);
  } else {
    for (std::int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - shift);
  }
  return shift + std::log(sum);
}

double softmax_kl(const float* a, const float* b, std::int64_t n, double& lse_a, double& lse_b) {
  lse_b = log_sum_exp(b, n);
  const double shift = largest(a, n);
  if (!std::isfinite(shift) || !std::isfinite(lse_b)) {
    lse_a = std::isfinite(shift) ? log_sum_exp(a, n) : shift;
    return NAN;
  }
  double sum = 0, weighted = 0;
  if (simd_ops()) {
    avx2::exp_sum_weighted_difference(a, b, n, shift, sum, weighted);
  } else {
    for (std::int64_t i = 0; i < n; ++i) {
      const double e = std::exp(static_cast<double>(a[i]) - shift);
      sum += e;
      if (e > 0) weighted += e * (static_cast<double>(a[i]) - static_cast<double>(b[i]));
    }
  }
  lse_a = shift + std::log(sum);
  return weighted / sum - lse_a + lse_b;
}

namespace {

// Softmax over row entries [first, last] of scores, in place; the rest of the
// row (masked keys) becomes 0.
void masked_softmax(float* row, std::int64_t n, std::int64_t first, std::int64_t last) {
  const bool simd = simd_ops();
  float max_score = -INFINITY;
  if (simd) {
    max_score = std::max(max_score, avx2::max_of(row + first, last - first + 1));
  } else {
    for (std::int64_t j = first; j <= last; ++j) max_score = std::max(max_score, row[j]);
  }
  float total = 0;
  if (simd) {
    total = avx2::exp_shifted_sum(row + first, last - first + 1, max_score);
  } else {
    for (std::int64_t j = first; j <= last; ++j) {
      row[j] = std::exp(row[j] - max_score);
      total += row[j];
    }
  }
  const float inv = 1.0f / total;
  std::fill(row, row + first, 0.0f);
  if (simd) {
    avx2::scale(row + first, last - first + 1, inv);
  } else {
    for (std::int64_t j = first; j <= last; ++j) row[j] *= inv;
  }
  std::fill(row + last + 1, row + n, 0.0f);
}

}  // namespace

void attention(const float* q, std::int64_t n_q, const std::int32_t* q_pos, const float* k, const float* v, std::int64_t n_k,
               std::int64_t heads, std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out) {
  const std::int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const std::int64_t q_stride = heads * d, kv_stride = kv_heads * d;
  auto key_range = [&](std::int64_t i, std::int64_t& first, std::int64_t& last) {
    const std::int64_t p = q_pos[i];
    last = std::min<std::int64_t>(p, n_k - 1);
    first = window > 0 ? std::max<std::int64_t>(0, p - window + 1) : 0;
  };
  if (n_q >= 8) {
    // Many queries (prefill): per head, scores = Q Kᵀ and out = P V through
    // the BLAS, in blocks of query rows so the score matrix stays small; each
    // block multiplies only the keys its rows can see (causal: a block of the
    // first rows needs only the first keys).
    constexpr std::int64_t kBlock = 128;
    const std::int64_t blocks = (n_q + kBlock - 1) / kBlock;
    std::vector<std::int64_t> first_key(static_cast<std::size_t>(blocks)), key_count(static_cast<std::size_t>(blocks));
    for (std::int64_t b = 0; b < blocks; ++b) {
      const std::int64_t i0 = b * kBlock, rows = std::min(kBlock, n_q - i0);
      std::int64_t k0 = n_k, k1 = -1;  // the keys [k0, k1] some row of the block sees
      for (std::int64_t r = 0; r < rows; ++r) {
        std::int64_t first, last;
        key_range(i0 + r, first, last);
        if (first > last) fail("attention: query {} at position {} sees no key", i0 + r, q_pos[i0 + r]);
        k0 = std::min(k0, first);
        k1 = std::max(k1, last);
      }
      first_key[static_cast<std::size_t>(b)] = k0;
      key_count[static_cast<std::size_t>(b)] = k1 - k0 + 1;
    }
    start_thread_pool();  // OpenBLAS single-threaded: each (block, head) is one thread's
    // The blocks with the most keys first, so that the longest items do not come last.
    parallel_for(blocks * heads, [&](std::int64_t item) {
      const std::int64_t b = blocks - 1 - item / heads, h = item % heads;
      const std::int64_t i0 = b * kBlock, rows = std::min(kBlock, n_q - i0);
      const std::int64_t k0 = first_key[static_cast<std::size_t>(b)], nk = key_count[static_cast<std::size_t>(b)];
      thread_local std::vector<float> scores;
      scores.resize(static_cast<std::size_t>(rows * nk));
      const float* kh = k + k0 * kv_stride + (h / group) * d;
      const float* vh = v + k0 * kv_stride + (h / group) * d;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows), static_cast<blasint>(nk),
                  static_cast<blasint>(d), scale, q + i0 * q_stride + h * d, static_cast<blasint>(q_stride), kh,
                  static_cast<blasint>(kv_stride), 0.0f, scores.data(), static_cast<blasint>(nk));
      for (std::int64_t r = 0; r < rows; ++r) {
        std::int64_t first, last;
        key_range(i0 + r, first, last);
        masked_softmax(scores.data() + r * nk, nk, first - k0, last - k0);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(rows), static_cast<blasint>(d),
                  static_cast<blasint>(nk), 1.0f, scores.data(), static_cast<blasint>(nk), vh,
                  static_cast<blasint>(kv_stride), 0.0f, out + i0 * q_stride + h * d, static_cast<blasint>(q_stride));
    });
    return;
  }
  // Few queries (decode): each (query, head) on its own.
  parallel_ranges(n_q * heads, 1, [&](std::int64_t item0, std::int64_t item1) {
    thread_local std::vector<float> row;
    if (row.size() < static_cast<std::size_t>(n_k)) row.resize(static_cast<std::size_t>(n_k));
    for (std::int64_t item = item0; item < item1; ++item) {
      const std::int64_t i = item / heads, h = item % heads;
      std::int64_t first, last;
      key_range(i, first, last);
      const float* qv = q + i * q_stride + h * d;
      const std::int64_t kh = h / group;
      for (std::int64_t j = first; j <= last; ++j) {
        const float* kv = k + j * kv_stride + kh * d;
        float s = 0;
#pragma omp simd reduction(+ : s)
        for (std::int64_t t = 0; t < d; ++t) s += qv[t] * kv[t];
        row[static_cast<std::size_t>(j)] = s * scale;
      }
      masked_softmax(row.data(), n_k, first, last);
      float* o = out + i * q_stride + h * d;
      std::fill(o, o + d, 0.0f);
      for (std::int64_t j = first; j <= last; ++j) {
        const float w = row[static_cast<std::size_t>(j)];
        const float* vv = v + j * kv_stride + kh * d;
#pragma omp simd
        for (std::int64_t t = 0; t < d; ++t) o[t] += w * vv[t];
      }
    }
  });
}

std::size_t kv_element_bytes(KvElement element) {
  switch (element) {
    case KvElement::f32: return 4;
    case KvElement::bf16: return 2;
    case KvElement::e4m3: return 1;
  }
  return 4;
}

namespace {
const float* e4m3_values() {
  static const auto* table = [] {
    auto* t = new float[256];
    for (int c = 0; c < 256; ++c) t[c] = e4m3_to_f32(static_cast<std::uint8_t>(c));
    return t;
  }();
  return table;
}
}  // namespace

void kv_to_f32(const KvRows& rows, std::int64_t first, std::int64_t count, float* out) {
  switch (rows.element) {
    case KvElement::f32: std::copy_n(static_cast<const float*>(rows.data) + first, count, out); return;
    case KvElement::bf16: convert_bf16_to_f32(static_cast<const std::uint16_t*>(rows.data) + first, out, static_cast<std::size_t>(count)); return;
    case KvElement::e4m3: {
      const float* table = e4m3_values();
      const auto* c = static_cast<const std::uint8_t*>(rows.data) + first;
      for (std::int64_t i = 0; i < count; ++i) out[i] = table[c[i]] * rows.scale;
      return;
    }
  }
}

void attention_cached(const float* q, std::int64_t n_q, const std::int32_t* q_pos, const KvRows& k, const KvRows& v,
                      std::int64_t n_k, std::int64_t heads, std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out) {
  const std::int64_t kv_stride = kv_heads * d;
  if (k.element == KvElement::f32 && v.element == KvElement::f32) {
    attention(q, n_q, q_pos, static_cast<const float*>(k.data), static_cast<const float*>(v.data), n_k, heads, kv_heads, d, window, out);
    return;
  }
  // Widen the keys and values the queries can see (every thread a share of the rows), then attend in f32.
  // (Prefill multiplies by every key through the BLAS, masked ones included: widen them all.)
  std::int64_t first_row = n_q >= 8 ? 0 : n_k;
  for (std::int64_t i = 0; i < n_q; ++i) {
    const std::int64_t p = q_pos[i];
    first_row = std::min(first_row, window > 0 ? std::max<std::int64_t>(0, p - window + 1) : std::int64_t{0});
  }
  thread_local std::vector<float> kf, vf;
  kf.resize(static_cast<std::size_t>(n_k * kv_stride));
  vf.resize(kf.size());
  float* kd = kf.data();
  float* vd = vf.data();
  const std::int64_t rows = n_k - first_row;
  const std::int64_t chunk = 64;
  parallel_ranges(rows, chunk, [&](std::int64_t c0, std::int64_t c1) {
    const std::int64_t r0 = first_row + c0, r1 = first_row + c1;
    kv_to_f32(k, r0 * kv_stride, (r1 - r0) * kv_stride, kd + r0 * kv_stride);
    kv_to_f32(v, r0 * kv_stride, (r1 - r0) * kv_stride, vd + r0 * kv_stride);
  });
  attention(q, n_q, q_pos, kd, vd, n_k, heads, kv_heads, d, window, out);
}

}  // namespace mopt::kernels
