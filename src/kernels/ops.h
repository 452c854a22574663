// The element-wise and attention operations of a Llama-family decoder, in f32,
// written to match what Hugging Face transformers computes.
#pragma once

#include <cstdint>
#include <vector>


namespace mopt::kernels {

// y[r] = x[r] / sqrt(mean(x[r]²) + eps) * weight, for each of `rows` rows of `dim`.
// `y` may equal `x`.
void rmsnorm(const float* x, const float* weight, std::int64_t rows, std::int64_t dim, float eps, float* y);
// The same, also writing each row's 1 / sqrt(mean(x²) + eps) to rstd [rows] (when not null), which
// the backward (rmsnorm_backward, backward.h) reads.
void rmsnorm_saving(const float* x, const float* weight, std::int64_t rows, std::int64_t dim, float eps, float* y, float* rstd);

// Rotates x [rows, heads, head_dim] in place, row r at position positions[r],
// with the split-half ("rotate_half") pairing: element i pairs with i + d/2.
void apply_rope(float* x, std::int64_t rows, std::int64_t heads, std::int64_t head_dim, const std::int32_t* positions,
                const std::vector<float>& inv_freq);

// The inverse rotation (by minus each angle): RoPE's backward, the gradient of its input from its
// output's, in place.
void apply_rope_inverse(float* x, std::int64_t rows, std::int64_t heads, std::int64_t head_dim, const std::int32_t* positions,
                        const std::vector<float>& inv_freq);

// gate[i] = silu(gate[i]) * up[i].
void silu_mul(float* gate, const float* up, std::int64_t n);

// log Σ e^x[i] over [0, n) (n >= 1), in f64 with the largest x taken out first. The largest x
// itself when it is not finite (+inf, or -inf when every x is); NaN when an x is NaN.
double log_sum_exp(const float* x, std::int64_t n);

// KL(p ‖ q) in f64 for p = softmax(a), q = softmax(b) over [0, n): Σ p[i] (a[i] - b[i]) - lse(a) + lse(b),
// one e^ per element of each row. Also each row's log Σ e^ (as log_sum_exp). A term with p[i] = 0
// adds 0; NaN when a row is not finite.
double softmax_kl(const float* a, const float* b, std::int64_t n, double& lse_a, double& lse_b);

// Causal multi-head attention of one sequence with grouped key/value heads.
// q [n_q, heads, d] holds queries at positions q_pos; k, v [n_k, kv_heads, d]
// hold keys and values at positions 0..n_k-1. A query at position p sees keys
// at positions j <= p, and with window > 0 only those with p - j < window.
// out [n_q, heads, d]. Scores are scaled by 1/sqrt(d); softmax in f32.
void attention(const float* q, std::int64_t n_q, const std::int32_t* q_pos, const float* k, const float* v, std::int64_t n_k,
               std::int64_t heads, std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out);

// Keys or values as a KV cache stores them: rows of kv_heads * d elements.
enum class KvElement { f32, bf16, e4m3 };
struct KvRows {
  const void* data = nullptr;
  KvElement element = KvElement::f32;
  float scale = 1.0f;  // e4m3: the value of a code is e4m3_to_f32(code) * scale
};
std::size_t kv_element_bytes(KvElement element);
// `count` elements of `rows`, from element `first` on, in f32.
void kv_to_f32(const KvRows& rows, std::int64_t first, std::int64_t count, float* out);

// attention() over keys and values stored as KvRows: decode (n_q < 8) reads
// them in place, prefill widens them to f32 first and takes attention().
void attention_cached(const float* q, std::int64_t n_q, const std::int32_t* q_pos, const KvRows& k, const KvRows& v,
                      std::int64_t n_k, std::int64_t heads, std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out);

}  // namespace mopt::kernels
