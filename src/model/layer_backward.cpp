#include "model/layer_backward.h"

#include "kernels/backward.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"

namespace mopt::model {

namespace {

enum : std::size_t { Q, K, V, O, GATE, UP, DOWN };

std::vector<float>& sized(std::vector<float>& v, std::int64_t n) {
  v.resize(static_cast<std::size_t>(n));
  return v;
}

// C = op(A) · op(B) (+ C): f32, or on bf16 operands (LayerParams::bf16_products).
void product(bool bf16, bool ta, bool tb, std::int64_t m, std::int64_t n, std::int64_t k, const float* a, std::int64_t lda, const float* b,
             std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  if (bf16) kernels::matmul_bf16_operands(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  else kernels::matmul_f32(ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

// y [rows, out] = x [rows, in] · wᵀ (+ bias).
void linear(bool bf16, const float* x, std::int64_t rows, std::int64_t in, const float* w, const float* bias, std::int64_t out, float* y) {
  if (bf16) kernels::matmul_bf16_operands(false, true, rows, out, in, x, in, w, in, y, out, false);
  else kernels::gemm_f32(x, rows, in, w, out, y);
  if (bias != nullptr) {
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < out; ++j) y[r * out + j] += bias[j];
    }
  }
}

// The gradients of y = x · wᵀ + b: dx (written, or added to when `accumulate`) = dy · w,
// dw += dyᵀ · x, dbias += column sums of dy (dw, dbias null: not computed).
void linear_backward(bool bf16, const float* x, std::int64_t rows, std::int64_t in, const float* w, std::int64_t out, const float* dy,
                     float* dx, bool accumulate, float* dw, float* dbias) {
  product(bf16, false, false, rows, in, out, dy, out, w, in, dx, in, accumulate);
  if (dw != nullptr) product(bf16, true, false, out, in, rows, dy, out, x, in, dw, in, true);
  if (dbias != nullptr) kernels::bias_backward(dy, rows, out, dbias);
}

// Linear k's input: x, or its fake quantization kept in saved.input_q[k].
const float* linear_input(const LayerParams& w, std::size_t k, const float* x, std::int64_t rows, std::int64_t in, LayerActivations& s) {
  const quant::ActivationQuantizer* f = w.fake_quant != nullptr ? w.fake_quant->input[k] : nullptr;
  if (f == nullptr) {
    s.input_q[k].clear();
    return x;
  }
  f->forward(x, rows, in, sized(s.input_q[k], rows * in).data());
  return s.input_q[k].data();
}

// linear_backward for Linear k, whose input x may have been fake-quantized: dW from the quantized
// input, dx through the quantizer's backward.
void quantized_linear_backward(const LayerParams& w, const LayerActivations& s, std::size_t k, const float* x, std::int64_t rows, std::int64_t in,
                               std::int64_t out, const float* dy, float* dx, bool accumulate, const LayerGrads& g, LayerBackwardScratch& t) {
  const quant::ActivationQuantizer* f = w.fake_quant != nullptr ? w.fake_quant->input[k] : nullptr;
  if (g.observe_linear) g.observe_linear(k, f == nullptr ? x : s.input_q[k].data(), dy, rows, in, out);
  if (f == nullptr) {
    linear_backward(w.bf16_products, x, rows, in, w.weight[k], out, dy, dx, accumulate, g.weight[k], g.bias[k]);
    return;
  }
  float* dxq = sized(t.dinput_q, rows * in).data();
  linear_backward(w.bf16_products, s.input_q[k].data(), rows, in, w.weight[k], out, dy, dxq, false, g.weight[k], g.bias[k]);
  f->backward(x, dxq, rows, in, w.fake_quant->clip, dx, accumulate);
}

}  // namespace

std::uint64_t LayerActivations::bytes() const {
  std::uint64_t n = positions.size() * sizeof(std::int32_t);
  for (const auto* b : {&x_in, &rstd1, &n1, &q_lin, &k_lin, &rstd_q, &rstd_k, &q, &k, &v, &attn, &lse, &x_mid, &rstd2, &n2, &gate, &up, &h, &k_pre, &v_pre}) {
    n += b->size() * sizeof(float);
  }
  for (const auto& b : input_q) n += b.size() * sizeof(float);
  return n;
}

void decoder_layer_forward_saving(const io::ModelConfig& c, const std::vector<float>& inv_freq, const LayerParams& w, const float* x,
                                  std::int64_t rows, std::span<const std::int64_t> bounds, LayerActivations& s, float* out) {
  const std::int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const std::int64_t qd = nh * d, kvd = nkv * d, ff = c.intermediate_size;
  const auto eps = static_cast<float>(c.rms_norm_eps);

  s.positions.resize(static_cast<std::size_t>(rows));
  for (std::size_t q = 0; q + 1 < bounds.size(); ++q) {
    for (std::int64_t r = bounds[q]; r < bounds[q + 1]; ++r) s.positions[static_cast<std::size_t>(r)] = static_cast<std::int32_t>(r - bounds[q]);
  }
  s.x_in.assign(x, x + rows * H);
  kernels::rmsnorm_saving(x, w.input_norm, rows, H, eps, sized(s.n1, rows * H).data(), sized(s.rstd1, rows).data());
  linear(w.bf16_products, linear_input(w, Q, s.n1.data(), rows, H, s), rows, H, w.weight[Q], w.bias[Q], qd, sized(s.q, rows * qd).data());
  linear(w.bf16_products, linear_input(w, K, s.n1.data(), rows, H, s), rows, H, w.weight[K], w.bias[K], kvd, sized(s.k, rows * kvd).data());
  linear(w.bf16_products, linear_input(w, V, s.n1.data(), rows, H, s), rows, H, w.weight[V], w.bias[V], kvd, sized(s.v, rows * kvd).data());
  if (w.q_norm != nullptr) {
    s.q_lin = s.q;
    s.k_lin = s.k;
    kernels::rmsnorm_saving(s.q_lin.data(), w.q_norm, rows * nh, d, eps, s.q.data(), sized(s.rstd_q, rows * nh).data());
    kernels::rmsnorm_saving(s.k_lin.data(), w.k_norm, rows * nkv, d, eps, s.k.data(), sized(s.rstd_k, rows * nkv).data());
  }
  kernels::apply_rope(s.q.data(), rows, nh, d, s.positions.data(), inv_freq);
  kernels::apply_rope(s.k.data(), rows, nkv, d, s.positions.data(), inv_freq);
  const LayerFakeQuant* fq = w.fake_quant;
  if (fq != nullptr && fq->key != nullptr) {
    s.k_pre = s.k;
    fq->key->forward(s.k_pre.data(), rows, kvd, s.k.data());
  }
  if (fq != nullptr && fq->value != nullptr) {
    s.v_pre = s.v;
    fq->value->forward(s.v_pre.data(), rows, kvd, s.v.data());
  }
  kernels::attention_saving(s.q.data(), s.k.data(), s.v.data(), bounds, nh, nkv, d, c.sliding_window.value_or(0),
                            sized(s.attn, rows * qd).data(), sized(s.lse, rows * nh).data(), w.bf16_products);
  linear(w.bf16_products, linear_input(w, O, s.attn.data(), rows, qd, s), rows, qd, w.weight[O], w.bias[O], H, sized(s.x_mid, rows * H).data());
  for (std::int64_t i = 0; i < rows * H; ++i) s.x_mid[static_cast<std::size_t>(i)] += s.x_in[static_cast<std::size_t>(i)];
  kernels::rmsnorm_saving(s.x_mid.data(), w.post_norm, rows, H, eps, sized(s.n2, rows * H).data(), sized(s.rstd2, rows).data());
  linear(w.bf16_products, linear_input(w, GATE, s.n2.data(), rows, H, s), rows, H, w.weight[GATE], w.bias[GATE], ff, sized(s.gate, rows * ff).data());
  linear(w.bf16_products, linear_input(w, UP, s.n2.data(), rows, H, s), rows, H, w.weight[UP], w.bias[UP], ff, sized(s.up, rows * ff).data());
  s.h = s.gate;
  kernels::silu_mul(s.h.data(), s.up.data(), rows * ff);
  linear(w.bf16_products, linear_input(w, DOWN, s.h.data(), rows, ff, s), rows, ff, w.weight[DOWN], w.bias[DOWN], H, out);
  for (std::int64_t i = 0; i < rows * H; ++i) out[i] += s.x_mid[static_cast<std::size_t>(i)];
}

void decoder_layer_backward(const io::ModelConfig& c, const std::vector<float>& inv_freq, const LayerParams& w, const LayerActivations& s,
                            std::int64_t rows, std::span<const std::int64_t> bounds, float* dhidden, const LayerGrads& g,
                            LayerBackwardScratch& t) {
  const std::int64_t H = c.hidden_size, d = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const std::int64_t qd = nh * d, kvd = nkv * d, ff = c.intermediate_size;

  // MLP block: out = x_mid + down(silu(gate(n2)) * up(n2)); dhidden is d out, and d x_mid gathers into it.
  quantized_linear_backward(w, s, DOWN, s.h.data(), rows, ff, H, dhidden, sized(t.dh, rows * ff).data(), false, g, t);
  kernels::silu_mul_backward(s.gate.data(), s.up.data(), t.dh.data(), rows * ff, sized(t.dgate, rows * ff).data(),
                             sized(t.dup, rows * ff).data());
  quantized_linear_backward(w, s, GATE, s.n2.data(), rows, H, ff, t.dgate.data(), sized(t.dn, rows * H).data(), false, g, t);
  quantized_linear_backward(w, s, UP, s.n2.data(), rows, H, ff, t.dup.data(), t.dn.data(), true, g, t);
  kernels::rmsnorm_backward(s.x_mid.data(), w.post_norm, s.rstd2.data(), t.dn.data(), rows, H, dhidden, g.post_norm);

  // Attention block: x_mid = x + o(attention(rope(q), rope(k), v)); dhidden is now d x_mid.
  quantized_linear_backward(w, s, O, s.attn.data(), rows, qd, H, dhidden, sized(t.dattn, rows * qd).data(), false, g, t);
  kernels::attention_backward(s.q.data(), s.k.data(), s.v.data(), s.attn.data(), s.lse.data(), t.dattn.data(), bounds, nh, nkv, d,
                              c.sliding_window.value_or(0), sized(t.dq, rows * qd).data(), sized(t.dk, rows * kvd).data(),
                              sized(t.dv, rows * kvd).data(), w.bf16_products);
  const LayerFakeQuant* fq = w.fake_quant;
  if (fq != nullptr && fq->key != nullptr) {
    fq->key->backward(s.k_pre.data(), t.dk.data(), rows, kvd, fq->clip, sized(t.dlin, rows * kvd).data(), false);
    std::swap(t.dk, t.dlin);
  }
  if (fq != nullptr && fq->value != nullptr) {
    fq->value->backward(s.v_pre.data(), t.dv.data(), rows, kvd, fq->clip, sized(t.dlin, rows * kvd).data(), false);
    std::swap(t.dv, t.dlin);
  }
  kernels::apply_rope_inverse(t.dq.data(), rows, nh, d, s.positions.data(), inv_freq);
  kernels::apply_rope_inverse(t.dk.data(), rows, nkv, d, s.positions.data(), inv_freq);
  if (w.q_norm != nullptr) {
    t.dlin.assign(static_cast<std::size_t>(rows * qd), 0.0f);
    kernels::rmsnorm_backward(s.q_lin.data(), w.q_norm, s.rstd_q.data(), t.dq.data(), rows * nh, d, t.dlin.data(), g.q_norm);
    std::swap(t.dq, t.dlin);
    t.dlin.assign(static_cast<std::size_t>(rows * kvd), 0.0f);
    kernels::rmsnorm_backward(s.k_lin.data(), w.k_norm, s.rstd_k.data(), t.dk.data(), rows * nkv, d, t.dlin.data(), g.k_norm);
    std::swap(t.dk, t.dlin);
  }
  quantized_linear_backward(w, s, Q, s.n1.data(), rows, H, qd, t.dq.data(), sized(t.dn, rows * H).data(), false, g, t);
  quantized_linear_backward(w, s, K, s.n1.data(), rows, H, kvd, t.dk.data(), t.dn.data(), true, g, t);
  quantized_linear_backward(w, s, V, s.n1.data(), rows, H, kvd, t.dv.data(), t.dn.data(), true, g, t);
  kernels::rmsnorm_backward(s.x_in.data(), w.input_norm, s.rstd1.data(), t.dn.data(), rows, H, dhidden, g.input_norm);
}

}  // namespace mopt::model
