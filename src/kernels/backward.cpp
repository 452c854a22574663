#include "kernels/backward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/cpu_features.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "kernels/ops_simd.h"

namespace mopt::kernels {

namespace {

// Rows per block of a sum over rows (a parameter's gradient): fixed, so the order of additions is too.
constexpr std::int64_t kSumBlockRows = 64;
// Query rows per block of attention's scores.
constexpr std::int64_t kQueryBlock = 128;
// bf16 attention reuses one operand over growing key prefixes (Bf16Operand::multiply_leading): a
// block boundary on a multiple of 32 keeps every prefix past a block inside the AMX padding of its
// own keys, so no later key (which could be non-finite in a diverged run) meets a zero of A.
static_assert(kQueryBlock % 32 == 0);

// The AVX2 exponentials of ops_simd.h (within 2 ulp of std::exp), where the CPU has them.
bool simd_ops() {
  static const bool yes = avx2_kernels_available();
  return yes;
}

// row[j] = e^(row[j] - shift) over [0, n); returns the sum (in double on the plain path).
double exp_shifted(float* row, std::int64_t n, float shift) {
  if (n <= 0) return 0.0;
  static const bool avx512 = simd_ops() && cpu_features().avx512f && cpu_features().avx512bw && cpu_features().avx512vl;
  if (avx512) return avx512::exp_shifted_sum(row, n, shift);
  if (simd_ops()) return avx2::exp_shifted_sum(row, n, shift);
  double total = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    row[j] = std::exp(row[j] - shift);
    total += row[j];
  }
  return total;
}

float row_max(const float* row, std::int64_t n) {
  if (simd_ops()) return avx2::max_of(row, n);
  float m = row[0];
  for (std::int64_t j = 1; j < n; ++j) m = std::max(m, row[j]);
  return m;
}

void scale_row(float* row, std::int64_t n, float factor) {
  if (simd_ops()) {
    avx2::scale(row, n, factor);
    return;
  }
  for (std::int64_t j = 0; j < n; ++j) row[j] *= factor;
}

blasint B(std::int64_t v) { return static_cast<blasint>(v); }

// C = alpha · op(A) · op(B) + beta · C (beta 0 or 1), as cblas_sgemm, or on bf16-rounded operands
// with f32 sums (alpha applied to the f32 result).
// C [m, n_used] = alpha · A [m, k_used] · (op(B)'s leading k_used x n_used block), B laid out once.
void scaled_leading(const Bf16Operand& b, std::int64_t m, std::int64_t k_used, std::int64_t n_used, float alpha, const float* a, std::int64_t lda,
                    float* c, std::int64_t ldc) {
  b.multiply_leading(false, m, k_used, n_used, a, lda, c, ldc, false);
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n_used; ++j) c[i * ldc + j] *= alpha;
  }
}

// The scores [m, n_used] = (scale · Q [m, d]) · Kᵀ's leading n_used keys, Kᵀ laid out once: Q scaled
// before its rounding (the same bits as scaling the products when scale is a power of two, as at
// head_dim 64), m x d multiplies instead of m x n_used.
void scaled_scores(const Bf16Operand& kt, std::int64_t m, std::int64_t d, std::int64_t n_used, float scale, const float* q, std::int64_t ldq,
                   float* scores) {
  thread_local std::vector<float> q_scaled;
  if (q_scaled.size() < static_cast<std::size_t>(m * d)) q_scaled.resize(static_cast<std::size_t>(m * d));
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t t = 0; t < d; ++t) q_scaled[static_cast<std::size_t>(i * d + t)] = scale * q[i * ldq + t];
  }
  kt.multiply_leading(false, m, d, n_used, q_scaled.data(), d, scores, n_used, false);
}

void product(bool bf16, bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const float* a, std::int64_t lda,
             const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  if (!bf16) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, B(m), B(n), B(k), alpha, a, B(lda), b, B(ldb),
                beta, c, B(ldc));
    return;
  }
  if (alpha == 1.0f) {
    matmul_bf16_operands(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, beta != 0.0f);
    return;
  }
  thread_local std::vector<float> t;
  if (t.size() < static_cast<std::size_t>(m * n)) t.resize(static_cast<std::size_t>(m * n));
  matmul_bf16_operands(ta, tb, m, n, k, a, lda, b, ldb, t.data(), n, false);
  for (std::int64_t i = 0; i < m; ++i) {
    float* row = c + i * ldc;
    const float* ti = t.data() + i * n;
    if (beta != 0.0f) {
      for (std::int64_t j = 0; j < n; ++j) row[j] += alpha * ti[j];
    } else {
      for (std::int64_t j = 0; j < n; ++j) row[j] = alpha * ti[j];
    }
  }
}

