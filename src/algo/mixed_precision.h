// Mixed precision under a budget (issue 19's solver): every group of Linears that must share a format
// (q/k/v, gate/up, or one Linear) takes one of its candidates (formats, or "not quantized"), each with a
// score (the loss it is estimated to add; lower is better) and an integer cost (its weights' bits in
// the caller's unit). The choice minimizes the total score with the total cost at most the budget,
// exactly: the reference solves the same problem as an integer program (CBC through pulp).
//
// The solver keeps, group by group, the Pareto frontier of the partial choices (no kept point is both
// dearer and worse than another), pruned at the budget: exact, and its size is bounded by the number
// of distinct partial costs below the budget, which a unit of whole multiples keeps small.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace mopt::algo {

struct ChoiceGroup {
  std::vector<double> score;        // per candidate, finite
  std::vector<std::int64_t> cost;   // per candidate, >= 0
};

struct Assignment {
  std::vector<std::size_t> choice;  // per group, the index of its candidate
  double score = 0.0;
  std::int64_t cost = 0;
};

// The choice of least total score whose total cost is at most `budget` (among choices of equal score,
// the cheapest); nullopt when even the cheapest choice costs more. Throws Error for a group without
// candidates, score and cost lists of different lengths, a negative cost or a non-finite score.
std::optional<Assignment> solve_budget(const std::vector<ChoiceGroup>& groups, std::int64_t budget);

// As the reference makes its scores before solving: a candidate never scores worse than a strictly
// cheaper one of the same group (score_c = min(score_c, min over d with cost_d < cost_c of score_d)),
// so spending more bits never looks harmful.
void make_scores_non_increasing_in_cost(ChoiceGroup& group);

}  // namespace mopt::algo
