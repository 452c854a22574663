#include <fmt/format.h>

#include <charconv>

#include "cli/commands.h"
#include "core/error.h"
#include "io/tokenizer.h"

namespace mopt::cli {

int run_tokenize(const TokenizeOptions& options) {
  const auto tokenizer = io::Tokenizer::load(options.tokenizer);
  const auto ids = tokenizer.encode(options.text, options.special);
  std::string out = "[";
  for (std::size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  fmt::print("{}]\n", out);
  return 0;
}

std::vector<std::int32_t> parse_ids(const std::string& text) {
  std::vector<std::int32_t> ids;
  std::size_t i = 0;
  while (i < text.size()) {
    while (i < text.size() && (text[i] == ' ' || text[i] == ',' || text[i] == '[' || text[i] == ']')) ++i;
    if (i >= text.size()) break;
    std::int32_t id = 0;
    const auto [end, ec] = std::from_chars(text.data() + i, text.data() + text.size(), id);
    if (ec != std::errc() || end == text.data() + i) fail("--ids: '{}' is not a list of token ids", text);
    ids.push_back(id);
    i = static_cast<std::size_t>(end - text.data());
  }
  return ids;
}

int run_detokenize(const DetokenizeOptions& options) {
  const auto tokenizer = io::Tokenizer::load(options.tokenizer);
  fmt::print("{}\n", tokenizer.decode(parse_ids(options.ids), options.skip_special));
  return 0;
}

}  // namespace mopt::cli