// The keys query position p sees: [first, p].
std::int64_t first_key(std::int64_t p, std::int64_t window) { return window > 0 ? std::max<std::int64_t>(0, p - window + 1) : 0; }

void check_bounds(std::span<const std::int64_t> bounds, std::int64_t heads, std::int64_t kv_heads) {
  if (bounds.size() < 2) fail("attention: a batch needs at least one sequence");
  for (std::size_t s = 0; s + 1 < bounds.size(); ++s) {
    if (bounds[s + 1] <= bounds[s]) fail("attention: sequence {} is empty", s);
  }
  if (kv_heads <= 0 || heads % kv_heads != 0) fail("attention: {} heads do not group over {} key/value heads", heads, kv_heads);
}

}  // namespace

void rmsnorm_backward(const float* x, const float* weight, const float* rstd, const float* dy, std::int64_t rows,
                      std::int64_t dim, float* dx, float* dweight) {
  // y_i = w_i x_i r with r = (mean(x²) + eps)^-1/2, so dx_i = r g_i - x_i r³ (g · x) / dim, g = w ⊙ dy.
  const std::int64_t blocks = (rows + kSumBlockRows - 1) / kSumBlockRows;
  std::vector<float> partial(dweight != nullptr ? static_cast<std::size_t>(blocks * dim) : 0, 0.0f);
  parallel_each(blocks, 1, rows * dim > 16384, [&](std::int64_t b) {
    float* dw = dweight != nullptr ? partial.data() + b * dim : nullptr;
    for (std::int64_t r = b * kSumBlockRows; r < std::min(rows, (b + 1) * kSumBlockRows); ++r) {
      const float* xr = x + r * dim;
      const float* gr = dy + r * dim;
      const float s = rstd[r];
      // Four partial sums (independent chains: one long chain of double adds ran at its latency).
      double part[4] = {0, 0, 0, 0};
      std::int64_t j = 0;
      for (; j + 4 <= dim; j += 4) {
        for (int l = 0; l < 4; ++l) part[l] += static_cast<double>(gr[j + l]) * weight[j + l] * xr[j + l];
      }
      for (; j < dim; ++j) part[0] += static_cast<double>(gr[j]) * weight[j] * xr[j];
      const double dot = (part[0] + part[1]) + (part[2] + part[3]);
      const float c = static_cast<float>(dot / static_cast<double>(dim)) * s * s * s;
      float* dxr = dx + r * dim;
      for (std::int64_t i = 0; i < dim; ++i) dxr[i] += s * (gr[i] * weight[i]) - c * xr[i];
      if (dweight == nullptr) continue;
      for (std::int64_t i = 0; i < dim; ++i) dw[i] += gr[i] * (xr[i] * s);
    }
  });
  if (dweight == nullptr) return;
  for (std::int64_t b = 0; b < blocks; ++b) {
    for (std::int64_t i = 0; i < dim; ++i) dweight[i] += partial[static_cast<std::size_t>(b * dim + i)];
  }
}

void silu_mul_backward(const float* gate, const float* up, const float* dh, std::int64_t n, float* dgate, float* dup) {
  const bool simd = simd_ops();
  auto range = [&](std::int64_t i0, std::int64_t i1) {
    if (simd) {
      avx2::silu_mul_backward(gate + i0, up + i0, dh + i0, i1 - i0, dgate + i0, dup + i0);
      return;
    }
    for (std::int64_t i = i0; i < i1; ++i) {
      const float g = gate[i];
      const float sig = 1.0f / (1.0f + std::exp(-g));
      const float silu = g * sig;
      dup[i] = dh[i] * silu;
      dgate[i] = dh[i] * up[i] * (sig * (1.0f + g * (1.0f - sig)));
    }
  };
  if (n > 65536) {
    parallel_ranges(n, 4096, range);
  } else {
    range(0, n);
  }
}

