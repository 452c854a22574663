#include "train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"

namespace mopt::train {

AdamW::AdamW(const std::vector<Parameter>& params, AdamWSettings settings, std::vector<bool> decay)
    : settings_(settings), decay_(std::move(decay)) {
  if (decay_.size() != params.size()) fail("AdamW: {} decay flags for {} parameters", decay_.size(), params.size());
  lr_scale_.assign(params.size(), 1.0);
  for (const auto& p : params) {
    m_.emplace_back(p.value.size(), 0.0f);
    v_.emplace_back(p.value.size(), 0.0f);
  }
}

void AdamW::step(std::vector<Parameter>& params, double lr) {
  ++step_;
  const auto& s = settings_;
  const double t = static_cast<double>(step_);
  const double correction2_sqrt = std::sqrt(1.0 - std::pow(s.beta2, t));
  const auto b1 = static_cast<float>(s.beta1), b2 = static_cast<float>(s.beta2);
  const auto eps = static_cast<float>(s.eps), c2 = static_cast<float>(correction2_sqrt);
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto& p = params[i];
    const double rate = lr * lr_scale_[i];
    const auto size = static_cast<float>(rate / (1.0 - std::pow(s.beta1, t)));
    const auto shrink = static_cast<float>(decay_[i] ? 1.0 - rate * s.weight_decay : 1.0);
    float* value = p.value.data();
    const float* grad = p.grad.data();
    float* m = m_[i].data();
    float* v = v_[i].data();
    parallel_ranges(p.numel(), 16384, [&](std::int64_t i0, std::int64_t i1) {
      for (std::int64_t j = i0; j < i1; ++j) {
        const float g = grad[j];
        value[j] *= shrink;
        m[j] += (1.0f - b1) * (g - m[j]);
        v[j] = b2 * v[j] + (1.0f - b2) * g * g;
        value[j] -= size * m[j] / (std::sqrt(v[j]) / c2 + eps);
      }
    });
  }
}

std::vector<bool> weight_decay_mask(const std::vector<Parameter>& params) {
  std::vector<bool> decay;
  for (const auto& p : params) decay.push_back(p.shape.size() == 2 && p.name != "model.embed_tokens.weight");
  return decay;
}

double gradient_norm(const std::vector<Parameter>& params) {
  // Sums of squares in double per piece of 2^16 gradients (on the pool), added in order: the same
  // bits whatever the thread count.
  constexpr std::int64_t kPiece = std::int64_t{1} << 16;
  std::vector<std::pair<const float*, std::int64_t>> pieces;
  for (const auto& p : params) {
    const auto n = static_cast<std::int64_t>(p.grad.size());
    for (std::int64_t i = 0; i < n; i += kPiece) pieces.emplace_back(p.grad.data() + i, std::min(kPiece, n - i));
  }
  std::vector<double> sums(pieces.size());
  parallel_for(static_cast<std::int64_t>(pieces.size()), [&](std::int64_t k) {
    const auto [g, n] = pieces[static_cast<std::size_t>(k)];
    double s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(g[i]) * g[i];
    sums[static_cast<std::size_t>(k)] = s;
  });
  double sum = 0;
  for (const double s : sums) sum += s;
  return std::sqrt(sum);
}

double clip_gradients(std::vector<Parameter>& params, double max_norm) {
  const double norm = gradient_norm(params);
  if (max_norm <= 0) return norm;
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    const auto c = static_cast<float>(coef);
    for (auto& p : params) {
      float* g = p.grad.data();
      parallel_ranges(static_cast<std::int64_t>(p.grad.size()), 16384, [&](std::int64_t i0, std::int64_t i1) {
        for (std::int64_t i = i0; i < i1; ++i) g[i] *= c;
      });
    }
  }
  return norm;
}

void mask_gradients(std::vector<Parameter>& params) {
  for (auto& p : params) {
    if (p.mask.empty() || p.grad.empty()) continue;
    if (p.mask.size() != p.grad.size()) fail("{}: a sparsity mask of {} values for {} gradients", p.name, p.mask.size(), p.grad.size());
    for (std::size_t i = 0; i < p.grad.size(); ++i) {
      if (p.mask[i] == 0) p.grad[i] = 0.0f;
    }
  }
}

void mask_values(std::vector<Parameter>& params) {
  for (auto& p : params) {
    if (p.mask.empty()) continue;
    if (p.mask.size() != p.value.size()) fail("{}: a sparsity mask of {} values for {} weights", p.name, p.mask.size(), p.value.size());
    for (std::size_t i = 0; i < p.value.size(); ++i) {
      if (p.mask[i] == 0) p.value[i] = 0.0f;
    }
  }
}

Schedule parse_schedule(const std::string& name) {
  if (name == "constant") return Schedule::constant;
  if (name == "linear") return Schedule::linear;
  if (name == "cosine") return Schedule::cosine;
  fail("unknown learning-rate schedule '{}' (constant, linear or cosine)", name);
}

double learning_rate(double lr, Schedule schedule, std::int64_t step, std::int64_t total, std::int64_t warmup, double min_ratio) {
  if (step < warmup) return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (schedule == Schedule::constant) return lr;
  const double progress = total > warmup ? static_cast<double>(step - warmup) / static_cast<double>(total - warmup) : 1.0;
  const double shape = schedule == Schedule::linear ? 1.0 - progress : 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return lr * (min_ratio + (1.0 - min_ratio) * shape);
}

}  // namespace mopt::train
