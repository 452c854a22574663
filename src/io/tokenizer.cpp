#include "io/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "core/error.h"
#include "io/gguf.h"
#include "io/gguf_convert.h"
#include "io/json_util.h"
#include "io/utf8.h"

namespace mopt::io {

using nlohmann::json;

namespace {

// ---------------------------------------------------------------------------
// Small helpers

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringMap = std::unordered_map<std::string, std::int32_t, StringHash, std::equal_to<>>;

const std::string& string_field(const json& object, const char* key, const std::string& where) {
  const auto it = object.find(key);
  if (it == object.end() || !it->is_string()) fail("{}: missing string field '{}'", where, key);
  return it->get_ref<const std::string&>();
}

bool bool_field(const json& object, const char* key, bool fallback) {
  const auto it = object.find(key);
  if (it == object.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) fail("field '{}' must be true or false", key);
  return it->get<bool>();
}

std::string type_of(const json& component, const std::string& where) {
  if (!component.is_object()) fail("{} must be an object or null", where);
  return string_field(component, "type", where);
}

bool is_whitespace_byte(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  std::size_t i = 0;
  while (true) {
    const std::size_t at = s.find(from, i);
    if (at == std::string::npos) break;
    out.append(s, i, at - i);
    out.append(to);
    i = at + from.size();
  }
  if (i == 0) return;
  out.append(s, i, std::string::npos);
  s = std::move(out);
}

// A replace/split pattern: {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  bool is_regex = false;
  std::string text;
};

Pattern parse_pattern(const json& p, const std::string& where) {
  if (!p.is_object()) fail("{}: pattern must be an object", where);
  if (p.contains("String")) return {false, string_field(p, "String", where)};
  if (p.contains("Regex")) return {true, string_field(p, "Regex", where)};
  fail("{}: pattern must be {{\"String\": ...}} or {{\"Regex\": ...}}", where);
}

// ---------------------------------------------------------------------------
// PCRE2 with Unicode properties and JIT: the regexes of the pre-tokenizers.

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &error,
                          &offset, nullptr);
    if (code_ == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      fail("{}: regex does not compile at offset {}: {}", where, offset, reinterpret_cast<const char*>(message));
    }
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Byte ranges of all non-overlapping matches in valid UTF-8 `s`.
  void find_all(std::string_view s, std::vector<std::pair<std::size_t, std::size_t>>& out) const {
    out.clear();
    MatchResources& r = match_resources();
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    std::size_t start = 0;
    while (start <= s.size()) {
      const int rc = jit_ ? pcre2_jit_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, md, r.context)
                          : pcre2_match(code_, subject, s.size(), start, PCRE2_NO_UTF_CHECK, md, r.context);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof message);
        fail("pre-tokenizer regex failed on a {}-byte piece: {}", s.size(), reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const std::size_t b = ov[0], e = ov[1];
      if (e == b) {  // an empty match: step over one character
        if (b >= s.size()) break;
        start = b + utf8_sequence_length(static_cast<unsigned char>(s[b]));
        continue;
      }
      out.emplace_back(b, e);
      start = e;
    }
    pcre2_match_data_free(md);
  }

 private:
  // Per thread: a match context with a bounded match limit (a hostile
  // pattern fails instead of running for hours) and a JIT stack large enough
  // for long runs of whitespace.
  struct MatchResources {
    pcre2_match_context* context = nullptr;
    pcre2_jit_stack* stack = nullptr;
    MatchResources() {
      context = pcre2_match_context_create(nullptr);
      pcre2_set_match_limit(context, 10'000'000);
      stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
      pcre2_jit_stack_assign(context, nullptr, stack);
    }
    ~MatchResources() {
      pcre2_jit_stack_free(stack);
      pcre2_match_context_free(context);
    }
  };
  static MatchResources& match_resources() {
    thread_local MatchResources resources;
    return resources;
  }

  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

// ---------------------------------------------------------------------------
// GPT-2's byte <-> printable character table (FORMATS.md 3.3).

struct ByteLevelTable {
  std::array<std::string, 256> byte_to_char;             // UTF-8 of the char for each byte
  std::unordered_map<char32_t, std::uint8_t> char_to_byte;
  ByteLevelTable() {
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(0x100 + extra++);
      utf8_append(byte_to_char[static_cast<std::size_t>(b)], cp);
      char_to_byte[cp] = static_cast<std::uint8_t>(b);
    }
  }
};

const ByteLevelTable& byte_level_table() {
  static const ByteLevelTable table;
  return table;
}

std::string to_byte_level(std::string_view s) {
  const auto& t = byte_level_table();
  std::string out;
  out.reserve(s.size() * 2);
  for (const char c : s) out += t.byte_to_char[static_cast<unsigned char>(c)];
  return out;
}


// ---------------------------------------------------------------------------
// Normalizers

struct Normalizer {
  enum class Kind { nfc, prepend, replace, sequence };
  Kind kind;
  std::string a, b;  // prepend: a; replace: a -> b
  std::vector<Normalizer> children;

