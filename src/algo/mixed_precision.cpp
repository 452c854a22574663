#include "algo/mixed_precision.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"

namespace mopt::algo {

namespace {

// A partial choice over the groups so far: its totals, and how it was reached (the point it extends in
// the previous frontier, and the candidate taken in this group).
struct Point {
  std::int64_t cost = 0;
  double score = 0.0;
  std::size_t parent = 0;
  std::size_t choice = 0;
};

void check_group(const ChoiceGroup& g, std::size_t index) {
  if (g.score.empty()) fail("mixed precision: group {} has no candidates", index);
  if (g.score.size() != g.cost.size()) fail("mixed precision: group {} has {} scores for {} costs", index, g.score.size(), g.cost.size());
  for (std::size_t c = 0; c < g.score.size(); ++c) {
    if (!std::isfinite(g.score[c])) fail("mixed precision: group {} candidate {} has the non-finite score {}", index, c, g.score[c]);
    if (g.cost[c] < 0) fail("mixed precision: group {} candidate {} has the negative cost {}", index, c, g.cost[c]);
  }
}

}  // namespace

std::optional<Assignment> solve_budget(const std::vector<ChoiceGroup>& groups, std::int64_t budget) {
  for (std::size_t i = 0; i < groups.size(); ++i) check_group(groups[i], i);
  // frontiers[i]: the Pareto frontier after groups [0, i), by increasing cost and strictly decreasing score.
  std::vector<std::vector<Point>> frontiers(1, std::vector<Point>{Point{}});
  if (budget < 0) return std::nullopt;
  std::vector<Point> next;
  for (const ChoiceGroup& g : groups) {
    const std::vector<Point>& now = frontiers.back();
    next.clear();
    for (std::size_t p = 0; p < now.size(); ++p) {
      for (std::size_t c = 0; c < g.cost.size(); ++c) {
        // Costs stay below the budget, so the sum cannot overflow unless the budget is near the int64 limit.
        if (g.cost[c] > budget - now[p].cost) continue;
        next.push_back(Point{now[p].cost + g.cost[c], now[p].score + g.score[c], p, c});
      }
    }
    if (next.empty()) return std::nullopt;
    std::sort(next.begin(), next.end(), [](const Point& a, const Point& b) {
      return a.cost != b.cost ? a.cost < b.cost : a.score < b.score;
    });
    std::vector<Point> kept;
    for (const Point& q : next) {
      if (kept.empty() || q.score < kept.back().score) kept.push_back(q);
    }
    frontiers.push_back(std::move(kept));
  }
  // The last point of the final frontier has the least score (the cheapest of those with it).
  Assignment a;
  const Point& best = frontiers.back().back();
  a.cost = best.cost;
  a.score = best.score;
  a.choice.resize(groups.size());
  std::size_t at = frontiers.back().size() - 1;
  for (std::size_t i = groups.size(); i > 0; --i) {
    const Point& q = frontiers[i][at];
    a.choice[i - 1] = q.choice;
    at = q.parent;
  }
  return a;
}

void make_scores_non_increasing_in_cost(ChoiceGroup& group) {
  if (group.score.size() != group.cost.size()) fail("mixed precision: a group has {} scores for {} costs", group.score.size(), group.cost.size());
  std::vector<std::size_t> order(group.cost.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return group.cost[a] < group.cost[b]; });
  // Walk by increasing cost; each run of equal costs takes the least score of the strictly cheaper ones as a cap.
  double cheaper = std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < order.size();) {
    std::size_t j = i;
    double run_best = cheaper;
    while (j < order.size() && group.cost[order[j]] == group.cost[order[i]]) {
      double& s = group.score[order[j++]];
      run_best = std::min(run_best, s);
      s = std::min(s, cheaper);
    }
    cheaper = run_best;
    i = j;
  }
}

}  // namespace mopt::algo
