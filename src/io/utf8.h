// UTF-8 helpers for the tokenizer.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace mopt::io {

// `text` with every ill-formed part replaced by U+FFFD, one per maximal
// subpart of an ill-formed sequence (Unicode 3.9, "substitution of maximal
// subparts" — what Python's errors="replace" and Rust's from_utf8_lossy do).
std::string utf8_make_valid(std::string_view text);
bool utf8_is_valid(std::string_view text);

// Appends the UTF-8 encoding of `code_point` (must be a valid scalar value).
void utf8_append(std::string& out, char32_t code_point);

// Length in bytes of the UTF-8 sequence starting with `lead` (1 for a byte
// that cannot start one). Only meaningful on valid UTF-8.
inline std::size_t utf8_sequence_length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xF0) return 4;
  if (lead >= 0xE0) return 3;
  if (lead >= 0xC0) return 2;
  return 1;
}

// Decodes the code point starting at text[i] of valid UTF-8 and advances i.
char32_t utf8_next(std::string_view text, std::size_t& i);

}  // namespace mopt::io
