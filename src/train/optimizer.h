// AdamW as torch.optim.AdamW computes it (decoupled weight decay, bias correction, eps added to the
// corrected square root), global gradient-norm clipping as torch.nn.utils.clip_grad_norm_, and the
// learning-rate schedules.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "train/model.h"

namespace mopt::train {

struct AdamWSettings {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
};

class AdamW {
 public:
  // decay[i]: whether parameter i takes weight decay (training decays matrices, not norms or biases).
  AdamW(const std::vector<Parameter>& params, AdamWSettings settings, std::vector<bool> decay);
  // One step with learning rate lr on every parameter's grad (the grads are not changed).
  void step(std::vector<Parameter>& params, double lr);
  std::int64_t steps() const { return step_; }
  // The moments of parameter i (for the resume state and the tests).
  const std::vector<float>& first_moment(std::size_t i) const { return m_[i]; }
  const std::vector<float>& second_moment(std::size_t i) const { return v_[i]; }
  std::vector<float>& first_moment(std::size_t i) { return m_[i]; }
  std::vector<float>& second_moment(std::size_t i) { return v_[i]; }
  void set_steps(std::int64_t steps) { step_ = steps; }
  const AdamWSettings& settings() const { return settings_; }
  // Parameter i learns at `scale` x the step's learning rate (its own param group in torch's terms:
  // learned quantization scales).
  void set_lr_scale(std::size_t i, double scale) { lr_scale_.at(i) = scale; }

 private:
  AdamWSettings settings_;
  std::vector<bool> decay_;
  std::vector<double> lr_scale_;
  std::vector<std::vector<float>> m_, v_;
  std::int64_t step_ = 0;
};

// Which parameters take weight decay: the matrices, not norms, biases or the token embeddings (as the
// PyTorch script that trained models/tiny-kjv, and nanoGPT-style recipes).
std::vector<bool> weight_decay_mask(const std::vector<Parameter>& params);

// The global L2 norm of every gradient: squares summed in double in pieces of 2^16 gradients on the
// pool, the pieces' sums added in order (the same bits at every thread count).
double gradient_norm(const std::vector<Parameter>& params);
// Scales every gradient by max_norm / (norm + 1e-6) when that is below 1, as clip_grad_norm_ does;
// returns the norm before clipping. max_norm <= 0: no clipping (the norm is still returned).
double clip_gradients(std::vector<Parameter>& params, double max_norm);

// 2:4 sparse training (Parameter::mask): the gradients of pruned weights dropped (before the norm is
// taken, so clipping sees what the optimizer applies), and their values set to zero after a step.
void mask_gradients(std::vector<Parameter>& params);
void mask_values(std::vector<Parameter>& params);

enum class Schedule { constant, linear, cosine };
// "constant", "linear", "cosine"; anything else throws Error naming it.
Schedule parse_schedule(const std::string& name);

// The learning rate of step `step` (0-based) of `total`: a linear warmup over the first `warmup`
// steps, lr * (step + 1) / warmup (the first step already learns), then constant, or decaying to
// lr * min_ratio along a line or a half cosine (progress (step - warmup) / (total - warmup)).
double learning_rate(double lr, Schedule schedule, std::int64_t step, std::int64_t total, std::int64_t warmup, double min_ratio);

}  // namespace mopt::train