  void apply(std::string& s) const {
    switch (kind) {
      case Kind::nfc: {
        if (s.empty()) return;
        utf8proc_uint8_t* out = nullptr;
        const auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()), static_cast<utf8proc_ssize_t>(s.size()),
                                    &out, static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
        if (n < 0) fail("NFC normalization failed: {}", utf8proc_errmsg(n));
        s.assign(reinterpret_cast<const char*>(out), static_cast<std::size_t>(n));
        std::free(out);
        return;
      }
      case Kind::prepend:
        if (!s.empty()) s.insert(0, a);
        return;
      case Kind::replace:
        replace_all(s, a, b);
        return;
      case Kind::sequence:
        for (const auto& c : children) c.apply(s);
        return;
    }
  }
};

Normalizer parse_normalizer(const json& j) {
  const std::string where = "normalizer";
  const std::string type = type_of(j, where);
  if (type == "NFC") return {Normalizer::Kind::nfc, {}, {}, {}};
  if (type == "Prepend") return {Normalizer::Kind::prepend, string_field(j, "prepend", where), {}, {}};
  if (type == "Replace") {
    const Pattern p = parse_pattern(j.at("pattern"), "Replace normalizer");
    if (p.is_regex) fail("normalizer Replace with a regex pattern is not supported");
    return {Normalizer::Kind::replace, p.text, string_field(j, "content", where), {}};
  }
  if (type == "Sequence") {
    Normalizer n{Normalizer::Kind::sequence, {}, {}, {}};
    for (const auto& c : j.at("normalizers")) n.children.push_back(parse_normalizer(c));
    return n;
  }
  fail("normalizer '{}' is not supported", printable(type));
}

// ---------------------------------------------------------------------------
// Pre-tokenizers: each turns a list of pieces into a finer list.

enum class SplitBehavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

struct PreTokenizer {
  enum class Kind { split, byte_level, metaspace, sequence };
  Kind kind;
  // split
  std::shared_ptr<Regex> regex;
  std::string literal;
  SplitBehavior behavior = SplitBehavior::isolated;
  bool invert = false;
  // byte_level
  bool add_prefix_space = false;
  bool use_regex = false;
  // metaspace
  std::string replacement;
  enum class Prepend { always, first, never } prepend = Prepend::always;
  bool split_on_replacement = false;
  std::vector<PreTokenizer> children;
};

SplitBehavior parse_behavior(const std::string& name) {
  if (name == "Removed") return SplitBehavior::removed;
  if (name == "Isolated") return SplitBehavior::isolated;
  if (name == "MergedWithPrevious") return SplitBehavior::merged_with_previous;
  if (name == "MergedWithNext") return SplitBehavior::merged_with_next;
  if (name == "Contiguous") return SplitBehavior::contiguous;
  fail("Split behavior '{}' is not supported", printable(name));
}

// GPT-2's regex, which ByteLevel applies when use_regex is true.
// The largest token id accepted (real vocabularies stay below 300,000).
constexpr std::int64_t kMaxTokenId = std::int64_t{1} << 24;

constexpr const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

