// Mixed precision under a bits budget, scored by KL divergence (issue 19): the model's Linears are
// cut into groups that must share a format (q/k/v read one input, gate/up another; o and down alone;
// or attention and MLP whole when a candidate moves scales between those groups, as NVFP4_AWQ does),
// every group is scored with every candidate format by swapping that group alone into the
// unquantized model and measuring KL(unquantized || swapped) on the score tokens, and the solver
// (mixed_precision.h) picks one candidate per group — or leaves it unquantized, score 0 — with the
// least total score whose weights' effective bits stay within the budget.
#pragma once

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
