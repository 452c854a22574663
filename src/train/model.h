// A Llama-family model as training holds it: every parameter an owned f32 tensor with its gradient,
// a forward pass that keeps what the backward needs, and the backward pass (llm.c-style: one
// explicit function per layer, the activations it needs saved in buffers of their own).
//
// The loss is the cross-entropy of next-token prediction summed over the rows that have a target
// (targets < 0 are ignored: padding, the prompt of a supervised example) and scaled by the caller's
// grad_scale (1 / the targets of a whole optimizer step, so micro-batches add up to the step's mean).
//
// Memory: parameters and gradients, plus either every layer's activations (the default) or, with
// recomputation, each layer's input and one layer's activations: the layer is run forward again just
// before its backward.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "kernels/gemm.h"
#include "model/layer_backward.h"

namespace mopt::train {

struct Parameter {
  std::string name;  // the Hugging Face name, "model.layers.0.self_attn.q_proj.weight"
  Shape shape;
  std::vector<float> value;
  std::vector<float> grad;
  // 2:4 sparse training: 1 = trained, 0 = held at zero (its gradient is dropped and its value stays
  // 0 through every step); empty: dense.
  std::vector<std::uint8_t> mask;
  std::int64_t numel() const { return static_cast<std::int64_t>(value.size()); }
};

// A packed batch: sequence s holds rows [bounds[s], bounds[s + 1]) at positions 0, 1, ...
// targets[r] is the token row r should predict (its next token), or < 0 for none.
struct Batch {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
  std::vector<std::int64_t> bounds;
  std::int64_t rows() const { return static_cast<std::int64_t>(tokens.size()); }
  std::int64_t target_count() const;
  // Throws Error naming `label` when the sizes disagree, a token or target is outside the
  // vocabulary or a sequence is empty.
  void check(std::int64_t vocab, const std::string& label) const;
};

struct LossResult {
  double loss_sum = 0;         // the summed loss over the batch's targets (nats): the cross-entropy, or with
                               // distillation kd_weight x the distillation loss + (1 - kd_weight) x the cross-entropy
  double cross_entropy_sum = 0;  // the summed cross-entropy alone
  double cross_entropy_squares = 0;  // the sum of each target's cross-entropy squared (for a standard error)
  std::int64_t targets = 0;    // how many rows had one
};

class FakeQuantization;
class TrainableModel;

// Quantization-aware distillation: the loss of each row with a target is the reference's
// LogitsDistillationLoss against the teacher's logits, T² · KL(softmax(teacher / T) ‖ softmax(student / T)),
// mixed with the cross-entropy when kd_weight < 1. The teacher runs in lockstep, without gradients.
struct Distillation {
  TrainableModel* teacher = nullptr;
  float temperature = 1.0f;
  float kd_weight = 1.0f;
};

class TrainableModel {
 public:
  // Every tensor of the checkpoint widened to f32. Without `gradients` the model only runs forward
  // (a distillation teacher): no gradient memory, and forward_backward is refused.
  static TrainableModel from_checkpoint(const io::Checkpoint& checkpoint, bool gradients = true);
  // A model initialized as transformers initializes it: Linear weights and embeddings normal with
  // std = initializer_range (the config's, 0.02 when absent), biases zero, norms one. Seeded.
  static TrainableModel initialize(const io::ModelConfig& config, std::uint64_t seed);

  const io::ModelConfig& config() const { return config_; }
  std::vector<Parameter>& parameters() { return params_; }
  const std::vector<Parameter>& parameters() const { return params_; }

  // Adds a trained parameter that is not a tensor of the model (a learned quantization scale);
  // returns its index in parameters().
  int add_parameter(Parameter parameter);
  // The parameter of that Hugging Face name; throws Error when there is none.
  Parameter& parameter(const std::string& name);
  const Parameter& parameter(const std::string& name) const;

  // Recompute each layer's activations in the backward pass instead of keeping them all.
  void set_recompute(bool recompute) { recompute_ = recompute; }
  // Mixed precision: every Linear's and the LM head's products (forward and backward) on bf16-rounded
  // operands with f32 sums (kernels::matmul_bf16_operands; AMX where the CPU has it). Parameters,
  // gradients, optimizer state and every other operation stay f32.
  void set_bf16_products(bool bf16) { bf16_products_ = bf16; }
  bool bf16_products() const { return bf16_products_; }
  // Quantization-aware training: every pass fake-quantizes the weights, inputs and KV as `fq` says
  // (null: none). The gradients go to the f32 master weights.
  void set_fake_quantization(std::shared_ptr<const FakeQuantization> fq) { fake_quant_ = std::move(fq); }
  // Distillation from a teacher in forward_backward (std::nullopt: cross-entropy). The teacher must
  // share the vocabulary and outlive the calls.
  void set_distillation(std::optional<Distillation> distillation);
  // The final norm's output [rows with a target, hidden] of the forward pass (a teacher's part).
  const std::vector<float>& head_inputs(const Batch& batch);
  // The head's weight [vocab, hidden] (the embeddings when tied).
  const float* head_weight() const { return value(head_); }

