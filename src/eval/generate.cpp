#include "eval/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

#include "core/error.h"

namespace mopt::eval {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}
}  // namespace

std::int32_t sample_token(const float* logits, std::int64_t vocab, float temperature, float top_p, std::uint64_t& rng_state) {
  if (temperature <= 0.0f) return static_cast<std::int32_t>(std::max_element(logits, logits + vocab) - logits);
  std::vector<std::int32_t> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b]; });
  const double max = logits[order[0]];
  std::vector<double> probs(order.size());
  double total = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp((static_cast<double>(logits[order[i]]) - max) / temperature);
    total += probs[i];
  }
  std::size_t keep = order.size();
  double cumulative = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    cumulative += probs[i] / total;
    if (cumulative >= top_p) {
      keep = i + 1;
      break;
    }
  }
  std::mt19937_64 rng(rng_state);
  rng_state = rng();
  std::discrete_distribution<std::size_t> pick(probs.begin(), probs.begin() + static_cast<std::ptrdiff_t>(keep));
  return order[pick(rng)];
}

std::vector<std::int32_t> generate(model::Model& m, std::span<const std::int32_t> prompt, const GenerateOptions& options,
                                   const std::function<void(std::string_view)>& on_text, GenerateStats* stats) {
  if (prompt.empty()) fail("generate: the prompt has no tokens");
  const auto& c = m.config();
  const auto& tok = m.require_tokenizer();
  const std::int64_t limit = std::min<std::int64_t>(static_cast<std::int64_t>(prompt.size()) + options.max_tokens, c.max_position_embeddings);
  if (static_cast<std::int64_t>(prompt.size()) >= limit) {
    fail("the prompt has {} tokens; the model's context is {}", prompt.size(), c.max_position_embeddings);
  }
  model::KvCache cache = m.new_cache(1, limit);
  std::vector<float> logits;
  std::uint64_t rng_state = options.seed;
  std::vector<std::int32_t> generated;
  std::string emitted;

  auto t0 = std::chrono::steady_clock::now();
  const model::SequenceSpan first{0, static_cast<std::int64_t>(prompt.size()), 0, 0};
  m.forward(prompt, std::span(&first, 1), &cache, model::LogitsFor::last_row_of_each_sequence, logits);
  if (stats) stats->prefill_seconds = seconds_since(t0);
  t0 = std::chrono::steady_clock::now();
  std::int64_t position = static_cast<std::int64_t>(prompt.size());
  while (position < limit) {
    const std::int32_t next = sample_token(logits.data(), c.vocab_size, options.temperature, options.top_p, rng_state);
    if (options.stop_at_eos && std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), next) != c.eos_token_ids.end()) break;
    generated.push_back(next);
    if (on_text) {
      // Emit what is new, holding back a trailing incomplete UTF-8 sequence.
      const std::string text = tok.decode(generated, true);
      if (text.size() > emitted.size() && text.compare(0, emitted.size(), emitted) == 0 &&
          !(text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0)) {
        on_text(std::string_view(text).substr(emitted.size()));
        emitted = text;
      }
    }
    if (position + 1 >= limit) break;
    const model::SequenceSpan step{0, 1, position, 0};
    m.forward(std::span(&generated.back(), 1), std::span(&step, 1), &cache, model::LogitsFor::last_row_of_each_sequence, logits);
    ++position;
  }
  if (on_text) {
    const std::string text = tok.decode(generated, true);
    if (text.size() > emitted.size() && text.compare(0, emitted.size(), emitted) == 0) on_text(std::string_view(text).substr(emitted.size()));
  }
  if (stats) {
    stats->decode_seconds = seconds_since(t0);
    stats->prompt_tokens = static_cast<std::int64_t>(prompt.size());
    stats->generated_tokens = static_cast<std::int64_t>(generated.size());
  }
  return generated;
}

}  // namespace mopt::eval