void attention_saving(const float* q, const float* k, const float* v, std::span<const std::int64_t> bounds, std::int64_t heads,
                      std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out, float* lse, bool bf16_products) {
  check_bounds(bounds, heads, kv_heads);
  const std::int64_t group = heads / kv_heads, q_stride = heads * d, kv_stride = kv_heads * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // Items: (sequence, query block, head).
  struct Block {
    std::int64_t sequence, offset, i0, rows;
  };
  std::vector<Block> blocks;
  const std::size_t sequences = bounds.size() - 1;
  for (std::size_t s = 0; s < sequences; ++s) {
    const std::int64_t n = bounds[s + 1] - bounds[s];
    for (std::int64_t i0 = 0; i0 < n; i0 += kQueryBlock) blocks.push_back({static_cast<std::int64_t>(s), bounds[s], i0, std::min(kQueryBlock, n - i0)});
  }
  start_thread_pool();  // OpenBLAS single-threaded
  // bf16 products: where no window cuts a sequence, every query block's keys are a prefix of its keys,
  // so each (sequence, key/value head)'s Kᵀ and V are rounded and laid out once for all its heads and
  // blocks, not once per product.
  std::vector<Bf16Operand> kt, vn;
  std::vector<char> prefixes(sequences, 0);
  if (bf16_products) {
    for (std::size_t s = 0; s < sequences; ++s) prefixes[s] = window <= 0 || window >= bounds[s + 1] - bounds[s];
    kt.resize(sequences * static_cast<std::size_t>(kv_heads));
    vn.resize(kt.size());
    parallel_for(static_cast<std::int64_t>(kt.size()), [&](std::int64_t item) {
      const auto s = static_cast<std::size_t>(item / kv_heads);
      const std::int64_t kh = item % kv_heads, offset = bounds[s], n = bounds[s + 1] - offset;
      if (!prefixes[s]) return;
      kt[static_cast<std::size_t>(item)].assign(true, d, n, k + offset * kv_stride + kh * d, kv_stride);
      vn[static_cast<std::size_t>(item)].assign(false, n, d, v + offset * kv_stride + kh * d, kv_stride);
    });
  }
  parallel_for(static_cast<std::int64_t>(blocks.size()) * heads, [&](std::int64_t item) {
    const Block& blk = blocks[static_cast<std::size_t>(item / heads)];
    const std::int64_t h = item % heads, kh = h / group;
    const std::int64_t k0 = first_key(blk.i0, window), nk = blk.i0 + blk.rows - k0;
    const bool prefix = prefixes[static_cast<std::size_t>(blk.sequence)] != 0;
    const auto operand = static_cast<std::size_t>(blk.sequence * kv_heads + kh);
    thread_local std::vector<float> scores;
    scores.resize(static_cast<std::size_t>(blk.rows * nk));
    const float* qh = q + (blk.offset + blk.i0) * q_stride + h * d;
    const float* kb = k + (blk.offset + k0) * kv_stride + kh * d;
    const float* vb = v + (blk.offset + k0) * kv_stride + kh * d;
    if (prefix) scaled_scores(kt[operand], blk.rows, d, nk, scale, qh, q_stride, scores.data());
    else product(bf16_products, false, true, blk.rows, nk, d, scale, qh, q_stride, kb, kv_stride, 0.0f, scores.data(), nk);
    for (std::int64_t r = 0; r < blk.rows; ++r) {
      const std::int64_t p = blk.i0 + r, first = first_key(p, window) - k0, last = p - k0;
      float* row = scores.data() + r * nk;
      const float m = row_max(row + first, last - first + 1);
      const double total = exp_shifted(row + first, last - first + 1, m);
      std::fill(row, row + first, 0.0f);
      scale_row(row + first, last - first + 1, static_cast<float>(1.0 / total));
      std::fill(row + last + 1, row + nk, 0.0f);
      lse[(blk.offset + p) * heads + h] = m + static_cast<float>(std::log(total));
    }
    float* oh = out + (blk.offset + blk.i0) * q_stride + h * d;
    if (prefix) vn[operand].multiply_leading(false, blk.rows, nk, d, scores.data(), nk, oh, q_stride, false);
    else product(bf16_products, false, false, blk.rows, d, nk, 1.0f, scores.data(), nk, vb, kv_stride, 0.0f, oh, q_stride);
  });
}

