// Training data: text packed into sequences, or prompt/response pairs and conversations whose loss
// counts the responses only (supervised fine-tuning, optionally in the model's chat template), in a
// seeded order that a resumed run continues exactly.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "io/chat_template.h"
#include "io/tokenizer.h"
#include "train/model.h"

namespace mopt::train {

struct Example {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;  // targets[i]: the token after tokens[i], or -1 (no loss there)
};

// Examples of at most seq_len tokens from a file:
//  - .txt: the whole file is one document;
//  - .jsonl: one JSON object per line, {"text": ...} (a document), {"prompt": ..., "response": ...}
//    (optionally with "system"), or, with a chat template, {"messages": [{"role", "content"}, ...]}.
// A document's tokens are cut into pieces of seq_len minus the tokenizer's prefix (BOS), each piece
// with the prefix, as calibration samples are; every token predicts the next within its piece.
// Without a chat template, a pair becomes prefix + prompt + response + EOS (eos_id, when >= 0), cut
// to seq_len, and only the response's tokens and the EOS are predicted.
// With one, a pair is the conversation [system,] user: prompt, assistant: response, and a conversation
// is rendered as apply_chat_template renders it (the template writes BOS and the end-of-turn tokens;
// nothing is added). Each assistant turn's span is found by rendering prefixes: the text up to the
// turn with add_generation_prompt=true (its prompt) and the conversation through the turn. The text
// is cut at those boundaries and each piece is encoded on its own, so the prompt's tokens are the
// ones inference encodes before generating; the loss counts the assistant pieces' tokens (the reply
// through the template's end-of-turn token and what the template writes after it in the turn).
// Throws Error naming the file (and line) for an unreadable record, a pair whose response does not
// fit, a template whose prefixes do not line up, or a file without examples.
std::vector<Example> read_examples(const std::string& path, const io::Tokenizer& tokenizer, std::int64_t seq_len,
                                   std::int32_t eos_id, const io::ChatTemplate* chat_template = nullptr);
// The same from a file's contents (`path` names it in errors; `jsonl` as its extension says).
std::vector<Example> parse_examples(const std::string& text, const std::string& path, bool jsonl, const io::Tokenizer& tokenizer,
                                    std::int64_t seq_len, std::int32_t eos_id, const io::ChatTemplate* chat_template = nullptr);

// Which examples a step takes: epoch e visits every example once in an order shuffled with
// (seed, e); `cursor` counts the examples taken so far over all epochs.
class DataOrder {
 public:
  DataOrder(std::int64_t examples, std::uint64_t seed);
  // The next `count` example indices, advancing the cursor (into the next epoch when needed).
  std::vector<std::int64_t> take(std::int64_t count);
  std::int64_t cursor() const { return cursor_; }
  void set_cursor(std::int64_t cursor) { cursor_ = cursor; }

 private:
  const std::vector<std::int64_t>& order(std::int64_t epoch);
  std::int64_t examples_;
  std::uint64_t seed_;
  std::int64_t cursor_ = 0;
  std::int64_t cached_epoch_ = -1;
  std::vector<std::int64_t> cached_;
};

// The examples packed into one batch (one sequence each).
Batch make_batch(const std::vector<Example>& examples, std::span<const std::int64_t> indices);

}  // namespace mopt::train
