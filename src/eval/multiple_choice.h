// Multiple-choice accuracy on MMLU-format CSV files (question, four choices,
// answer letter), by comparing the log-likelihood of " A" ... " D" after the
// standard MMLU prompt, with k examples (the first k rows) shown first.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "eval/perplexity.h"
#include "model/llama.h"

namespace mopt::eval {

struct McQuestion {
  std::string question;
  std::array<std::string, 4> choices;
  int answer = 0;  // 0..3
};

// Parses RFC 4180 CSV (quoted fields may hold commas, newlines and "").
// Each row: question, A, B, C, D, answer letter. A header row whose last
// field is "answer" is skipped. `label` names the file in errors.
std::vector<McQuestion> parse_mc_csv(std::string_view text, const std::string& label);

// The prompt for `q` after `shots` solved examples.
std::string mc_prompt(const std::vector<McQuestion>& shots, const McQuestion& q);

struct McResult {
  std::int64_t questions = 0;
  std::int64_t correct = 0;
  double accuracy = 0;
  double seconds = 0;
  std::vector<int> predictions;
};

McResult multiple_choice(model::Model& model, const std::vector<McQuestion>& questions, std::int64_t shots,
                         const ProgressFn& progress = {});

}  // namespace mopt::eval