void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse, const float* dout,
                        std::span<const std::int64_t> bounds, std::int64_t heads, std::int64_t kv_heads, std::int64_t d,
                        std::int64_t window, float* dq, float* dk, float* dv, bool bf16_products) {
  check_bounds(bounds, heads, kv_heads);
  const std::int64_t group = heads / kv_heads, q_stride = heads * d, kv_stride = kv_heads * d;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const auto sequences = static_cast<std::int64_t>(bounds.size()) - 1;
  start_thread_pool();  // OpenBLAS single-threaded
  // Items: (sequence, key/value head); an item owns its keys' and values' gradients and those of the
  // queries of its heads, so no two threads add to the same place.
  parallel_for(sequences * kv_heads, [&](std::int64_t item) {
    const std::int64_t s = item / kv_heads, kh = item % kv_heads;
    const std::int64_t offset = bounds[static_cast<std::size_t>(s)], n = bounds[static_cast<std::size_t>(s) + 1] - offset;
    float* dk_base = dk + offset * kv_stride + kh * d;
    float* dv_base = dv + offset * kv_stride + kh * d;
    for (std::int64_t r = 0; r < n; ++r) {
      std::fill(dk_base + r * kv_stride, dk_base + r * kv_stride + d, 0.0f);
      std::fill(dv_base + r * kv_stride, dv_base + r * kv_stride + d, 0.0f);
    }
    thread_local std::vector<float> p_buf, dp_buf, delta;
    // bf16 products without a window: every query block's keys are a prefix of the sequence's, so K
    // and V are rounded and laid out once for all the item's heads and blocks (Kᵀ and Vᵀ for the
    // scores, K for dQ), not once per product.
    thread_local Bf16Operand kt, vt, kn;
    const bool prefixes = bf16_products && (window <= 0 || window >= n);
    if (prefixes) {
      kt.assign(true, d, n, k + offset * kv_stride + kh * d, kv_stride);
      vt.assign(true, d, n, v + offset * kv_stride + kh * d, kv_stride);
      kn.assign(false, n, d, k + offset * kv_stride + kh * d, kv_stride);
    }
    for (std::int64_t h = kh * group; h < (kh + 1) * group; ++h) {
      for (std::int64_t i0 = 0; i0 < n; i0 += kQueryBlock) {
        const std::int64_t rows = std::min(kQueryBlock, n - i0);
        const std::int64_t k0 = first_key(i0, window), nk = i0 + rows - k0;
        p_buf.resize(static_cast<std::size_t>(rows * nk));
        dp_buf.resize(p_buf.size());
        delta.resize(static_cast<std::size_t>(rows));
        float* P = p_buf.data();
        float* dP = dp_buf.data();
        const float* qh = q + (offset + i0) * q_stride + h * d;
        const float* oh = out + (offset + i0) * q_stride + h * d;
        const float* doh = dout + (offset + i0) * q_stride + h * d;
        const float* kb = k + (offset + k0) * kv_stride + kh * d;
        const float* vb = v + (offset + k0) * kv_stride + kh * d;
        // P = softmax(scale · Q Kᵀ), recomputed from the saved log-sum-exp.
        if (prefixes) scaled_scores(kt, rows, d, nk, scale, qh, q_stride, P);
        else product(bf16_products, false, true, rows, nk, d, scale, qh, q_stride, kb, kv_stride, 0.0f, P, nk);
        for (std::int64_t r = 0; r < rows; ++r) {
          const std::int64_t p = i0 + r, first = first_key(p, window) - k0, last = p - k0;
          float* row = P + r * nk;
          const float l = lse[(offset + p) * heads + h];
          std::fill(row, row + first, 0.0f);
          exp_shifted(row + first, last - first + 1, l);
          std::fill(row + last + 1, row + nk, 0.0f);
          // rowsum(dO ⊙ O) in four partial sums (independent chains of double adds).
          const float* dor = doh + r * q_stride;
          const float* orow = oh + r * q_stride;
          double part[4] = {0, 0, 0, 0};
          std::int64_t t = 0;
          for (; t + 4 <= d; t += 4) {
            for (int lane = 0; lane < 4; ++lane) part[lane] += static_cast<double>(dor[t + lane]) * orow[t + lane];
          }
          for (; t < d; ++t) part[0] += static_cast<double>(dor[t]) * orow[t];
          delta[static_cast<std::size_t>(r)] = static_cast<float>((part[0] + part[1]) + (part[2] + part[3]));
        }
        // dV += Pᵀ dO; dP = dO Vᵀ.
        product(bf16_products, true, false, nk, d, rows, 1.0f, P, nk, doh, q_stride, 1.0f, dv_base + k0 * kv_stride, kv_stride);
        if (prefixes) vt.multiply_leading(false, rows, d, nk, doh, q_stride, dP, nk, false);
        else product(bf16_products, false, true, rows, nk, d, 1.0f, doh, q_stride, vb, kv_stride, 0.0f, dP, nk);
        // dS = P ⊙ (dP - rowsum(dO ⊙ O)), the softmax's gradient (zero where P is).
        for (std::int64_t r = 0; r < rows; ++r) {
          const float dl = delta[static_cast<std::size_t>(r)];
          if (simd_ops()) {
            avx2::softmax_backward_row(P + r * nk, nk, dl, dP + r * nk);
          } else {
            for (std::int64_t j = 0; j < nk; ++j) dP[r * nk + j] = P[r * nk + j] * (dP[r * nk + j] - dl);
          }
        }
        // dQ = scale · dS K; dK += scale · dSᵀ Q.
        if (prefixes) scaled_leading(kn, rows, nk, d, scale, dP, nk, dq + (offset + i0) * q_stride + h * d, q_stride);
        else product(bf16_products, false, false, rows, d, nk, scale, dP, nk, kb, kv_stride, 0.0f, dq + (offset + i0) * q_stride + h * d, q_stride);
        product(bf16_products, true, false, nk, d, rows, scale, dP, nk, qh, q_stride, 1.0f, dk_base + k0 * kv_stride, kv_stride);
      }
    }
  });
}