  // Forward and backward over the batch: adds grad_scale x the gradient of the summed loss to every
  // parameter's grad, and returns the summed loss.
  LossResult forward_backward(const Batch& batch, float grad_scale);
  // The forward pass alone (validation): the summed loss.
  LossResult loss(const Batch& batch);
  // Forward and backward computing only the gradients of activations, for the Linear observer
  // (mixed precision's gradient scores): no parameter gradient is computed or changed, and a model
  // loaded without gradients runs it too (memory: the f32 parameters and the activations).
  LossResult input_gradients(const Batch& batch, float grad_scale);

  // Called in every backward with each decoder Linear's input and the gradient of its output
  // (model::LayerGrads::observe_linear, with the layer); empty: nothing is called.
  using LinearGradientObserver = std::function<void(std::int64_t layer, std::size_t kind, const float* x, const float* dy, std::int64_t rows,
                                                    std::int64_t in, std::int64_t out)>;
  void set_linear_gradient_observer(LinearGradientObserver observer) { linear_observer_ = std::move(observer); }

  void zero_grad();
  // Bytes of activations the last forward_backward kept (for reports and the memory test).
  std::uint64_t activation_bytes() const { return activation_bytes_; }

 private:
  // A layer's parameters as indices into params_ (-1: absent), Linears in kAllLinears order.
  struct LayerIndex {
    int input_norm = -1, post_norm = -1, q_norm = -1, k_norm = -1;
    std::array<int, 7> weight{}, bias{};
  };

  TrainableModel(io::ModelConfig config, std::vector<Parameter> params, bool gradients = true);
  const float* value(int index) const { return params_[static_cast<std::size_t>(index)].value.data(); }
  // Null while input_gradients() runs: no parameter gradient is computed then.
  float* grad(int index) { return parameter_grads_ ? params_[static_cast<std::size_t>(index)].grad.data() : nullptr; }
  model::LayerParams layer_params(std::int64_t layer) const;
  model::LayerGrads layer_grads(std::int64_t layer);
  LossResult run(const Batch& batch, float grad_scale, bool backward);
  // Embeddings and layers over the batch into hidden_ (activations kept as `backward` needs), the
  // final norm into normed_/rstd_, and the rows with a target into chosen_.
  void forward_to_head(const Batch& batch, bool backward);
  void quantize_weights();

  io::ModelConfig config_;
  std::vector<Parameter> params_;
  std::vector<LayerIndex> layers_;
  int embed_ = -1, final_norm_ = -1, head_ = -1;  // head_: the embeddings when tied
  std::vector<float> inv_freq_;
  bool recompute_ = false;
  bool bf16_products_ = false;
  kernels::Bf16Operand head_rows_, head_columns_;  // the head rounded once per pass: for the logits, for dX
  bool gradients_ = true;
  bool parameter_grads_ = true;
  std::uint64_t activation_bytes_ = 0;
  // Buffers kept from step to step: allocating them anew each step cost page faults on every touch.
  std::vector<model::LayerActivations> saved_;
  std::vector<std::vector<float>> inputs_;  // each layer's input, when recomputing
  model::LayerBackwardScratch scratch_;
  std::vector<float> hidden_, normed_, rstd_, dnormed_, dhidden_, recomputed_out_, x_, logits_, dx_, head_inputs_, teacher_logits_, ce_grad_;
  std::vector<std::int64_t> chosen_;
  std::vector<double> row_losses_;
  std::unordered_map<std::string, int> index_;
  std::shared_ptr<const FakeQuantization> fake_quant_;
  LinearGradientObserver linear_observer_;
  std::vector<std::vector<float>> quantized_weights_;  // per parameter: its fake quantization this pass (QAT)
  std::vector<std::vector<float>> quantized_grads_;    // per parameter: the gradient of that fake quantization
  std::optional<Distillation> distillation_;
};

}  // namespace mopt::train
