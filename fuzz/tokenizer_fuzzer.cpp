// libFuzzer target: tokenizer.json parsing, then encoding and decoding.
// The input is split at the first NUL byte: before it the tokenizer.json
// text, after it the text to encode.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "io/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const auto split = all.find('\0');
  const std::string_view json = all.substr(0, split);
  const std::string_view text = split == std::string_view::npos ? std::string_view("Hello world 123") : all.substr(split + 1);
  try {
    const auto tok = mopt::io::Tokenizer::from_json(json, "tokenizer.json");
    const auto ids = tok.encode(text, true);
    for (const auto id : ids) {
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();  // every id must decode
    }
    tok.decode(ids, false);
    tok.decode(ids, true);
  } catch (const mopt::Error&) {
  }
  return 0;
}
