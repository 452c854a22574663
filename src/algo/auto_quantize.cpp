#include "algo/auto_quantize.h"

#include <algorithm>
#include <cmath>
#include <fmt/format.h>

#include "algo/mixed_precision.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/ops.h"

namespace mopt::algo {

double effective_bits(const quant::LinearScheme& scheme) {
  if (!scheme.weight) return 16.0;
  const quant::QuantizerSpec& w = *scheme.weight;
  double bits = 0.0;
  switch (w.element) {
    case quant::Element::int8:
    case quant::Element::e4m3: bits = 8.0; break;
    case quant::Element::int4:
    case quant::Element::e2m1: bits = 4.0; break;
  }
  double scale_bits = 0.0;
  switch (w.scaling) {
    case quant::Scaling::block: scale_bits = w.element == quant::Element::e4m3 ? 32.0 : 16.0; break;  // FP8 tiles: f32 scales
    case quant::Scaling::nvfp4:
    case quant::Scaling::mx: scale_bits = 8.0; break;  // E4M3 and E8M0 block scales
    default: break;
  }
  if (scale_bits > 0.0 && w.block > 0) bits += scale_bits / static_cast<double>(w.block * std::max<std::int64_t>(1, w.block_rows));
  return bits;
}

std::vector<LinearGroup> linear_groups(const io::ModelConfig& c, bool whole_blocks) {
  using model::LinearKind;
  const std::int64_t q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  const std::int64_t qkv = c.hidden_size * (q_out + 2 * kv_out), o = q_out * c.hidden_size;
  const std::int64_t gate_up = 2 * c.hidden_size * c.intermediate_size, down = c.intermediate_size * c.hidden_size;
  std::vector<LinearGroup> groups;
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const std::string prefix = fmt::format("model.layers.{}.", l);
    const auto add = [&](std::vector<LinearKind> kinds, std::int64_t weights) {
      LinearGroup g;
      g.layer = l;
      g.kinds = std::move(kinds);
      g.weights = weights;
      for (const LinearKind k : g.kinds) {
        const std::string name(model::linear_name(k));
        g.modules.push_back(prefix + name);
        g.name += g.name.empty() ? prefix + name : "," + name.substr(name.find('.') + 1);
      }
      groups.push_back(std::move(g));
    };
    if (whole_blocks) {
      add({LinearKind::q, LinearKind::k, LinearKind::v, LinearKind::o}, qkv + o);
      add({LinearKind::gate, LinearKind::up, LinearKind::down}, gate_up + down);
      continue;
    }
    add({LinearKind::q, LinearKind::k, LinearKind::v}, qkv);
    add({LinearKind::o}, o);
    add({LinearKind::gate, LinearKind::up}, gate_up);
    add({LinearKind::down}, down);
  }
  return groups;
}

std::size_t group_of_tensor(const std::vector<LinearGroup>& groups, const std::string& tensor) {
  const std::size_t dot = tensor.rfind('.');
  const std::string owner = dot == std::string::npos ? tensor : tensor.substr(0, dot);  // "model.layers.3.mlp.up_proj"
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const std::string prefix = fmt::format("model.layers.{}.", groups[g].layer);
    for (std::size_t i = 0; i < groups[g].modules.size(); ++i) {
      if (owner == groups[g].modules[i]) return g;
      const model::LinearKind k = groups[g].kinds[i];
      if (k == model::LinearKind::q && tensor == prefix + "input_layernorm.weight") return g;
      if (k == model::LinearKind::gate && tensor == prefix + "post_attention_layernorm.weight") return g;
    }
  }
  fail("mixed precision: {} belongs to no group of Linears", tensor);
}

