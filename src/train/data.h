// Training data: text packed into sequences, or prompt/response pairs whose loss counts the
// response only (supervised fine-tuning), in a seeded order that a resumed run continues exactly.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "io/tokenizer.h"
#include "train/model.h"

namespace mopt::train {

struct Example {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;  // targets[i]: the token after tokens[i], or -1 (no loss there)
};

// Examples of at most seq_len tokens from a file:
//  - .txt: the whole file is one document;
//  - .jsonl: one JSON object per line, {"text": ...} (a document) or {"prompt": ..., "response": ...}.
// A document's tokens are cut into pieces of seq_len minus the tokenizer's prefix (BOS), each piece
// with the prefix, as calibration samples are; every token predicts the next within its piece.
// A pair becomes prefix + prompt + response + EOS (eos_id, when >= 0), cut to seq_len, and only the
// response's tokens and the EOS are predicted.
// Throws Error naming the file (and line) for an unreadable record, a pair whose response does not
// fit, or a file without examples.
std::vector<Example> read_examples(const std::string& path, const io::Tokenizer& tokenizer, std::int64_t seq_len,
                                   std::int32_t eos_id);
// The same from a file's contents (`path` names it in errors; `jsonl` as its extension says).
std::vector<Example> parse_examples(const std::string& text, const std::string& path, bool jsonl, const io::Tokenizer& tokenizer,
                                    std::int64_t seq_len, std::int32_t eos_id);

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
