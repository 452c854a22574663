// Mixed precision under a bits budget, scored by KL divergence (issue 19): the model's Linears are
// cut into groups that must share a format (q/k/v read one input, gate/up another; o and down alone;
// or attention and MLP whole when a candidate moves scales between those groups, as NVFP4_AWQ does),
// every group is scored with every candidate format by swapping that group alone into the
// unquantized model and measuring KL(unquantized || swapped) on the score tokens, and the solver
// (mixed_precision.h) picks one candidate per group — or leaves it unquantized, score 0 — with the
// least total score whose weights' effective bits stay within the budget.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "model/llama.h"
#include "quant/recipe.h"

namespace mopt::algo {

// Bits per weight a format stores, scales included: the element's bits plus a block scale's bits
// over the block (NVFP4 4 + 8/16 = 4.5, MXFP4 4 + 8/32 = 4.25, INT4 groups of 128 with 16-bit scales
// 4.125); per-tensor and per-row scales are left out (a few bits per thousands of weights), as the
// reference's effective bits leave them out (FP8 8, INT8 8). Unquantized: 16.
double effective_bits(const quant::LinearScheme& scheme);

struct LinearGroup {
  std::int64_t layer = 0;
  std::vector<model::LinearKind> kinds;  // q,k,v | o | gate,up | down; or q,k,v,o | gate,up,down
  std::string name;                      // "model.layers.3.self_attn.q_proj,k_proj,v_proj"
  std::vector<std::string> modules;      // "model.layers.3.self_attn.q_proj", ...
  std::int64_t weights = 0;              // elements of the group's weight matrices
};

// The groups of a model, layer by layer: q/k/v, o, gate/up, down; with `whole_blocks`, q/k/v/o and
// gate/up/down (for candidates that fold o_proj's and down_proj's scales into v_proj and up_proj).
std::vector<LinearGroup> linear_groups(const io::ModelConfig& config, bool whole_blocks = false);

// Which group of `groups` a tensor of a quantized layer belongs to: a Linear's own tensors its
// Linear's group; input_layernorm the group of q_proj, post_attention_layernorm the group of
// gate_proj (each norm feeds only that group, and AWQ folds the group's scale into it). Throws for
// any other name.
std::size_t group_of_tensor(const std::vector<LinearGroup>& groups, const std::string& tensor);

// scores[g][c]: the mean over the score tokens of KL(base || base with group g's Linears, and the
// norm that feeds them, taken from candidates[c]) in nats per token. Every candidate has base's shape. Each group's Linears are put
// back before the next group is tried. progress(done, total) after each forward pass.
std::vector<std::vector<double>> kl_scores(model::Model& base, const std::vector<model::Model*>& candidates,
                                           const std::vector<LinearGroup>& groups, const std::vector<std::vector<std::int32_t>>& sequences,
                                           const std::function<void(std::int64_t done, std::int64_t total)>& progress = {});

// The mean over the score tokens of KL(base || base with every group's Linears, and the norm that
// feeds them, taken from its chosen candidate) in nats per token: choice[g] a candidate index, or
// candidates' count for "not quantized". base is left as it was.
double kl_of_choice(model::Model& base, const std::vector<model::Model*>& candidates, const std::vector<LinearGroup>& groups,
                    const std::vector<std::size_t>& choice, const std::vector<std::vector<std::int32_t>>& sequences);

// A candidate's Linear as the gradient score applies it to the unquantized model's input x:
// linear(x ⊙ input_scale) ⊘ output_scale, the scales the candidate folded into the Linear's
// neighbours (quant::QuantizedLinear::folded_input_scale / folded_output_scale; empty: none).
struct ScoredLinear {
  const model::Linear* linear = nullptr;
  std::vector<float> input_scale, output_scale;
};

// The reference's gradient score (its default method): for every decoder Linear and candidate c,
// the sum over the score tokens of (∂L/∂y ⊙ (Q_c(x) − y))², each product clamped to ±1e10 as the
// reference does, with x the Linear's input and y its output in the unquantized model and ∂L/∂y the
// gradient of the loss (the mean cross-entropy of each score batch) there: a Taylor expansion of the
// loss with the Fisher information for the Hessian. A group's score is the sum of its Linears'.
// The caller runs the unquantized model's backward passes and hands each Linear's x and ∂L/∂y to add().
class GradientScorer {
 public:
  // base: the unquantized model (its Linears give y); candidates[c][layer][kind index in
  // model::kAllLinears]: what candidate c puts in that place. Throws when a shape disagrees.
  GradientScorer(const model::Model& base, std::vector<std::vector<std::array<ScoredLinear, 7>>> candidates);
  // One Linear's input x [rows, in] and the gradient of its output dy [rows, out].
  void add(std::int64_t layer, std::size_t kind, const float* x, const float* dy, std::int64_t rows);
  // The summed score of one Linear with candidate c.
  double linear_score(std::int64_t layer, std::size_t kind, std::size_t c) const;
  // scores[g][c]: the sum of the group's Linears' scores.
  std::vector<std::vector<double>> group_scores(const std::vector<LinearGroup>& groups) const;

 private:
  const model::Model& base_;
  std::vector<std::vector<std::array<ScoredLinear, 7>>> candidates_;
  std::vector<double> scores_;  // [layer][kind][candidate]
  model::Workspace ws_;
  std::vector<float> y_, yc_, xs_;
};

struct MixedChoice {
  std::vector<std::size_t> choice;  // per group: a candidate index, or candidates' count for "not quantized"
  double score = 0.0;               // total score of the choice
  double effective_bits = 0.0;      // weight-weighted mean over the groups
};

// The choice of least total score with weight-weighted effective bits at most `bits`, "not quantized"
// (16 bits, score 0) among every group's candidates. scores[g][c] as kl_scores gives them; bits[c] the
// candidates' effective bits. Scores are first made non-increasing in bits within each group (as the
// reference does). Throws when even the cheapest choice needs more bits than `bits`.
MixedChoice choose_under_budget(const std::vector<LinearGroup>& groups, const std::vector<std::vector<double>>& scores,
                                const std::vector<double>& bits, double budget_bits);

}  // namespace mopt::algo
