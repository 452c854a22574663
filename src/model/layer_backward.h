// A decoder layer's training forward and its backward (llm.c-style), beside decoder_layer_forward:
// the forward keeps in LayerActivations what the backward reads; the backward turns the gradient of
// the layer's output into the gradient of its input and adds every parameter's gradient.
//
// The parameters are plain f32 arrays (training's own copies, in the order of kAllLinears); the
// batch is packed: sequence s holds rows [bounds[s], bounds[s + 1]) at positions 0, 1, ... (no KV
// cache). The forward computes what decoder_layer_forward computes (tests/train: the loss equals the
// inference forward's); the gradients are checked against PyTorch autograd (tests/data/train/grads).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "io/hf_config.h"
#include "quant/act_quant.h"

namespace mopt::model {

// A layer's fake-quantized activations in the training forward (quantization-aware training), as
// data: each Linear's input quantizer (kAllLinears order; null: none), the keys' after RoPE and the
// values'. The forward applies quant::ActivationQuantizer::forward, the backward its straight-through
// gradient (with `clip`, zero where the scaled value exceeds its amax). Fake-quantized weights are
// simply the weights LayerParams points to.
struct LayerFakeQuant {
  std::array<const quant::ActivationQuantizer*, 7> input{};
  const quant::ActivationQuantizer* key = nullptr;
  const quant::ActivationQuantizer* value = nullptr;
  bool clip = false;
};

// A layer's weights: norms [hidden] (q/k norms [head_dim], Qwen3, else null), each Linear's weight
// [out, in] and bias [out] (null when it has none), indexed as kAllLinears (q, k, v, o, gate, up, down).
struct LayerParams {
  const float* input_norm = nullptr;
  const float* post_norm = nullptr;
  const float* q_norm = nullptr;
  const float* k_norm = nullptr;
  std::array<const float*, 7> weight{};
  std::array<const float*, 7> bias{};
  const LayerFakeQuant* fake_quant = nullptr;  // null: nothing quantized
  // Mixed precision: the Linears' products (forward, dX, dW) on bf16-rounded operands with f32 sums
  // (kernels::matmul_bf16_operands); attention, norms and everything else stay f32.
  bool bf16_products = false;
};

// Where their gradients are added: the same layout (null for what the layer lacks, or where no
// gradient is wanted: the activations' gradients are computed all the same).
struct LayerGrads {
  float* input_norm = nullptr;
  float* post_norm = nullptr;
  float* q_norm = nullptr;
  float* k_norm = nullptr;
  std::array<float*, 7> weight{};
  std::array<float*, 7> bias{};
  // Called in the backward with each Linear's input [rows, in] as it entered the product (fake-
  // quantized when it was) and the gradient of its output [rows, out]; empty: nothing is called.
  // Mixed precision's gradient scores are made from these.
  std::function<void(std::size_t kind, const float* x, const float* dy, std::int64_t rows, std::int64_t in, std::int64_t out)> observe_linear;
};

// What the forward keeps for the backward.
struct LayerActivations {
  std::vector<float> x_in, rstd1, n1, q_lin, k_lin, rstd_q, rstd_k, q, k, v, attn, lse, x_mid, rstd2, n2, gate, up, h;
  std::vector<std::int32_t> positions;
  // With fake quantization: each quantized Linear's input as it entered the product, and the keys
  // (after RoPE) and values before their rounding.
  std::array<std::vector<float>, 7> input_q;
  std::vector<float> k_pre, v_pre;
  std::uint64_t bytes() const;
};

// The backward's buffers, reused from layer to layer.
struct LayerBackwardScratch {
  std::vector<float> dh, dgate, dup, dn, dattn, dq, dk, dv, dlin, dinput_q;
};

// out [rows, hidden] = the layer applied to x (out may be x); `saved` receives the activations.
void decoder_layer_forward_saving(const io::ModelConfig& config, const std::vector<float>& inv_freq, const LayerParams& params,
                                  const float* x, std::int64_t rows, std::span<const std::int64_t> bounds, LayerActivations& saved,
                                  float* out);

// dhidden [rows, hidden]: the gradient of the layer's output on entry, of its input on return.
void decoder_layer_backward(const io::ModelConfig& config, const std::vector<float>& inv_freq, const LayerParams& params,
                            const LayerActivations& saved, std::int64_t rows, std::span<const std::int64_t> bounds, float* dhidden,
                            const LayerGrads& grads, LayerBackwardScratch& scratch);

}  // namespace mopt::model
