// libFuzzer target: training data (.jsonl records of text or prompt/response pairs, and plain text),
// tokenized by the bundled model's tokenizer into examples. The first byte picks .jsonl or .txt and
// the sequence length; every example must fit it and have one target per token.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "io/tokenizer.h"
#include "train/data.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const mopt::io::Tokenizer tokenizer = mopt::io::Tokenizer::load(MOPT_FUZZ_TOKENIZER_DIR);
  if (size == 0) return 0;
  const bool jsonl = (data[0] & 1) == 0;
  const std::int64_t seq_len = 2 + (data[0] >> 1);
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    const auto examples = mopt::train::parse_examples(text, jsonl ? "data.jsonl" : "data.txt", jsonl, tokenizer, seq_len, 2);
    for (const auto& e : examples) {
      if (e.tokens.size() != e.targets.size() || static_cast<std::int64_t>(e.tokens.size()) > seq_len) std::abort();
    }
  } catch (const mopt::Error&) {
  }
  return 0;
}