namespace {

// The norm that feeds a group (its first Linear's input), or nullptr.
Tensor* norm_of(model::LayerWeights& layer, const LinearGroup& g) {
  if (g.kinds.front() == model::LinearKind::q) return &layer.input_norm;
  if (g.kinds.front() == model::LinearKind::gate) return &layer.post_attention_norm;
  return nullptr;
}

// Groups of `base` swapped for a candidate's Linears and the norm that feeds them (AWQ folds its
// scale there); everything swapped is put back when this goes out of scope.
class Swapped {
 public:
  explicit Swapped(model::Model& base) : base_(base) {}
  Swapped(const Swapped&) = delete;
  Swapped& operator=(const Swapped&) = delete;
  ~Swapped() {
    for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
      model::LayerWeights& layer = base_.mutable_layer(it->group->layer);
      for (std::size_t i = 0; i < it->linears.size(); ++i) layer.linear(it->group->kinds[i]) = it->linears[i];
      if (Tensor* norm = norm_of(layer, *it->group)) *norm = it->norm;
    }
  }
  void take(const LinearGroup& g, model::Model& from_model) {
    model::LayerWeights& layer = base_.mutable_layer(g.layer);
    model::LayerWeights& from = from_model.mutable_layer(g.layer);
    Kept k{&g, {}, {}};
    for (const model::LinearKind kind : g.kinds) k.linears.push_back(layer.linear(kind));
    Tensor* norm = norm_of(layer, g);
    if (norm) k.norm = *norm;
    kept_.push_back(std::move(k));
    for (const model::LinearKind kind : g.kinds) layer.linear(kind) = from.linear(kind);
    if (norm) *norm = *norm_of(from, g);
  }

 private:
  struct Kept {
    const LinearGroup* group;
    std::vector<model::Linear> linears;
    Tensor norm;
  };
  model::Model& base_;
  std::vector<Kept> kept_;
};

void check_shapes(const model::Model& base, const std::vector<model::Model*>& candidates) {
  const io::ModelConfig& c = base.config();
  for (const model::Model* m : candidates) {
    if (m->config().num_layers != c.num_layers || m->config().hidden_size != c.hidden_size || m->config().vocab_size != c.vocab_size) {
      fail("mixed precision: a candidate model's shape differs from the base model's");
    }
  }
}

// Sum over the rows of KL(softmax(a) || softmax(b)), each row on the pool and summed in row order (the
// same result at any thread count).
double kl_sum(const std::vector<float>& a, const std::vector<float>& b, std::int64_t rows, std::int64_t vocab, std::vector<double>& row_kl) {
  row_kl.resize(static_cast<std::size_t>(rows));
  parallel_each(rows, 8, rows > 8, [&](std::int64_t r) {
    double lse_a = 0.0, lse_b = 0.0;
    row_kl[static_cast<std::size_t>(r)] = kernels::softmax_kl(a.data() + r * vocab, b.data() + r * vocab, vocab, lse_a, lse_b);
  });
  double s = 0.0;
  for (const double v : row_kl) s += v;
  return s;
}

}  // namespace

std::vector<std::vector<double>> kl_scores(model::Model& base, const std::vector<model::Model*>& candidates, const std::vector<LinearGroup>& groups,
                                           const std::vector<std::vector<std::int32_t>>& sequences,
                                           const std::function<void(std::int64_t, std::int64_t)>& progress) {
  if (sequences.empty()) fail("mixed precision: no score sequences");
  check_shapes(base, candidates);
  const std::int64_t vocab = base.config().vocab_size;
  std::vector<std::vector<double>> sums(groups.size(), std::vector<double>(candidates.size(), 0.0));
  std::int64_t scored = 0;
  const auto total = static_cast<std::int64_t>(sequences.size() * groups.size() * candidates.size());
  std::int64_t done = 0;
  std::vector<float> base_logits, logits;
  std::vector<double> row_kl;
  for (const auto& tokens : sequences) {
    if (tokens.size() < 2) continue;
    const model::SequenceSpan span{0, static_cast<std::int64_t>(tokens.size()), 0, 0};
    const std::span<const model::SequenceSpan> batch(&span, 1);
    base.forward(tokens, batch, nullptr, model::LogitsFor::all_rows, base_logits);
    const auto rows = static_cast<std::int64_t>(tokens.size());
    scored += rows;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      for (std::size_t ci = 0; ci < candidates.size(); ++ci) {
        {
          Swapped swapped(base);
          swapped.take(groups[g], *candidates[ci]);
          base.forward(tokens, batch, nullptr, model::LogitsFor::all_rows, logits);
        }
        const double s = kl_sum(base_logits, logits, rows, vocab, row_kl);
        if (!std::isfinite(s)) fail("mixed precision: the KL divergence of {} with candidate {} is not finite", groups[g].name, ci);
        sums[g][ci] += s;
        if (progress) progress(++done, total);
      }
    }
  }
  if (scored == 0) fail("mixed precision: every score sequence is shorter than 2 tokens");
  for (auto& row : sums) {
    for (double& v : row) v /= static_cast<double>(scored);
  }
  return sums;
}

