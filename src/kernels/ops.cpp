#include "kernels/ops.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace mopt::kernels {

void rmsnorm(const float* x, const float* weight, std::int64_t rows, std::int64_t dim, float eps, float* y) {
#pragma omp parallel for schedule(static) if (rows > 16)
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = y + r * dim;
    double sum = 0;
    for (std::int64_t i = 0; i < dim; ++i) sum += static_cast<double>(xr[i]) * xr[i];
    const float variance = static_cast<float>(sum / static_cast<double>(dim));
    const float scale = 1.0f / std::sqrt(variance + eps);
    for (std::int64_t i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * scale);
  }
}

void apply_rope(float* x, std::int64_t rows, std::int64_t heads, std::int64_t head_dim, const std::int32_t* positions,
                const std::vector<float>& inv_freq) {
  const std::int64_t half = head_dim / 2;
  if (static_cast<std::int64_t>(inv_freq.size()) != half) fail("rope: {} frequencies for head_dim {}", inv_freq.size(), head_dim);
#pragma omp parallel for schedule(static) if (rows > 16)
  for (std::int64_t r = 0; r < rows; ++r) {
    std::vector<float> cos_v(static_cast<std::size_t>(half)), sin_v(static_cast<std::size_t>(half));
    const auto pos = static_cast<float>(positions[r]);
    for (std::int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[static_cast<std::size_t>(i)];
      cos_v[static_cast<std::size_t>(i)] = std::cos(angle);
      sin_v[static_cast<std::size_t>(i)] = std::sin(angle);
    }
    for (std::int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * head_dim;
      for (std::int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        const float c = cos_v[static_cast<std::size_t>(i)], s = sin_v[static_cast<std::size_t>(i)];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void silu_mul(float* gate, const float* up, std::int64_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (std::int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void attention(const float* q, std::int64_t n_q, const std::int32_t* q_pos, const float* k, const float* v, std::int64_t n_k,
               std::int64_t heads, std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out) {
  const std::int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
#pragma omp parallel
  {
    std::vector<float> scores(static_cast<std::size_t>(n_k));
#pragma omp for collapse(2) schedule(dynamic, 4)
    for (std::int64_t i = 0; i < n_q; ++i) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t p = q_pos[i];
        const std::int64_t last = std::min<std::int64_t>(p, n_k - 1);
        const std::int64_t first = window > 0 ? std::max<std::int64_t>(0, p - window + 1) : 0;
        const float* qv = q + (i * heads + h) * d;
        const std::int64_t kh = h / group;
        float max_score = -INFINITY;
        for (std::int64_t j = first; j <= last; ++j) {
          const float* kv = k + (j * kv_heads + kh) * d;
          float s = 0;
          for (std::int64_t t = 0; t < d; ++t) s += qv[t] * kv[t];
          s *= scale;
          scores[static_cast<std::size_t>(j)] = s;
          max_score = std::max(max_score, s);
        }
        float total = 0;
        for (std::int64_t j = first; j <= last; ++j) {
          const float e = std::exp(scores[static_cast<std::size_t>(j)] - max_score);
          scores[static_cast<std::size_t>(j)] = e;
          total += e;
        }
        float* o = out + (i * heads + h) * d;
        std::fill(o, o + d, 0.0f);
        for (std::int64_t j = first; j <= last; ++j) {
          const float w = scores[static_cast<std::size_t>(j)] / total;
          const float* vv = v + (j * kv_heads + kh) * d;
          for (std::int64_t t = 0; t < d; ++t) o[t] += w * vv[t];
        }
      }
    }
  }
}

}  // namespace mopt::kernels