double cross_entropy_backward(float* logits, const std::int32_t* targets, std::int64_t rows, std::int64_t vocab, float grad_scale,
                              double* row_losses) {
  std::vector<double> losses(static_cast<std::size_t>(rows));
  parallel_each(rows, 1, rows * vocab > 65536, [&](std::int64_t r) {
    float* row = logits + r * vocab;
    const std::int32_t t = targets[r];
    if (t < 0 || t >= vocab) fail("cross-entropy: target {} of row {} is outside the vocabulary of {}", t, r, vocab);
    const float m = row_max(row, vocab);
    const float target_logit = row[t];
    const double total = exp_shifted(row, vocab, m);
    losses[static_cast<std::size_t>(r)] = static_cast<double>(m) + std::log(total) - target_logit;
    scale_row(row, vocab, static_cast<float>(grad_scale / total));
    row[t] -= grad_scale;
  });
  double sum = 0;
  for (const double l : losses) sum += l;
  if (row_losses != nullptr) std::copy(losses.begin(), losses.end(), row_losses);
  return sum;
}

double distillation_backward(float* student, const float* teacher, std::int64_t rows, std::int64_t vocab, float temperature,
                             float grad_scale) {
  if (!(temperature > 0.0f) || !std::isfinite(temperature)) fail("distillation: temperature {} is not a positive number", temperature);
  std::vector<double> losses(static_cast<std::size_t>(rows));
  const double inv_t = 1.0 / temperature;
  parallel_each(rows, 1, rows * vocab > 65536, [&](std::int64_t r) {
    float* s = student + r * vocab;
    const float* t = teacher + r * vocab;
    const double ms = row_max(s, vocab), mt = row_max(t, vocab);
    double zs = 0, zt = 0;
    for (std::int64_t i = 0; i < vocab; ++i) {
      zs += std::exp((s[i] - ms) * inv_t);
      zt += std::exp((t[i] - mt) * inv_t);
    }
    const double lse_s = ms * inv_t + std::log(zs), lse_t = mt * inv_t + std::log(zt);
    double kl = 0;
    const double g = static_cast<double>(grad_scale) * temperature;
    for (std::int64_t i = 0; i < vocab; ++i) {
      const double log_ps = s[i] * inv_t - lse_s, log_pt = t[i] * inv_t - lse_t;
      const double pt = std::exp(log_pt);
      kl += pt * (log_pt - log_ps);
      s[i] = static_cast<float>(g * (std::exp(log_ps) - pt));
    }
    losses[static_cast<std::size_t>(r)] = static_cast<double>(temperature) * temperature * kl;
  });
  double sum = 0;
  for (const double l : losses) sum += l;
  return sum;
}

void embedding_backward(const std::int32_t* tokens, std::int64_t rows, const float* dy, std::int64_t dim, float* dtable) {
  // Columns split over the threads; within a column the rows add in order.
  parallel_ranges(dim, 64, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t r = 0; r < rows; ++r) {
      float* dst = dtable + static_cast<std::int64_t>(tokens[r]) * dim;
      const float* src = dy + r * dim;
      for (std::int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  });
}

void bias_backward(const float* dy, std::int64_t rows, std::int64_t n, float* dbias) {
  parallel_ranges(n, 64, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t c = c0; c < c1; ++c) {
      double sum = 0;
      for (std::int64_t r = 0; r < rows; ++r) sum += dy[r * n + c];
      dbias[c] += static_cast<float>(sum);
    }
  });
}

}  // namespace mopt::kernels