double kl_of_choice(model::Model& base, const std::vector<model::Model*>& candidates, const std::vector<LinearGroup>& groups,
                    const std::vector<std::size_t>& choice, const std::vector<std::vector<std::int32_t>>& sequences) {
  check_shapes(base, candidates);
  if (choice.size() != groups.size()) fail("mixed precision: {} choices for {} groups", choice.size(), groups.size());
  const std::int64_t vocab = base.config().vocab_size;
  std::vector<float> base_logits, logits;
  std::vector<double> row_kl;
  double sum = 0.0;
  std::int64_t scored = 0;
  for (const auto& tokens : sequences) {
    if (tokens.size() < 2) continue;
    const model::SequenceSpan span{0, static_cast<std::int64_t>(tokens.size()), 0, 0};
    const std::span<const model::SequenceSpan> batch(&span, 1);
    base.forward(tokens, batch, nullptr, model::LogitsFor::all_rows, base_logits);
    {
      Swapped swapped(base);
      for (std::size_t g = 0; g < groups.size(); ++g) {
        if (choice[g] < candidates.size()) swapped.take(groups[g], *candidates[choice[g]]);
      }
      base.forward(tokens, batch, nullptr, model::LogitsFor::all_rows, logits);
    }
    const auto rows = static_cast<std::int64_t>(tokens.size());
    sum += kl_sum(base_logits, logits, rows, vocab, row_kl);
    scored += rows;
  }
  if (scored == 0) fail("mixed precision: every score sequence is shorter than 2 tokens");
  if (!std::isfinite(sum)) fail("mixed precision: the KL divergence of a choice is not finite");
  return sum / static_cast<double>(scored);
}

GradientScorer::GradientScorer(const model::Model& base, std::vector<std::vector<std::array<ScoredLinear, 7>>> candidates)
    : base_(base), candidates_(std::move(candidates)) {
  const std::int64_t layers = base.num_layers();
  for (std::size_t c = 0; c < candidates_.size(); ++c) {
    if (static_cast<std::int64_t>(candidates_[c].size()) != layers) fail("gradient score: candidate {} has {} layers, the model {}", c, candidates_[c].size(), layers);
    for (std::int64_t l = 0; l < layers; ++l) {
      for (std::size_t k = 0; k < 7; ++k) {
        const model::Linear& b = base.layer(l).linear(model::kAllLinears[k]);
        const ScoredLinear& s = candidates_[c][static_cast<std::size_t>(l)][k];
        const std::string name = fmt::format("model.layers.{}.{}", l, model::linear_name(model::kAllLinears[k]));
        if (s.linear == nullptr || s.linear->in_features() != b.in_features() || s.linear->out_features() != b.out_features()) {
          fail("gradient score: candidate {}'s {} is missing or of another shape", c, name);
        }
        if ((!s.input_scale.empty() && static_cast<std::int64_t>(s.input_scale.size()) != b.in_features()) ||
            (!s.output_scale.empty() && static_cast<std::int64_t>(s.output_scale.size()) != b.out_features())) {
          fail("gradient score: candidate {}'s {} has folded scales of the wrong length", c, name);
        }
      }
    }
  }
  scores_.assign(static_cast<std::size_t>(layers) * 7 * candidates_.size(), 0.0);
}

