// The backward passes of a Llama-family decoder's operations (ops.h; RoPE's is apply_rope_inverse there), in f32, and the forward
// operations training needs that inference does not (attention that keeps its log-sum-exp, the
// cross-entropy loss). Each gradient is the derivative of what the forward computes, checked against
// finite differences in f64 (tests/kernels/backward_test.cpp).
//
// Conventions: `dy` is the gradient of the loss with respect to the forward's output; a gradient of
// a parameter is added to (training accumulates over micro-batches); a gradient of an input is
// written unless the function says it adds. Sums that cross rows are computed in fixed blocks and
// added in a fixed order, so a gradient does not depend on the thread count.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace mopt::kernels {

// The gradient of y = rmsnorm(x) * weight: dx (added to) and dweight (added to) from dy, given x and
// the rstd rmsnorm_saving (ops.h) wrote; dweight null: not computed.
void rmsnorm_backward(const float* x, const float* weight, const float* rstd, const float* dy, std::int64_t rows,
                      std::int64_t dim, float* dx, float* dweight);

// h = silu(gate) * up: dgate and dup from dh (written).
void silu_mul_backward(const float* gate, const float* up, const float* dh, std::int64_t n, float* dgate, float* dup);

// Causal attention of every sequence of a packed batch. Sequence s holds rows
// [bounds[s], bounds[s + 1]) at positions 0, 1, ...; q [rows, heads, d], k and v [rows, kv_heads, d]
// (grouped heads), window > 0: a query sees only the last `window` keys (Mistral). Writes out
// [rows, heads, d] as attention() computes it, and lse [rows, heads], each score row's log-sum-exp
// (of the scaled scores), which the backward needs to recompute the probabilities. bf16_products:
// the products Q·Kᵀ and P·V on bf16-rounded operands with f32 sums (matmul_bf16_operands, mixed-
// precision training); the softmax stays f32.
void attention_saving(const float* q, const float* k, const float* v, std::span<const std::int64_t> bounds, std::int64_t heads,
                      std::int64_t kv_heads, std::int64_t d, std::int64_t window, float* out, float* lse, bool bf16_products = false);

// Its gradient: dq [rows, heads, d], dk and dv [rows, kv_heads, d] (written) from dout, given the
// forward's inputs, out and lse. The probabilities are recomputed block by block, so memory stays at
// a block of scores per thread whatever the sequence length.
void attention_backward(const float* q, const float* k, const float* v, const float* out, const float* lse, const float* dout,
                        std::span<const std::int64_t> bounds, std::int64_t heads, std::int64_t kv_heads, std::int64_t d,
                        std::int64_t window, float* dq, float* dk, float* dv, bool bf16_products = false);

// Cross-entropy of logits [rows, vocab] against targets [rows] (each in [0, vocab)): returns the sum
// of -log softmax(logits)[target] over the rows, and replaces the logits with the gradient of
// grad_scale times that sum: (softmax - onehot(target)) * grad_scale. In double: the sum.
// row_losses (optional, [rows]) receives each row's loss.
double cross_entropy_backward(float* logits, const std::int32_t* targets, std::int64_t rows, std::int64_t vocab, float grad_scale,
                              double* row_losses = nullptr);

// Logit distillation (the reference's LogitsDistillationLoss, per row): T² · KL(p_t ‖ p_s) with
// p_t = softmax(teacher / T) and p_s = softmax(student / T). Returns the sum over the rows and
// replaces the student's logits [rows, vocab] with the gradient of grad_scale times that sum:
// grad_scale · T · (p_s - p_t). In double: the sum.
double distillation_backward(float* student, const float* teacher, std::int64_t rows, std::int64_t vocab, float temperature,
                             float grad_scale);

// The embedding lookup's gradient: dtable[tokens[r]] += dy[r] for each row (rows in order, so
// repeated tokens add in a fixed order).
void embedding_backward(const std::int32_t* tokens, std::int64_t rows, const float* dy, std::int64_t dim, float* dtable);

// A bias's gradient: dbias[j] += sum over the rows of dy[r, j].
void bias_backward(const float* dy, std::int64_t rows, std::int64_t n, float* dbias);

}  // namespace mopt::kernels