PreTokenizer parse_pre_tokenizer(const json& j) {
  const std::string where = "pre_tokenizer";
  const std::string type = type_of(j, where);
  PreTokenizer p{};
  if (type == "Split") {
    p.kind = PreTokenizer::Kind::split;
    const Pattern pattern = parse_pattern(j.at("pattern"), "Split pre_tokenizer");
    if (pattern.is_regex) {
      p.regex = std::make_shared<Regex>(pattern.text, "Split pre_tokenizer");
    } else {
      if (pattern.text.empty()) fail("Split pre_tokenizer: empty string pattern");
      p.literal = pattern.text;
    }
    p.behavior = parse_behavior(string_field(j, "behavior", where));
    p.invert = bool_field(j, "invert", false);
    return p;
  }
  if (type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::byte_level;
    p.add_prefix_space = bool_field(j, "add_prefix_space", true);
    p.use_regex = bool_field(j, "use_regex", true);
    if (p.use_regex) p.regex = std::make_shared<Regex>(kGpt2Pattern, "ByteLevel pre_tokenizer");
    return p;
  }
  if (type == "Metaspace") {
    p.kind = PreTokenizer::Kind::metaspace;
    p.replacement = string_field(j, "replacement", where);
    const auto scheme = j.find("prepend_scheme");
    if (scheme != j.end() && scheme->is_string()) {
      const auto s = scheme->get<std::string>();
      if (s == "always") p.prepend = PreTokenizer::Prepend::always;
      else if (s == "first") p.prepend = PreTokenizer::Prepend::first;
      else if (s == "never") p.prepend = PreTokenizer::Prepend::never;
      else fail("Metaspace prepend_scheme '{}' is not supported", printable(s));
    } else {
      p.prepend = bool_field(j, "add_prefix_space", true) ? PreTokenizer::Prepend::always : PreTokenizer::Prepend::never;
    }
    p.split_on_replacement = bool_field(j, "split", true);
    return p;
  }
  if (type == "Digits") {
    p.kind = PreTokenizer::Kind::split;
    p.regex = std::make_shared<Regex>(bool_field(j, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", "Digits pre_tokenizer");
    p.behavior = SplitBehavior::isolated;
    return p;
  }
  if (type == "Sequence") {
    p.kind = PreTokenizer::Kind::sequence;
    for (const auto& c : j.at("pretokenizers")) p.children.push_back(parse_pre_tokenizer(c));
    return p;
  }
  fail("pre_tokenizer '{}' is not supported", printable(type));
}

// Splits `s` by the matches of a pattern with one of the five behaviours.
void split_by(const PreTokenizer& p, const std::string& s, std::vector<std::string>& out) {
  std::vector<std::pair<std::size_t, std::size_t>> matches;
  if (p.regex) {
    p.regex->find_all(s, matches);
  } else {
    for (std::size_t at = s.find(p.literal); at != std::string::npos; at = s.find(p.literal, at + p.literal.size())) {
      matches.emplace_back(at, at + p.literal.size());
    }
  }
  // Spans covering s, each marked as a match or not.
  struct Span {
    std::size_t b, e;
    bool match;
  };
  std::vector<Span> spans;
  std::size_t pos = 0;
  for (const auto& [b, e] : matches) {
    if (b > pos) spans.push_back({pos, b, p.invert});
    spans.push_back({b, e, !p.invert});
    pos = e;
  }
  if (pos < s.size()) spans.push_back({pos, s.size(), p.invert});

  std::vector<std::pair<std::size_t, std::size_t>> pieces;
  switch (p.behavior) {
    case SplitBehavior::isolated:
      for (const auto& sp : spans) pieces.emplace_back(sp.b, sp.e);
      break;
    case SplitBehavior::removed:
      for (const auto& sp : spans) {
        if (!sp.match) pieces.emplace_back(sp.b, sp.e);
      }
      break;
    case SplitBehavior::merged_with_previous:
      for (const auto& sp : spans) {
        if (sp.match && !pieces.empty()) {
          pieces.back().second = sp.e;
        } else {
          pieces.emplace_back(sp.b, sp.e);
        }
      }
      break;
    case SplitBehavior::merged_with_next: {
      bool pending = false;
      for (const auto& sp : spans) {
        if (pending) {
          pieces.back().second = sp.e;
          pending = sp.match;
        } else {
          pieces.emplace_back(sp.b, sp.e);
          pending = sp.match;
        }
      }
      break;
    }
    case SplitBehavior::contiguous: {
      bool last_match = false;
      for (const auto& sp : spans) {
        if (sp.match && last_match && !pieces.empty()) {
          pieces.back().second = sp.e;
        } else {
          pieces.emplace_back(sp.b, sp.e);
        }
        last_match = sp.match;
      }
      break;
    }
  }
  for (const auto& [b, e] : pieces) {
    if (e > b) out.emplace_back(s, b, e - b);
  }
}

// Applies `p` to every piece. `at_input_start` says whether the first piece
// begins the whole input (Metaspace's "first" prepend scheme needs it).
void pre_tokenize(const PreTokenizer& p, std::vector<std::string>& pieces, bool at_input_start) {
  std::vector<std::string> out;
  switch (p.kind) {
    case PreTokenizer::Kind::sequence:
      for (const auto& c : p.children) pre_tokenize(c, pieces, at_input_start);
      return;
    case PreTokenizer::Kind::split:
      for (const auto& s : pieces) split_by(p, s, out);
      break;
    case PreTokenizer::Kind::byte_level:
      for (auto& s : pieces) {
        if (p.add_prefix_space && !s.empty() && s[0] != ' ') s.insert(0, " ");
        if (p.use_regex) {
          std::vector<std::string> parts;
          split_by(p, s, parts);
          for (const auto& part : parts) out.push_back(to_byte_level(part));
        } else {
          out.push_back(to_byte_level(s));
        }
      }
      break;
    case PreTokenizer::Kind::metaspace:
      for (std::size_t i = 0; i < pieces.size(); ++i) {
        std::string s = pieces[i];
        replace_all(s, " ", p.replacement);
        const bool prepend = p.prepend == PreTokenizer::Prepend::always ||
                             (p.prepend == PreTokenizer::Prepend::first && i == 0 && at_input_start);
        if (prepend && s.compare(0, p.replacement.size(), p.replacement) != 0) s.insert(0, p.replacement);
        if (p.split_on_replacement) {
          // Each replacement starts a new piece (MergedWithNext).
          std::size_t start = 0;
          for (std::size_t at = s.find(p.replacement, 1); at != std::string::npos; at = s.find(p.replacement, at + 1)) {
            out.emplace_back(s, start, at - start);
            start = at;
          }
          if (start < s.size()) out.emplace_back(s, start, std::string::npos);
        } else if (!s.empty()) {
          out.push_back(std::move(s));
        }
      }
      break;
  }
  pieces = std::move(out);
}

// ---------------------------------------------------------------------------
// Decoders: each turns the list of token strings into another list.

struct Decoder {
  enum class Kind { byte_level, replace, byte_fallback, fuse, strip, metaspace, sequence };
  Kind kind;
  std::string a, b;  // replace: a -> b; strip: a = content; metaspace: a = replacement
  std::size_t start = 0, stop = 0;
  bool metaspace_strip_first = true;
  std::vector<Decoder> children;
};

Decoder parse_decoder(const json& j) {
  const std::string where = "decoder";
  const std::string type = type_of(j, where);
  Decoder d{};
  if (type == "ByteLevel") {
    d.kind = Decoder::Kind::byte_level;
  } else if (type == "Replace") {
    d.kind = Decoder::Kind::replace;
    const Pattern p = parse_pattern(j.at("pattern"), "Replace decoder");
    if (p.is_regex) fail("decoder Replace with a regex pattern is not supported");
    d.a = p.text;
    d.b = string_field(j, "content", where);
  } else if (type == "ByteFallback") {
    d.kind = Decoder::Kind::byte_fallback;
  } else if (type == "Fuse") {
    d.kind = Decoder::Kind::fuse;
  } else if (type == "Strip") {
    d.kind = Decoder::Kind::strip;
    d.a = string_field(j, "content", where);
    d.start = j.value("start", std::size_t{0});
    d.stop = j.value("stop", std::size_t{0});
  } else if (type == "Metaspace") {
    d.kind = Decoder::Kind::metaspace;
    d.a = string_field(j, "replacement", where);
    const auto scheme = j.find("prepend_scheme");
    if (scheme != j.end() && scheme->is_string()) {
      d.metaspace_strip_first = scheme->get<std::string>() != "never";
    } else {
      d.metaspace_strip_first = bool_field(j, "add_prefix_space", true);
    }
  } else if (type == "Sequence") {
    d.kind = Decoder::Kind::sequence;
    for (const auto& c : j.at("decoders")) d.children.push_back(parse_decoder(c));
  } else {
    fail("decoder '{}' is not supported", printable(type));
  }
  return d;
}

// "<0xNN>" -> the byte.
std::optional<std::uint8_t> byte_token_value(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return std::nullopt;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<std::uint8_t>(hi * 16 + lo);
}

void decode_chain(const Decoder& d, std::vector<std::string>& tokens) {
  switch (d.kind) {
    case Decoder::Kind::sequence:
      for (const auto& c : d.children) decode_chain(c, tokens);
      return;
    case Decoder::Kind::byte_level: {
      // A token whose every char is in the byte table becomes those bytes; any
      // other token stays as its own UTF-8. The result is decoded lossily.
      const auto& table = byte_level_table();
      std::string bytes;
      for (const auto& t : tokens) {
        std::string mapped;
        bool all = true;
        for (std::size_t i = 0; i < t.size() && all;) {
          const char32_t cp = utf8_next(t, i);
          const auto it = table.char_to_byte.find(cp);
          if (it == table.char_to_byte.end()) {
            all = false;
          } else {
            mapped += static_cast<char>(it->second);
          }
        }
        bytes += all ? mapped : t;
      }
      tokens.assign(1, utf8_make_valid(bytes));
      return;
    }
    case Decoder::Kind::replace:
      for (auto& t : tokens) replace_all(t, d.a, d.b);
      return;
    case Decoder::Kind::byte_fallback: {
      std::vector<std::string> out;
      std::string pending;
      std::size_t pending_count = 0;
      auto flush = [&] {
        if (pending_count == 0) return;
        if (utf8_is_valid(pending)) {
          out.push_back(pending);
        } else {
          for (std::size_t i = 0; i < pending_count; ++i) out.emplace_back("\xEF\xBF\xBD");
        }
        pending.clear();
        pending_count = 0;
      };
      for (auto& t : tokens) {
        if (const auto byte = byte_token_value(t)) {
          pending += static_cast<char>(*byte);
          ++pending_count;
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      tokens = std::move(out);
      return;
    }
    case Decoder::Kind::fuse: {
      std::string all;
      for (const auto& t : tokens) all += t;
      tokens.assign(1, std::move(all));
      return;
    }
    case Decoder::Kind::strip:
      for (auto& t : tokens) {
        std::size_t b = 0;
        for (std::size_t k = 0; k < d.start && t.compare(b, d.a.size(), d.a) == 0 && !d.a.empty(); ++k) b += d.a.size();
        std::size_t e = t.size();
        for (std::size_t k = 0; k < d.stop && e >= b + d.a.size() && !d.a.empty() && t.compare(e - d.a.size(), d.a.size(), d.a) == 0; ++k) {
          e -= d.a.size();
        }
        t = t.substr(b, e - b);
      }
      return;
    case Decoder::Kind::metaspace:
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        replace_all(tokens[i], d.a, " ");
        if (i == 0 && d.metaspace_strip_first && !tokens[i].empty() && tokens[i][0] == ' ') tokens[i].erase(0, 1);
      }
      return;
  }
}

// ---------------------------------------------------------------------------
// The BPE model.

class Bpe {
 public:
  StringMap vocab;
  std::vector<std::string> id_to_token;  // may have holes (empty) for unused ids
  std::optional<std::int32_t> unk_id;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::array<std::int32_t, 256> byte_token_ids{};  // <0xNN> ids, -1 when absent

  struct MergeResult {
    std::int32_t rank;
    std::int32_t id;
  };
  std::unordered_map<std::uint64_t, MergeResult> merges;

  static std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
  }

  void tokenize(const std::string& word, std::vector<std::int32_t>& out) const {
    if (word.empty()) return;
    {
      std::lock_guard<std::mutex> lock(cache_mutex_);
      const auto it = cache_.find(word);
      if (it != cache_.end()) {
        out.insert(out.end(), it->second.begin(), it->second.end());
        return;
      }
    }
    std::vector<std::int32_t> ids;
    merge_word(word, ids);
    out.insert(out.end(), ids.begin(), ids.end());
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= kCacheCapacity) cache_.clear();
    cache_.emplace(word, std::move(ids));
  }

 private:
  static constexpr std::size_t kCacheCapacity = 1 << 16;
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache_;

  void merge_word(const std::string& word, std::vector<std::int32_t>& result) const {
    if (ignore_merges) {
      const auto it = vocab.find(std::string_view(word));
      if (it != vocab.end()) {
        result.push_back(it->second);
        return;
      }
    }
    // Initial symbols: one per character, or byte tokens / unk when the
    // character is not in the vocabulary.
    std::vector<std::int32_t> sym;
    bool last_unk = false;
    for (std::size_t i = 0; i < word.size();) {
      const std::size_t n = std::min(utf8_sequence_length(static_cast<unsigned char>(word[i])), word.size() - i);
      const auto it = vocab.find(std::string_view(word).substr(i, n));
      if (it != vocab.end()) {
        sym.push_back(it->second);
        last_unk = false;
      } else {
        bool done = false;
        if (byte_fallback) {
          bool all = true;
          for (std::size_t k = 0; k < n; ++k) all &= byte_token_ids[static_cast<unsigned char>(word[i + k])] >= 0;
          if (all) {
            for (std::size_t k = 0; k < n; ++k) sym.push_back(byte_token_ids[static_cast<unsigned char>(word[i + k])]);
            done = true;
            last_unk = false;
          }
        }
        if (!done && unk_id) {
          if (!(fuse_unk && last_unk)) sym.push_back(*unk_id);
          last_unk = true;
        }
        // With neither byte fallback nor an unk token the character has no
        // token at all, and HF's BPE leaves it out; so do we.
      }
      i += n;
    }
    // Repeatedly merge the adjacent pair of lowest rank, leftmost first.
    const std::size_t count = sym.size();
    std::vector<std::int64_t> prev(count), next(count);
    std::vector<bool> alive(count, true);
    for (std::size_t i = 0; i < count; ++i) {
      prev[i] = static_cast<std::int64_t>(i) - 1;
      next[i] = i + 1 < count ? static_cast<std::int64_t>(i + 1) : -1;
    }
    struct Candidate {
      std::int32_t rank;
      std::int64_t pos;
      std::int32_t left, right;  // the ids it was computed for
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto consider = [&](std::int64_t i) {
      if (i < 0) return;
      const std::int64_t j = next[static_cast<std::size_t>(i)];
      if (j < 0) return;
      const auto it = merges.find(pair_key(sym[static_cast<std::size_t>(i)], sym[static_cast<std::size_t>(j)]));
      if (it != merges.end()) {
        queue.push({it->second.rank, i, sym[static_cast<std::size_t>(i)], sym[static_cast<std::size_t>(j)]});
      }
    };
    for (std::size_t i = 0; i + 1 < count; ++i) consider(static_cast<std::int64_t>(i));
    while (!queue.empty()) {
      const Candidate c = queue.top();
      queue.pop();
      const auto i = static_cast<std::size_t>(c.pos);
      if (!alive[i] || sym[i] != c.left) continue;
      const std::int64_t j = next[i];
      if (j < 0 || sym[static_cast<std::size_t>(j)] != c.right) continue;
      const auto ju = static_cast<std::size_t>(j);
      sym[i] = merges.at(pair_key(c.left, c.right)).id;
      alive[ju] = false;
      next[i] = next[ju];
      if (next[i] >= 0) prev[static_cast<std::size_t>(next[i])] = static_cast<std::int64_t>(i);
      consider(prev[i]);
      consider(static_cast<std::int64_t>(i));
    }
    for (std::size_t i = 0; i < count; ++i) {
      if (alive[i]) result.push_back(sym[i]);
    }
  }
};

// ---------------------------------------------------------------------------

struct AddedToken {
  std::int32_t id;
  std::string content;
  bool special;
  bool normalized;
  bool lstrip, rstrip, single_word;
};

// A piece of the input: text to normalize and tokenize, or an added token.
struct Segment {
  std::string text;
  std::int32_t added_id = -1;
};

bool is_word_byte(unsigned char c) { return c >= 0x80 || std::isalnum(c) || c == '_'; }

// Splits `text` on the added tokens in `tokens` (leftmost, then longest).
std::vector<Segment> split_on_added(const std::string& text, const std::vector<const AddedToken*>& tokens,
                                    const std::array<std::vector<const AddedToken*>, 256>& by_first_byte) {
  std::vector<Segment> out;
  if (tokens.empty()) {
    out.push_back({text, -1});
    return out;
  }
  std::size_t plain_start = 0;
  std::size_t i = 0;
  while (i < text.size()) {
    const AddedToken* found = nullptr;
    for (const AddedToken* t : by_first_byte[static_cast<unsigned char>(text[i])]) {  // longest first
      if (text.compare(i, t->content.size(), t->content) != 0) continue;
      if (t->single_word) {
        const bool before_ok = i == 0 || !is_word_byte(static_cast<unsigned char>(text[i - 1]));
        const std::size_t e = i + t->content.size();
        const bool after_ok = e >= text.size() || !is_word_byte(static_cast<unsigned char>(text[e]));
        if (!before_ok || !after_ok) continue;
      }
      found = t;
      break;
    }
    if (found == nullptr) {
      ++i;
      continue;
    }
    std::size_t plain_end = i;
    if (found->lstrip) {
      while (plain_end > plain_start && is_whitespace_byte(text[plain_end - 1])) --plain_end;
    }
    if (plain_end > plain_start) out.push_back({text.substr(plain_start, plain_end - plain_start), -1});
    out.push_back({found->content, found->id});
    i += found->content.size();
    if (found->rstrip) {
      while (i < text.size() && is_whitespace_byte(text[i])) ++i;
    }
    plain_start = i;
  }
  if (plain_start < text.size()) out.push_back({text.substr(plain_start), -1});
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------

struct Tokenizer::Impl {
  Bpe bpe;
  std::vector<AddedToken> added;
  std::unordered_map<std::int32_t, std::size_t> added_by_id;
  std::vector<const AddedToken*> raw_added, normalized_added;
  std::array<std::vector<const AddedToken*>, 256> raw_by_byte, normalized_by_byte;
  std::optional<Normalizer> normalizer;
  std::optional<PreTokenizer> pre_tokenizer;
  std::optional<Decoder> decoder;
  std::vector<std::int32_t> prefix_ids, suffix_ids;  // from TemplateProcessing "single"
  std::int32_t vocab_size = 0;

  void tokenize_plain(std::string text, bool at_input_start, std::vector<std::int32_t>& ids) const {
    if (normalizer) normalizer->apply(text);
    std::vector<Segment> parts;
    if (normalized_added.empty()) {
      parts.push_back({std::move(text), -1});
    } else {
      parts = split_on_added(text, normalized_added, normalized_by_byte);
    }
    for (std::size_t k = 0; k < parts.size(); ++k) {
      if (parts[k].added_id >= 0) {
        ids.push_back(parts[k].added_id);
        continue;
      }
      std::vector<std::string> pieces{std::move(parts[k].text)};
      if (pre_tokenizer) pre_tokenize(*pre_tokenizer, pieces, at_input_start && k == 0);
      for (const auto& piece : pieces) bpe.tokenize(piece, ids);
    }
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_json(std::string_view text, const std::string& label) {
  try {
    return from_json_checked(text, label);
  } catch (const json::exception& e) {
    // A field of the wrong type or missing where the parser reads it directly.
    std::string what = e.what();
    if (const auto close = what.find("] "); close != std::string::npos) what.erase(0, close + 2);
    fail("{}: malformed tokenizer.json: {}", label, printable(what));
  }
}

Tokenizer Tokenizer::from_json_checked(std::string_view text, const std::string& label) {
  return with_context(label, [&] {
    json j;
    try {
      j = json::parse(text.begin(), text.end());
    } catch (const json::exception& e) {
      fail("invalid JSON: {}", printable(e.what()));
    }
    if (!j.is_object()) fail("expected a JSON object");
    auto impl = std::make_unique<Impl>();

    // Model.
    const auto model_it = j.find("model");
    if (model_it == j.end() || !model_it->is_object()) fail("missing object 'model'");
    const json& model = *model_it;
    const std::string model_type = model.contains("type") ? type_of(model, "model") : std::string("BPE");
    if (model_type != "BPE") fail("model type '{}' is not supported (only BPE)", printable(model_type));
    Bpe& bpe = impl->bpe;
    with_context("model", [&] {
      for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
        const auto it = model.find(key);
        if (it != model.end() && !it->is_null() && !(it->is_string() && it->get_ref<const std::string&>().empty())) {
          fail("'{}' is not supported", key);
        }
      }
      const auto dropout = model.find("dropout");
      if (dropout != model.end() && !dropout->is_null() && !(dropout->is_number() && dropout->get<double>() == 0.0)) {
        fail("BPE dropout is not supported");
      }
      bpe.fuse_unk = bool_field(model, "fuse_unk", false);
      bpe.byte_fallback = bool_field(model, "byte_fallback", false);
      bpe.ignore_merges = bool_field(model, "ignore_merges", false);
      const auto vocab_it = model.find("vocab");
      if (vocab_it == model.end() || !vocab_it->is_object()) fail("missing object 'vocab'");
      bpe.vocab.reserve(vocab_it->size());
      std::int32_t max_id = -1;
      for (const auto& [token, id] : vocab_it->items()) {
        if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= kMaxTokenId) {
          fail("vocab entry '{}' has an invalid id", printable(token));
        }
        const auto v = static_cast<std::int32_t>(id.get<std::int64_t>());
        bpe.vocab.emplace(token, v);
        max_id = std::max(max_id, v);
      }
      // Ids index dense tables (here and in the model's embedding): a few
      // holes are normal, an id far beyond the number of tokens is not.
      const auto added_it = j.find("added_tokens");
      const std::size_t entries =
          vocab_it->size() + (added_it != j.end() && added_it->is_array() ? added_it->size() : 0);
      const std::int64_t id_limit = std::min<std::int64_t>(kMaxTokenId, 4 * static_cast<std::int64_t>(entries) + 1024);
      if (max_id >= id_limit) {
        fail("vocabulary id {} is too large for {} tokens (ids must be below {})", max_id, entries, id_limit);
      }
      bpe.id_to_token.assign(static_cast<std::size_t>(max_id + 1), std::string());
      for (const auto& [token, id] : bpe.vocab) {
        auto& slot = bpe.id_to_token[static_cast<std::size_t>(id)];
        if (!slot.empty()) fail("id {} is given to both '{}' and '{}'", id, printable(slot), printable(token));
        slot = token;
      }
      bpe.byte_token_ids.fill(-1);
      for (int b = 0; b < 256; ++b) {
        const auto it = bpe.vocab.find(fmt::format("<0x{:02X}>", b));
        if (it != bpe.vocab.end()) bpe.byte_token_ids[static_cast<std::size_t>(b)] = it->second;
      }
      const auto unk = model.find("unk_token");
      if (unk != model.end() && unk->is_string()) {
        const auto it = bpe.vocab.find(unk->get_ref<const std::string&>());
        if (it == bpe.vocab.end()) fail("unk_token '{}' is not in the vocabulary", printable(unk->get<std::string>()));
        bpe.unk_id = it->second;
      }
      const auto merges_it = model.find("merges");
      if (merges_it == model.end() || !merges_it->is_array()) fail("missing array 'merges'");
      bpe.merges.reserve(merges_it->size());
      std::int32_t rank = 0;
      std::string joined;
      for (const auto& m : *merges_it) {
        std::string_view a, b;
        if (m.is_string()) {
          const std::string& s = m.get_ref<const std::string&>();
          if (rank == 0 && s.rfind("#version", 0) == 0) continue;
          const auto space = s.find(' ');
          if (space == std::string::npos) fail("merge {} '{}' is not two tokens", rank, printable(s));
          a = std::string_view(s).substr(0, space);
          b = std::string_view(s).substr(space + 1);
        } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
          a = m[0].get_ref<const std::string&>();
          b = m[1].get_ref<const std::string&>();
        } else {
          fail("merge {} must be \"a b\" or [\"a\", \"b\"]", rank);
        }
        const auto ia = bpe.vocab.find(a), ib = bpe.vocab.find(b);
        joined.assign(a);
        joined.append(b);
        const auto iab = bpe.vocab.find(std::string_view(joined));
        if (ia == bpe.vocab.end() || ib == bpe.vocab.end() || iab == bpe.vocab.end()) {
          fail("merge {} '{} {}' uses a token that is not in the vocabulary", rank, printable(a), printable(b));
        }
        bpe.merges.emplace(Bpe::pair_key(ia->second, ib->second), Bpe::MergeResult{rank, iab->second});
        ++rank;
      }
    });

    // Added tokens.
    impl->vocab_size = static_cast<std::int32_t>(bpe.id_to_token.size());
    if (const auto at = j.find("added_tokens"); at != j.end() && !at->is_null()) {
      if (!at->is_array()) fail("added_tokens must be an array");
      for (const auto& t : *at) {
        if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer()) fail("added_tokens: each needs an integer id");
        AddedToken a{};
        const auto id = t["id"].get<std::int64_t>();
        if (id < 0 || id >= kMaxTokenId || id >= 4 * static_cast<std::int64_t>(bpe.vocab.size() + at->size()) + 1024) {
          fail("added token id {} is out of range for {} tokens", id, bpe.vocab.size() + at->size());
        }
        a.id = static_cast<std::int32_t>(id);
        a.content = string_field(t, "content", "added token");
        if (a.content.empty()) fail("added token {} is empty", a.id);
        a.special = bool_field(t, "special", false);
        a.normalized = bool_field(t, "normalized", !a.special);
        a.lstrip = bool_field(t, "lstrip", false);
        a.rstrip = bool_field(t, "rstrip", false);
        a.single_word = bool_field(t, "single_word", false);
        impl->added.push_back(std::move(a));
        impl->vocab_size = std::max(impl->vocab_size, impl->added.back().id + 1);
      }
    }
    for (std::size_t i = 0; i < impl->added.size(); ++i) {
      const AddedToken& a = impl->added[i];
      impl->added_by_id[a.id] = i;
      (a.normalized ? impl->normalized_added : impl->raw_added).push_back(&a);
      (a.normalized ? impl->normalized_by_byte : impl->raw_by_byte)[static_cast<unsigned char>(a.content[0])].push_back(&a);
    }
    for (auto* table : {&impl->raw_by_byte, &impl->normalized_by_byte}) {
      for (auto& v : *table) {
        std::stable_sort(v.begin(), v.end(), [](const AddedToken* x, const AddedToken* y) { return x->content.size() > y->content.size(); });
      }
    }

    // Pipeline components.
    if (const auto n = j.find("normalizer"); n != j.end() && !n->is_null()) impl->normalizer = parse_normalizer(*n);
    if (const auto p = j.find("pre_tokenizer"); p != j.end() && !p->is_null()) impl->pre_tokenizer = parse_pre_tokenizer(*p);
    if (const auto d = j.find("decoder"); d != j.end() && !d->is_null()) impl->decoder = parse_decoder(*d);
    if (const auto pp = j.find("post_processor"); pp != j.end() && !pp->is_null()) {
      std::function<void(const json&)> parse_post = [&](const json& p) {
        const std::string type = type_of(p, "post_processor");
        if (type == "ByteLevel") return;  // offsets only
        if (type == "Sequence") {
          for (const auto& c : p.at("processors")) parse_post(c);
          return;
        }
        if (type != "TemplateProcessing") fail("post_processor '{}' is not supported", printable(type));
        const auto single = p.find("single");
        if (single == p.end() || !single->is_array()) fail("TemplateProcessing: missing 'single'");
        const json& specials = p.at("special_tokens");
        bool seen_sequence = false;
        for (const auto& piece : *single) {
          if (piece.contains("Sequence")) {
            seen_sequence = true;
            continue;
          }
          const auto st = piece.find("SpecialToken");
          if (st == piece.end()) fail("TemplateProcessing: unknown template piece");
          const std::string& name = string_field(*st, "id", "TemplateProcessing");
          const auto spec = specials.find(name);
          if (spec == specials.end()) fail("TemplateProcessing: special token '{}' is not defined", printable(name));
          for (const auto& id : spec->at("ids")) {
            if (!id.is_number_integer() || id.get<std::int64_t>() < 0 || id.get<std::int64_t>() >= impl->vocab_size) {
              fail("TemplateProcessing: special token '{}' has id {}, outside the vocabulary ({} tokens)", printable(name),
                   id.dump(), impl->vocab_size);
            }
            (seen_sequence ? impl->suffix_ids : impl->prefix_ids).push_back(id.get<std::int32_t>());
          }
        }
      };
      parse_post(*pp);
    }
    return Tokenizer(std::move(impl));
  });
}

namespace {

// Whether the file starts with GGUF's magic (llama.cpp's model files carry their tokenizer).
bool is_gguf_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[4] = {};
  return f.read(magic, 4) && std::string_view(magic, 4) == "GGUF";
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  std::string file = path;
  if (fs::is_directory(path)) {
    file = (fs::path(path) / "tokenizer.json").string();
    if (!fs::exists(file)) fail("{}: no tokenizer.json in this directory", path);
  } else if (!fs::exists(path)) {
    fail("{}: no such file or directory", path);
  } else if (is_gguf_file(path)) {
    // A llama.cpp file: its tokenizer.ggml.* metadata as the tokenizer.json convert would write.
    return from_json(gguf_to_hf_tokenizer(GgufFile::open(path)).dump(), path);
  }
  return from_json(read_text_file(file), file);
}

std::vector<std::int32_t> Tokenizer::encode(std::string_view input, bool add_special_tokens) const {
  const Impl& im = *impl_;
  const std::string text = utf8_is_valid(input) ? std::string(input) : utf8_make_valid(input);
  std::vector<std::int32_t> ids;
  if (add_special_tokens) ids = im.prefix_ids;
  const std::vector<Segment> segments = split_on_added(text, im.raw_added, im.raw_by_byte);
  for (std::size_t k = 0; k < segments.size(); ++k) {
    if (segments[k].added_id >= 0) {
      ids.push_back(segments[k].added_id);
    } else {
      im.tokenize_plain(segments[k].text, k == 0, ids);
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), im.suffix_ids.begin(), im.suffix_ids.end());
  return ids;
}

std::string Tokenizer::decode(std::span<const std::int32_t> ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const std::int32_t id : ids) {
    if (skip_special_tokens && is_special(id)) continue;
    tokens.push_back(id_to_token(id));
  }
  if (!im.decoder) {
    std::string out;
    for (std::size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  decode_chain(*im.decoder, tokens);
  std::string out;
  for (const auto& t : tokens) out += t;
  return out;
}

std::int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<std::int32_t> Tokenizer::token_to_id(std::string_view token) const {
  for (const auto& a : impl_->added) {
    if (a.content == token) return a.id;
  }
  const auto it = impl_->bpe.vocab.find(token);
  if (it == impl_->bpe.vocab.end()) return std::nullopt;
  return it->second;
}

const std::string& Tokenizer::id_to_token(std::int32_t id) const {
  const auto added = impl_->added_by_id.find(id);
  if (added != impl_->added_by_id.end()) return impl_->added[added->second].content;
  const auto& table = impl_->bpe.id_to_token;
  if (id < 0 || static_cast<std::size_t>(id) >= table.size() || table[static_cast<std::size_t>(id)].empty()) {
    fail("token id {} is not in the vocabulary (size {})", id, impl_->vocab_size);
  }
  return table[static_cast<std::size_t>(id)];
}

bool Tokenizer::is_special(std::int32_t id) const {
  const auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

std::vector<std::int32_t> Tokenizer::prefix_special_ids() const { return impl_->prefix_ids; }

}  // namespace mopt::io