void GradientScorer::add(std::int64_t layer, std::size_t kind, const float* x, const float* dy, std::int64_t rows) {
  if (layer < 0 || layer >= base_.num_layers() || kind >= 7) fail("gradient score: no Linear {} in layer {}", kind, layer);
  const model::Linear& b = base_.layer(layer).linear(model::kAllLinears[kind]);
  const std::int64_t in = b.in_features(), out = b.out_features();
  const auto n_out = static_cast<std::size_t>(rows * out);
  if (y_.size() < n_out) y_.resize(n_out);
  if (yc_.size() < n_out) yc_.resize(n_out);
  model::run_linear(b, x, rows, y_.data(), ws_);
  for (std::size_t c = 0; c < candidates_.size(); ++c) {
    const ScoredLinear& s = candidates_[c][static_cast<std::size_t>(layer)][kind];
    const float* xc = x;
    if (!s.input_scale.empty()) {
      xs_.resize(static_cast<std::size_t>(rows * in));
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t j = 0; j < in; ++j) xs_[static_cast<std::size_t>(r * in + j)] = x[r * in + j] * s.input_scale[static_cast<std::size_t>(j)];
      }
      xc = xs_.data();
    }
    model::run_linear(*s.linear, xc, rows, yc_.data(), ws_);
    // Summed in row order on one thread: the same bits at any thread count.
    double sum = 0.0;
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < out; ++j) {
        const auto i = static_cast<std::size_t>(r * out + j);
        const float yc = s.output_scale.empty() ? yc_[i] : yc_[i] / s.output_scale[static_cast<std::size_t>(j)];
        const float t = std::clamp(dy[i] * (yc - y_[i]), -1e10f, 1e10f);
        sum += static_cast<double>(t) * t;
      }
    }
    if (!std::isfinite(sum)) {
      fail("gradient score: model.layers.{}.{} with candidate {}: the score is not finite (NaN or Inf in the model's activations or gradients)", layer,
           model::linear_name(model::kAllLinears[kind]), c);
    }
    scores_[(static_cast<std::size_t>(layer) * 7 + kind) * candidates_.size() + c] += sum;
  }
}

double GradientScorer::linear_score(std::int64_t layer, std::size_t kind, std::size_t c) const {
  return scores_.at((static_cast<std::size_t>(layer) * 7 + kind) * candidates_.size() + c);
}

std::vector<std::vector<double>> GradientScorer::group_scores(const std::vector<LinearGroup>& groups) const {
  std::vector<std::vector<double>> out(groups.size(), std::vector<double>(candidates_.size(), 0.0));
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (const model::LinearKind kind : groups[g].kinds) {
      const auto k = static_cast<std::size_t>(std::find(std::begin(model::kAllLinears), std::end(model::kAllLinears), kind) - std::begin(model::kAllLinears));
      for (std::size_t c = 0; c < candidates_.size(); ++c) out[g][c] += linear_score(groups[g].layer, k, c);
    }
  }
  return out;
}

MixedChoice choose_under_budget(const std::vector<LinearGroup>& groups, const std::vector<std::vector<double>>& scores, const std::vector<double>& bits,
                                double budget_bits) {
  if (scores.size() != groups.size()) fail("mixed precision: {} score rows for {} groups", scores.size(), groups.size());
  if (!(budget_bits > 0.0) || !std::isfinite(budget_bits)) fail("mixed precision: the budget {} bits is not a positive number", budget_bits);
  // Costs in eighths of a bit per weight: every effective bits value here is a whole number of eighths
  // (4.5, 4.25, 4.125, 8, 16), so the integer costs are exact and the solver's answer is.
  const auto eighths = [](double b) { return static_cast<std::int64_t>(std::llround(b * 8.0)); };
  std::vector<ChoiceGroup> problem(groups.size());
  std::int64_t all_weights = 0;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    if (scores[g].size() != bits.size()) fail("mixed precision: {} has {} scores for {} candidates", groups[g].name, scores[g].size(), bits.size());
    for (std::size_t c = 0; c < bits.size(); ++c) {
      problem[g].score.push_back(scores[g][c]);
      problem[g].cost.push_back(groups[g].weights * eighths(bits[c]));
    }
    problem[g].score.push_back(0.0);  // not quantized
    problem[g].cost.push_back(groups[g].weights * eighths(16.0));
    make_scores_non_increasing_in_cost(problem[g]);
    all_weights += groups[g].weights;
  }
  const auto budget = static_cast<std::int64_t>(std::floor(budget_bits * 8.0 * static_cast<double>(all_weights)));
  const auto solved = solve_budget(problem, budget);
  if (!solved) {
    double cheapest = 16.0;
    for (const double b : bits) cheapest = std::min(cheapest, b);
    fail("mixed precision: a budget of {} bits per weight is below the cheapest candidate's {} bits", budget_bits, cheapest);
  }
  MixedChoice out;
  out.choice = solved->choice;
  out.score = solved->score;
  out.effective_bits = static_cast<double>(solved->cost) / (8.0 * static_cast<double>(all_weights));
  return out;
}

}  // namespace mopt::algo
