// Hugging Face tokenizer.json with a BPE model: byte-level BPE (GPT-2, Llama-3,
// Qwen2/3, SmolLM) and SentencePiece-style BPE with byte fallback (Llama-2,
// Mistral). Encodes and decodes exactly as the `tokenizers` library does for
// the components listed below; any other component is refused by name.
//
//   normalizers:     NFC, Prepend, Replace (string pattern), Sequence
//   pre-tokenizers:  Split (regex via PCRE2, or string; all five behaviours),
//                    ByteLevel, Metaspace, Digits, Sequence
//   model:           BPE (merges as "a b" or ["a", "b"], ignore_merges,
//                    byte_fallback, unk / fuse_unk)
//   post-processors: TemplateProcessing, ByteLevel, Sequence
//   decoders:        ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence
//   added tokens:    matched before normalization (or after, when normalized),
//                    leftmost-longest, with lstrip / rstrip / single_word
//
// Input that is not valid UTF-8 is first repaired by replacing each maximal
// ill-formed subpart with U+FFFD (as Python's decode(errors="replace") does).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace mopt::io {

class Tokenizer {
 public:
  // Parses tokenizer.json text; `label` (the path) starts every error message.
  static Tokenizer from_json(std::string_view text, const std::string& label);
  // A tokenizer.json file, a model directory holding one, or a GGUF file (its tokenizer.ggml.* metadata,
  // as `mopt convert` turns it into tokenizer.json).
  static Tokenizer load(const std::string& path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Token ids of `text`. Added and special tokens written in the text are
  // always recognised; `add_special_tokens` applies the post-processor's
  // template (BOS and the like), as HF's add_special_tokens=True does.
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = false) const;
  // Text of `ids`; throws Error for an id outside the vocabulary.
  std::string decode(std::span<const std::int32_t> ids, bool skip_special_tokens = false) const;

  // One past the largest id (vocabulary and added tokens).
  std::int32_t vocab_size() const;
  std::optional<std::int32_t> token_to_id(std::string_view token) const;
  // The token's string as stored in the vocabulary (byte-level alphabet).
  const std::string& id_to_token(std::int32_t id) const;
  bool is_special(std::int32_t id) const;
  // Ids the post-processor puts before the text, if any.
  std::vector<std::int32_t> prefix_special_ids() const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  static Tokenizer from_json_checked(std::string_view text, const std::string& label);
  std::unique_ptr<Impl> impl_;
};

}  // namespace mopt::io
