#include "eval/loss.h"

#include <chrono>
#include <cmath>

#include "core/error.h"

namespace mopt::eval {

LossResult sequence_loss(model::Model& model, const std::vector<ScoredSequence>& sequences, const ProgressFn& progress) {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t vocab = model.config().vocab_size;
  LossResult r;
  r.sequences = static_cast<std::int64_t>(sequences.size());
  std::vector<float> logits;
  std::vector<double> log_probs;
  // Batches of about 2048 tokens.
  for (std::size_t first = 0; first < sequences.size();) {
    std::vector<std::int32_t> tokens;
    std::vector<model::SequenceSpan> spans;
    std::size_t end = first;
    while (end < sequences.size() && (end == first || tokens.size() + sequences[end].tokens.size() <= 2048)) {
      const ScoredSequence& s = sequences[end];
      if (s.tokens.empty() || s.targets.size() != s.tokens.size()) fail("sequence {}: {} tokens and {} targets", end, s.tokens.size(), s.targets.size());
      spans.push_back({static_cast<std::int64_t>(tokens.size()), static_cast<std::int64_t>(s.tokens.size()), 0, 0});
      tokens.insert(tokens.end(), s.tokens.begin(), s.tokens.end());
      ++end;
    }
    model.forward(tokens, spans, nullptr, model::LogitsFor::all_rows, logits);
    for (std::size_t q = first; q < end; ++q) {
      const ScoredSequence& s = sequences[q];
      const std::int64_t offset = spans[q - first].offset;
      for (std::size_t i = 0; i < s.targets.size(); ++i) {
        const std::int32_t t = s.targets[i];
        if (t < 0) continue;
        if (t >= vocab) fail("sequence {}: target {} is outside the vocabulary of {}", q, t, vocab);
        log_softmax(logits.data() + (offset + static_cast<std::int64_t>(i)) * vocab, vocab, log_probs);
        r.token_nll.push_back(-log_probs[static_cast<std::size_t>(t)]);
      }
    }
    first = end;
    if (progress) progress(first, sequences.size());
  }
  double sum = 0, squares = 0;
  for (const double l : r.token_nll) {
    sum += l;
    squares += l * l;
  }
  r.scored_tokens = static_cast<std::int64_t>(r.token_nll.size());
  if (r.scored_tokens == 0) fail("no token to score (no sequence has a target)");
  const double n = static_cast<double>(r.scored_tokens);
  r.mean = sum / n;
  r.stderr_ = r.scored_tokens > 1 ? std::sqrt(std::max(0.0, squares / n - r.mean * r.mean) / (n - 1)) : 0.0;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace mopt::eval
