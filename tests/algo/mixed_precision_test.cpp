#include "algo/mixed_precision.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "core/error.h"

namespace mopt::algo {
namespace {

// Every assignment, enumerated: the least score within the budget (ties: the cheapest), or none.
std::optional<Assignment> brute_force(const std::vector<ChoiceGroup>& groups, std::int64_t budget) {
  std::optional<Assignment> best;
  std::vector<std::size_t> choice(groups.size(), 0);
  while (true) {
    Assignment a;
    a.choice = choice;
    for (std::size_t g = 0; g < groups.size(); ++g) {
      a.cost += groups[g].cost[choice[g]];
      a.score += groups[g].score[choice[g]];
    }
    if (a.cost <= budget && (!best || a.score < best->score || (a.score == best->score && a.cost < best->cost))) best = a;
    std::size_t g = 0;
    while (g < groups.size() && ++choice[g] == groups[g].score.size()) choice[g++] = 0;
    if (g == groups.size()) break;
  }
  return best;
}

// Scores are sums of a few multiples of 1/8 so that every partial sum is exact in a double and ties
// are real ties whatever the order of the additions.
TEST(MixedPrecision, SolverMatchesBruteForceOnRandomInstances) {
  std::mt19937 rng(11);
  int feasible = 0, infeasible = 0;
  for (int trial = 0; trial < 600; ++trial) {
    const auto n_groups = std::uniform_int_distribution<std::size_t>(1, 7)(rng);
    std::vector<ChoiceGroup> groups(n_groups);
    std::int64_t cheapest = 0, dearest = 0;
    for (auto& g : groups) {
      const auto n = std::uniform_int_distribution<std::size_t>(1, 4)(rng);
      for (std::size_t c = 0; c < n; ++c) {
        g.cost.push_back(std::uniform_int_distribution<std::int64_t>(0, 40)(rng));
        g.score.push_back(static_cast<double>(std::uniform_int_distribution<int>(-8, 200)(rng)) / 8.0);
      }
      cheapest += *std::min_element(g.cost.begin(), g.cost.end());
      dearest += *std::max_element(g.cost.begin(), g.cost.end());
    }
    const std::int64_t budget = std::uniform_int_distribution<std::int64_t>(cheapest - 5, dearest + 5)(rng);
    const std::optional<Assignment> got = solve_budget(groups, budget), want = brute_force(groups, budget);
    ASSERT_EQ(got.has_value(), want.has_value()) << "trial " << trial;
    if (!want) {
      ++infeasible;
      continue;
    }
    ++feasible;
    EXPECT_EQ(got->score, want->score) << "trial " << trial;
    EXPECT_EQ(got->cost, want->cost) << "trial " << trial;
    // The reported totals are those of the reported choice, within the budget.
    std::int64_t cost = 0;
    double score = 0.0;
    ASSERT_EQ(got->choice.size(), groups.size());
    for (std::size_t g = 0; g < groups.size(); ++g) {
      ASSERT_LT(got->choice[g], groups[g].cost.size());
      cost += groups[g].cost[got->choice[g]];
      score += groups[g].score[got->choice[g]];
    }
    EXPECT_EQ(cost, got->cost);
    EXPECT_EQ(score, got->score);
    EXPECT_LE(cost, budget);
  }
  // Both kinds of instance were drawn.
  EXPECT_GT(feasible, 300);
  EXPECT_GT(infeasible, 10);
}

// The least total score within the budget by the textbook table: best[b] over the groups so far, for
// every total cost b (sums in the same order as the solver's cannot be promised, so compared to 1e-9).
double table_optimum(const std::vector<ChoiceGroup>& groups, std::int64_t budget) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> best(static_cast<std::size_t>(budget + 1), inf), next;
  best[0] = 0.0;
  for (const auto& g : groups) {
    next.assign(best.size(), inf);
    for (std::int64_t b = 0; b <= budget; ++b) {
      if (best[static_cast<std::size_t>(b)] == inf) continue;
      for (std::size_t c = 0; c < g.cost.size(); ++c) {
        const std::int64_t to = b + g.cost[c];
        if (to <= budget) next[static_cast<std::size_t>(to)] = std::min(next[static_cast<std::size_t>(to)], best[static_cast<std::size_t>(b)] + g.score[c]);
      }
    }
    best.swap(next);
  }
  return *std::min_element(best.begin(), best.end());
}

TEST(MixedPrecision, SolverMatchesTheTableOnAModelsGroups) {
  // 120 groups (a 30-layer model's q/k/v, o, gate/up and down, in units of SmolLM2's smallest common
  // block) of "16-bit, FP8, NVFP4" at 16, 8 and 4.5 bits (costs in eighths of a bit per unit), scores
  // random: the solver's optimum equals the textbook table's at several budgets.
  std::mt19937 rng(5);
  std::vector<ChoiceGroup> groups;
  std::int64_t all16 = 0;
  for (int l = 0; l < 30; ++l) {
    for (const std::int64_t units : {5, 3, 16, 8}) {
      ChoiceGroup g;
      const double loss = std::uniform_real_distribution<double>(0.1, 10.0)(rng);
      g.cost = {units * 128, units * 64, units * 36};
      g.score = {0.0, loss * std::uniform_real_distribution<double>(0.005, 0.05)(rng), loss};
      groups.push_back(g);
      all16 += units * 128;
    }
  }
  for (const std::int64_t eighths : {36, 40, 48, 64, 96, 128}) {
    SCOPED_TRACE(eighths);
    const std::int64_t budget = all16 / 128 * eighths;
    const std::optional<Assignment> a = solve_budget(groups, budget);
    ASSERT_TRUE(a.has_value());
    EXPECT_LE(a->cost, budget);
    EXPECT_NEAR(a->score, table_optimum(groups, budget), 1e-9);
  }
  // With room for everything at 16 bits the answer is every group unquantized, score 0.
  const std::optional<Assignment> roomy = solve_budget(groups, all16);
  ASSERT_TRUE(roomy.has_value());
  EXPECT_EQ(roomy->score, 0.0);
  for (const std::size_t c : roomy->choice) EXPECT_EQ(c, 0u);
}

TEST(MixedPrecision, BadGroupsAreRefusedByName) {
  const auto refused = [](std::vector<ChoiceGroup> groups, const std::string& needle) {
    try {
      solve_budget(groups, 100);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  refused({ChoiceGroup{{1.0}, {1}}, ChoiceGroup{}}, "group 1 has no candidates");
  refused({ChoiceGroup{{1.0, 2.0}, {1}}}, "group 0 has 2 scores for 1 costs");
  refused({ChoiceGroup{{1.0, 2.0}, {1, -3}}}, "group 0 candidate 1 has the negative cost -3");
  refused({ChoiceGroup{{std::nan(""), 2.0}, {1, 2}}}, "group 0 candidate 0 has the non-finite score");
  EXPECT_FALSE(solve_budget({ChoiceGroup{{1.0}, {5}}}, 4).has_value());
  EXPECT_FALSE(solve_budget({ChoiceGroup{{1.0}, {0}}}, -1).has_value());
  // No groups: the empty choice.
  const std::optional<Assignment> none = solve_budget({}, 0);
  ASSERT_TRUE(none.has_value());
  EXPECT_TRUE(none->choice.empty());
}

TEST(MixedPrecision, ScoresNeverRiseWithMoreBits) {
  ChoiceGroup g;
  // Costs 36 (4.5 bits), 64 (8), 128 (16), 64 again: the 8-bit candidates scored above the 4.5-bit one
  // are capped by it; equal costs do not cap each other; the 16-bit one keeps its lower score.
  g.cost = {64, 36, 128, 64};
  g.score = {5.0, 3.0, 0.5, 2.0};
  make_scores_non_increasing_in_cost(g);
  EXPECT_EQ(g.score, (std::vector<double>{3.0, 3.0, 0.5, 2.0}));
  ChoiceGroup h;
  h.cost = {128, 64, 36};
  h.score = {0.0, 7.0, 1.0};
  make_scores_non_increasing_in_cost(h);
  EXPECT_EQ(h.score, (std::vector<double>{0.0, 1.0, 1.0}));
}

}  // namespace
}  // namespace mopt::algo
