#include "io/chat_template.h"

#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <optional>
#include <utility>
#include <vector>

#include "core/error.h"
#include "io/json_util.h"
#include "io/utf8.h"

namespace mopt::io {

namespace {

// Bounds that keep a hostile template from exhausting the stack, the memory or the time.
// Nested blocks, brackets and prefix operators as parsed, and expressions as evaluated (a left-deep
// chain such as a + a + ... + a nests without brackets). Small: a sanitizer's stack frames are large,
// and real templates nest a few levels.
constexpr int kMaxDepth = 64;
constexpr int kMaxEvalDepth = 2 * kMaxDepth;
constexpr std::size_t kMaxString = 16u << 20;           // bytes of any one string (and the output)
constexpr std::size_t kMaxList = 1u << 20;              // items of any one list
constexpr std::uint64_t kMaxWork = 256ull << 20;        // bytes and items made over one render
constexpr std::uint64_t kMaxSteps = 1'000'000;          // expressions evaluated and loop turns over one render

// ---------------------------------------------------------------------------------------------
// Values: Python's types as jinja2 sees them.

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // in insertion order, as Python's dict

struct Value {
  enum class Kind : std::uint8_t { undefined, none, boolean, integer, floating, string, list, dict, ns, function };
  Kind kind = Kind::undefined;
  bool tuple = false;  // a list shown as (a, b)
  bool b = false;
  std::int64_t i = 0;
  double f = 0;
  std::string s;  // string; function name; for undefined: what was missing, for the error
  std::shared_ptr<const List> list;
  std::shared_ptr<Dict> dict;  // dict (never changed once made) or namespace (assigned by `set ns.x`)

  static Value none() { return make(Kind::none); }
  static Value boolean(bool v) {
    Value x = make(Kind::boolean);
    x.b = v;
    return x;
  }
  static Value integer(std::int64_t v) {
    Value x = make(Kind::integer);
    x.i = v;
    return x;
  }
  static Value floating(double v) {
    Value x = make(Kind::floating);
    x.f = v;
    return x;
  }
  static Value string(std::string v) {
    Value x = make(Kind::string);
    x.s = std::move(v);
    return x;
  }
  static Value undefined(std::string what) {
    Value x;
    x.s = std::move(what);
    return x;
  }
  static Value function(std::string name) {
    Value x = make(Kind::function);
    x.s = std::move(name);
    return x;
  }
  static Value of_list(List items, bool is_tuple = false) {
    Value x = make(Kind::list);
    x.list = std::make_shared<const List>(std::move(items));
    x.tuple = is_tuple;
    return x;
  }
  static Value of_dict(Dict items, Kind kind = Kind::dict) {
    Value x = make(kind);
    x.dict = std::make_shared<Dict>(std::move(items));
    return x;
  }
  static Value make(Kind k) {
    Value x;
    x.kind = k;
    return x;
  }

  bool is(Kind k) const { return kind == k; }
  bool is_number() const { return kind == Kind::boolean || kind == Kind::integer || kind == Kind::floating; }
  bool is_int_like() const { return kind == Kind::boolean || kind == Kind::integer; }
  std::int64_t as_int() const { return kind == Kind::boolean ? (b ? 1 : 0) : i; }
  double as_double() const { return kind == Kind::floating ? f : static_cast<double>(as_int()); }
};

using Kind = Value::Kind;

const Value* dict_find(const Dict& d, std::string_view key) {
  for (const auto& [k, v] : d) {
    if (k == key) return &v;
  }
  return nullptr;
}

std::string type_name(const Value& v) {
  switch (v.kind) {
    case Kind::undefined: return "undefined";
    case Kind::none: return "NoneType";
    case Kind::boolean: return "bool";
    case Kind::integer: return "int";
    case Kind::floating: return "float";
    case Kind::string: return "str";
    case Kind::list: return v.tuple ? "tuple" : "list";
    case Kind::dict: return "dict";
    case Kind::ns: return "Namespace";
    case Kind::function: return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Kind::undefined:
    case Kind::none: return false;
    case Kind::boolean: return v.b;
    case Kind::integer: return v.i != 0;
    case Kind::floating: return v.f != 0;
    case Kind::string: return !v.s.empty();
    case Kind::list: return !v.list->empty();
    case Kind::dict: return !v.dict->empty();
    case Kind::ns:
    case Kind::function: return true;
  }
  return false;
}

// Python's repr of a float: the shortest digits that read back, fixed notation for exponents in
// [-4, 16), else d.ddde+XX.
std::string python_float(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const std::string_view text(buf, static_cast<std::size_t>(r.ptr - buf));
  const bool negative = text.front() == '-';
  const auto e_at = text.find('e');
  std::string digits;
  for (const char c : text.substr(negative ? 1 : 0, e_at - (negative ? 1 : 0))) {
    if (c != '.') digits += c;
  }
  int exponent = 0;
  std::from_chars(text.data() + e_at + (text[e_at + 1] == '+' ? 2 : 1), text.data() + text.size(), exponent);
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out = negative ? "-" : "";
  if (exponent >= -4 && exponent < 16) {
    if (exponent >= 0) {
      const auto int_digits = static_cast<std::size_t>(exponent) + 1;
      std::string whole = digits.substr(0, std::min(int_digits, digits.size()));
      whole.append(int_digits - whole.size(), '0');
      const std::string frac = digits.size() > int_digits ? digits.substr(int_digits) : "0";
      out += whole + "." + frac;
    } else {
      out += "0." + std::string(static_cast<std::size_t>(-exponent - 1), '0') + digits;
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  out += fmt::format("e{}{:02d}", exponent < 0 ? '-' : '+', std::abs(exponent));
  return out;
}

// Python's repr of a str (quotes chosen as Python chooses them).
std::string python_repr(std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == quote || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (u < 0x20 || u == 0x7f) {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  out += quote;
  return out;
}

std::string to_repr(const Value& v);

// Python's str() of a value, as {{ }} writes it.
std::string to_str(const Value& v) {
  switch (v.kind) {
    case Kind::undefined: return "";
    case Kind::none: return "None";
    case Kind::boolean: return v.b ? "True" : "False";
    case Kind::integer: return std::to_string(v.i);
    case Kind::floating: return python_float(v.f);
    case Kind::string: return v.s;
    case Kind::ns: return "<Namespace>";
    case Kind::function: return fmt::format("<function {}>", v.s);
    case Kind::list:
    case Kind::dict: return to_repr(v);
  }
  return "";
}

std::string to_repr(const Value& v) {
  if (v.is(Kind::string)) return python_repr(v.s);
  if (v.is(Kind::list)) {
    std::string out = v.tuple ? "(" : "[";
    for (std::size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + to_repr((*v.list)[k]);
    if (v.tuple && v.list->size() == 1) out += ",";
    return out + (v.tuple ? ")" : "]");
  }
  if (v.is(Kind::dict)) {
    std::string out = "{";
    bool first = true;
    for (const auto& [k, x] : *v.dict) {
      out += (first ? "" : ", ") + python_repr(k) + ": " + to_repr(x);
      first = false;
    }
    return out + "}";
  }
  return to_str(v);
}

// json.dumps(value, ensure_ascii=False, indent=indent) as transformers' tojson filter writes it.
void to_json(const Value& v, int indent, int level, std::string& out) {
  const auto newline = [&](int at) {
    if (indent >= 0) out += "\n" + std::string(static_cast<std::size_t>(indent * at), ' ');
  };
  switch (v.kind) {
    case Kind::none: out += "null"; return;
    case Kind::boolean: out += v.b ? "true" : "false"; return;
    case Kind::integer: out += std::to_string(v.i); return;
    case Kind::floating:
      out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f < 0 ? "-Infinity" : "Infinity") : python_float(v.f);
      return;
    case Kind::string:
      out += '"';
      for (const char c : v.s) {
        const auto u = static_cast<unsigned char>(c);
        switch (c) {
          case '"': out += "\\\""; break;
          case '\\': out += "\\\\"; break;
          case '\n': out += "\\n"; break;
          case '\r': out += "\\r"; break;
          case '\t': out += "\\t"; break;
          case '\b': out += "\\b"; break;
          case '\f': out += "\\f"; break;
          default:
            if (u < 0x20) {
              out += fmt::format("\\u{:04x}", u);
            } else {
              out += c;
            }
        }
      }
      out += '"';
      return;
    case Kind::list:
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (std::size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += indent >= 0 ? "," : ", ";
        newline(level + 1);
        to_json((*v.list)[k], indent, level + 1, out);
      }
      newline(level);
      out += ']';
      return;
    case Kind::dict:
      if (v.dict->empty()) {
        out += "{}";
        return;
      }
      out += '{';
      for (std::size_t k = 0; k < v.dict->size(); ++k) {
        if (k) out += indent >= 0 ? "," : ", ";
        newline(level + 1);
        to_json(Value::string((*v.dict)[k].first), indent, level + 1, out);
        out += ": ";
        to_json((*v.dict)[k].second, indent, level + 1, out);
      }
      newline(level);
      out += '}';
      return;
    case Kind::undefined:
    case Kind::ns:
    case Kind::function: fail("tojson: a value of type {} is not JSON serializable", type_name(v));
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.is(Kind::floating) || b.is(Kind::floating)) return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::undefined:
    case Kind::none: return true;
    case Kind::string:
    case Kind::function: return a.s == b.s;
    case Kind::list:
      if (a.list->size() != b.list->size()) return false;
      for (std::size_t k = 0; k < a.list->size(); ++k) {
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    case Kind::dict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, x] : *a.dict) {
        const Value* y = dict_find(*b.dict, k);
        if (!y || !equal(x, *y)) return false;
      }
      return true;
    case Kind::ns: return a.dict == b.dict;
    default: return false;
  }
}

// Code points of a UTF-8 string (values are always valid UTF-8).
std::vector<char32_t> code_points(std::string_view s) {
  std::vector<char32_t> out;
  for (std::size_t k = 0; k < s.size();) out.push_back(utf8_next(s, k));
  return out;
}

std::string from_code_points(const std::vector<char32_t>& cps, std::size_t begin, std::size_t end) {
  std::string out;
  for (std::size_t k = begin; k < end; ++k) utf8_append(out, cps[k]);
  return out;
}

// Python's str.isspace().
bool is_python_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) ||
         c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// str.strip / lstrip / rstrip: `chars` none strips whitespace.
std::string python_strip(std::string_view s, const std::optional<std::string>& chars, bool left, bool right) {
  const auto cps = code_points(s);
  const auto set = chars ? code_points(*chars) : std::vector<char32_t>{};
  const auto strip_it = [&](char32_t c) { return chars ? std::find(set.begin(), set.end(), c) != set.end() : is_python_space(c); };
  std::size_t begin = 0;
  std::size_t end = cps.size();
  if (left) {
    while (begin < end && strip_it(cps[begin])) ++begin;
  }
  if (right) {
    while (end > begin && strip_it(cps[end - 1])) --end;
  }
  return from_code_points(cps, begin, end);
}

// Python's slice(start, stop, step).indices(length), as the positions taken.
std::vector<std::size_t> slice_positions(std::int64_t length, std::optional<std::int64_t> start, std::optional<std::int64_t> stop,
                                         std::int64_t step) {
  if (step == 0) fail("slice step cannot be zero");
  const auto clamp = [&](std::optional<std::int64_t> x, std::int64_t fallback) {
    if (!x) return fallback;
    std::int64_t v = *x;
    if (v < 0) v = std::max<std::int64_t>(v + length, step < 0 ? -1 : 0);
    return std::min(v, step < 0 ? length - 1 : length);
  };
  const std::int64_t from = clamp(start, step < 0 ? length - 1 : 0);
  const std::int64_t to = clamp(stop, step < 0 ? -1 : length);
  std::vector<std::size_t> out;
  for (std::int64_t k = from; step > 0 ? k < to : k > to; k += step) out.push_back(static_cast<std::size_t>(k));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tokens.

struct Pos {
  int line = 1;
  int column = 1;
};

enum class Tok : std::uint8_t { text, output_begin, output_end, block_begin, block_end, name, string, integer, floating, op, eof };

struct Token {
  Tok kind;
  std::string text;  // text, name, string value, operator
  std::int64_t i = 0;
  double f = 0;
  Pos pos;
};

class Lexer {
 public:
  Lexer(std::string source, const std::string& label) : src_(std::move(source)), label_(label) {
    // As jinja2: newlines normalized to \n, and one trailing newline dropped (keep_trailing_newline=False).
    std::string normalized;
    for (std::size_t k = 0; k < src_.size(); ++k) {
      if (src_[k] == '\r') {
        normalized += '\n';
        if (k + 1 < src_.size() && src_[k + 1] == '\n') ++k;
      } else {
        normalized += src_[k];
      }
    }
    if (!normalized.empty() && normalized.back() == '\n') normalized.pop_back();
    src_ = std::move(normalized);
    line_starts_.push_back(0);
    for (std::size_t k = 0; k < src_.size(); ++k) {
      if (src_[k] == '\n') line_starts_.push_back(k + 1);
    }
  }

  std::vector<Token> run() {
    std::vector<Token> out;
    std::size_t pos = 0;
    bool strip_next = false;  // the previous tag ended with '-'
    while (pos <= src_.size()) {
      std::size_t tag = pos;
      for (;;) {
        tag = src_.find('{', tag);
        if (tag == std::string::npos || tag + 1 >= src_.size()) {
          tag = std::string::npos;
          break;
        }
        const char c = src_[tag + 1];
        if (c == '{' || c == '%' || c == '#') break;
        ++tag;
      }
      const std::size_t text_end = tag == std::string::npos ? src_.size() : tag;
      std::string text = src_.substr(pos, text_end - pos);
      const Pos text_pos = position(pos);
      if (strip_next) text.erase(0, text.find_first_not_of(" \t\n\r\f\v") == std::string::npos ? text.size() : text.find_first_not_of(" \t\n\r\f\v"));
      if (tag == std::string::npos) {
        if (!text.empty()) out.push_back(Token{Tok::text, std::move(text), 0, 0, text_pos});
        break;
      }
      const char kind = src_[tag + 1];
      const char modifier = tag + 2 < src_.size() ? src_[tag + 2] : '\0';
      if (modifier == '-') {
        const auto keep = text.find_last_not_of(" \t\n\r\f\v");
        text.resize(keep == std::string::npos ? 0 : keep + 1);
      } else if (kind != '{' && modifier != '+') {
        // lstrip_blocks: spaces and tabs from the start of the line to a block or comment tag.
        std::size_t ws = tag;
        while (ws > pos && (src_[ws - 1] == ' ' || src_[ws - 1] == '\t')) --ws;
        if (ws == 0 || src_[ws - 1] == '\n') text.resize(text.size() - std::min(text.size(), tag - ws));
      }
      if (!text.empty()) out.push_back(Token{Tok::text, std::move(text), 0, 0, text_pos});
      std::size_t at = tag + 2 + ((modifier == '-' || modifier == '+') ? 1 : 0);
      char end_modifier = '\0';
      if (kind == '#') {
        const auto end = src_.find("#}", at);
        if (end == std::string::npos) error(tag, "unclosed comment: no #}");
        end_modifier = end > at && (src_[end - 1] == '-' || src_[end - 1] == '+') ? src_[end - 1] : '\0';
        pos = end + 2;
      } else {
        const char close = kind == '{' ? '}' : '%';
        out.push_back(Token{kind == '{' ? Tok::output_begin : Tok::block_begin, "", 0, 0, position(tag)});
        int depth = 0;
        for (;;) {
          while (at < src_.size() && is_space(src_[at])) ++at;
          if (at >= src_.size()) error(tag, kind == '{' ? "unclosed tag: no }}" : "unclosed tag: no %}");
          const bool ends_here = depth == 0 && src_.compare(at, 2, std::string{close, '}'}) == 0;
          const bool ends_modified = depth == 0 && (src_[at] == '-' || src_[at] == '+') && src_.compare(at + 1, 2, std::string{close, '}'}) == 0;
          if (ends_here || ends_modified) {
            if (ends_modified) end_modifier = src_[at++];
            out.push_back(Token{kind == '{' ? Tok::output_end : Tok::block_end, "", 0, 0, position(at)});
            pos = at + 2;
            break;
          }
          out.push_back(lex_token(at, depth));
        }
      }
      // trim_blocks: the first newline after a block or comment tag goes.
      if (kind != '{' && end_modifier == '\0' && pos < src_.size() && src_[pos] == '\n') ++pos;
      strip_next = end_modifier == '-';
    }
    out.push_back(Token{Tok::eof, "", 0, 0, position(src_.size())});
    return out;
  }

  Pos position(std::size_t offset) const {
    const auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), offset);
    const auto line = static_cast<std::size_t>(it - line_starts_.begin());
    return Pos{static_cast<int>(line), static_cast<int>(offset - line_starts_[line - 1] + 1)};
  }

 private:
  static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

  [[noreturn]] void error(std::size_t offset, const std::string& what) const {
    const Pos p = position(offset);
    fail("{}:{}:{}: {}", label_, p.line, p.column, what);
  }

  Token lex_token(std::size_t& at, int& depth) {
    const std::size_t start = at;
    const Pos pos = position(at);
    const char c = src_[at];
    const auto is_name_char = [](char x) { return std::isalnum(static_cast<unsigned char>(x)) || x == '_'; };
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      while (at < src_.size() && is_name_char(src_[at])) ++at;
      return Token{Tok::name, src_.substr(start, at - start), 0, 0, pos};
    }
    if (std::isdigit(static_cast<unsigned char>(c))) return lex_number(at, pos);
    if (c == '\'' || c == '"') return lex_string(at, pos);
    static constexpr std::string_view kTwo[] = {"//", "**", "==", "!=", "<=", ">="};
    for (const auto op : kTwo) {
      if (src_.compare(at, 2, op) == 0) {
        at += 2;
        return Token{Tok::op, std::string(op), 0, 0, pos};
      }
    }
    if (std::string_view("+-*/%~<>=.,:|()[]{}").find(c) == std::string_view::npos) {
      error(at, fmt::format("unexpected character {}", printable(std::string(1, c))));
    }
    if (c == '(' || c == '[' || c == '{') {
      if (++depth > kMaxDepth) error(at, "brackets nested too deeply");
    }
    if ((c == ')' || c == ']' || c == '}') && depth > 0) --depth;
    ++at;
    return Token{Tok::op, std::string(1, c), 0, 0, pos};
  }

  Token lex_number(std::size_t& at, Pos pos) {
    const std::size_t start = at;
    const auto digits = [&] {
      while (at < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[at])) || (src_[at] == '_' && at > start))) ++at;
    };
    digits();
    bool is_float = false;
    if (at + 1 < src_.size() && src_[at] == '.' && std::isdigit(static_cast<unsigned char>(src_[at + 1]))) {
      is_float = true;
      ++at;
      digits();
    }
    if (at < src_.size() && (src_[at] == 'e' || src_[at] == 'E')) {
      std::size_t e = at + 1;
      if (e < src_.size() && (src_[e] == '+' || src_[e] == '-')) ++e;
      if (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) {
        is_float = true;
        at = e;
        digits();
      }
    }
    std::string text;
    for (std::size_t k = start; k < at; ++k) {
      if (src_[k] != '_') text += src_[k];
    }
    Token t{is_float ? Tok::floating : Tok::integer, text, 0, 0, pos};
    if (is_float) {
      const auto r = std::from_chars(text.data(), text.data() + text.size(), t.f);
      if (r.ec == std::errc::result_out_of_range) t.f = HUGE_VAL;
    } else if (std::from_chars(text.data(), text.data() + text.size(), t.i).ec != std::errc()) {
      error(start, fmt::format("integer {} is too large", text));
    }
    return t;
  }

  Token lex_string(std::size_t& at, Pos pos) {
    const std::size_t start = at;
    const char quote = src_[at++];
    std::string value;
    for (;;) {
      if (at >= src_.size()) error(start, "unterminated string");
      const char c = src_[at++];
      if (c == quote) break;
      if (c != '\\') {
        value += c;
        continue;
      }
      if (at >= src_.size()) error(start, "unterminated string");
      const char e = src_[at++];
      const auto hex = [&](int count) {
        std::uint32_t v = 0;
        for (int k = 0; k < count; ++k) {
          if (at >= src_.size() || !std::isxdigit(static_cast<unsigned char>(src_[at]))) error(at, "bad escape in string");
          const char h = src_[at++];
          v = v * 16 + static_cast<std::uint32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
        }
        // A surrogate or out-of-range code point cannot be UTF-8: U+FFFD, as a replacement on encoding.
        utf8_append(value, (v >= 0xD800 && v <= 0xDFFF) || v > 0x10FFFF ? char32_t{0xFFFD} : static_cast<char32_t>(v));
      };
      switch (e) {
        case 'n': value += '\n'; break;
        case 't': value += '\t'; break;
        case 'r': value += '\r'; break;
        case 'b': value += '\b'; break;
        case 'f': value += '\f'; break;
        case 'v': value += '\v'; break;
        case 'a': value += '\a'; break;
        case '0': value += '\0'; break;
        case '\\': value += '\\'; break;
        case '\'': value += '\''; break;
        case '"': value += '"'; break;
        case '\n': break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        default:
          value += '\\';
          value += e;
      }
    }
    return Token{Tok::string, std::move(value), 0, 0, pos};
  }

  std::string src_;
  const std::string& label_;
  std::vector<std::size_t> line_starts_;
};

// ---------------------------------------------------------------------------------------------
// The syntax tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind : std::uint8_t { literal, name, attr, item, slice, call, filter, test, negate, plus, binary, compare, and_, or_, not_, conditional, list, tuple, dict };
  Kind kind;
  Pos pos;
  Value value;                          // literal
  std::string name;                     // name, attribute, filter, test, operator
  std::vector<ExprPtr> args;            // operands; for call/filter/test the subject first
  std::vector<std::string> ops;         // compare: the operators between args
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;                 // test: `is not`
};

struct Stmt;
using Body = std::vector<Stmt>;

struct Stmt {
  enum class Kind : std::uint8_t { text, output, if_, for_, set, set_block, break_, continue_, generation };
  Kind kind;
  Pos pos;
  std::string text;                             // text
  ExprPtr expr;                                 // output, set value, for's iterable
  std::vector<std::pair<ExprPtr, Body>> branches;  // if / elif
  Body body;                                    // for, set block, generation
  Body else_body;                               // if, for
  std::vector<std::string> targets;             // for, set
  std::string attribute;                        // set ns.attribute
  ExprPtr filter;                               // for ... if filter
  bool uses_loop = true;                        // for: the body reads `loop` (else it is not made)
};

Stmt make_stmt(Stmt::Kind kind, Pos pos) {
  Stmt s;
  s.kind = kind;
  s.pos = pos;
  return s;
}

class Parser {
 public:
  Parser(std::vector<Token> tokens, const std::string& label) : t_(std::move(tokens)), label_(label) {}

  Body parse_template() {
    std::string end;
    Body body = parse_body({}, end);
    return body;
  }

 private:
  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser, Pos pos) : p(parser) {
      if (++p.depth_ > kMaxDepth) p.error(pos, "nested too deeply");
    }
    ~DepthGuard() { --p.depth_; }
  };

  [[noreturn]] void error(Pos pos, const std::string& what) const { fail("{}:{}:{}: {}", label_, pos.line, pos.column, what); }

  const Token& cur() const { return t_[at_]; }
  const Token& peek(std::size_t ahead = 1) const { return t_[std::min(at_ + ahead, t_.size() - 1)]; }
  bool is_op(std::string_view op) const { return cur().kind == Tok::op && cur().text == op; }
  bool is_name(std::string_view name) const { return cur().kind == Tok::name && cur().text == name; }
  Token next() { return at_ + 1 < t_.size() ? t_[at_++] : t_[at_]; }
  std::string describe(const Token& t) const {
    switch (t.kind) {
      case Tok::text: return "text";
      case Tok::output_begin: return "'{{'";
      case Tok::output_end: return "'}}'";
      case Tok::block_begin: return "'{%'";
      case Tok::block_end: return "'%}'";
      case Tok::eof: return "the end of the template";
      case Tok::string: return "a string";
      default: return "'" + printable(t.text) + "'";
    }
  }
  void expect_op(std::string_view op) {
    if (!is_op(op)) error(cur().pos, fmt::format("expected '{}', found {}", op, describe(cur())));
    next();
  }
  std::string expect_name() {
    if (cur().kind != Tok::name) error(cur().pos, fmt::format("expected a name, found {}", describe(cur())));
    return next().text;
  }
  void expect_block_end(std::string_view tag) {
    if (cur().kind != Tok::block_end) error(cur().pos, fmt::format("expected the end of the {} tag, found {}", tag, describe(cur())));
    next();
  }

  // Statements up to a {% tag %} named in `ends` (left unread, its name in `end`), or the end.
  Body parse_body(const std::vector<std::string_view>& ends, std::string& end, Pos open = {}, std::string_view opener = {}) {
    DepthGuard guard(*this, cur().pos);
    Body body;
    for (;;) {
      const Token& t = cur();
      if (t.kind == Tok::eof) {
        if (!ends.empty()) error(open, fmt::format("unclosed {{% {} %}}: no {{% {} %}} before the end of the template", opener, ends.back()));
        return body;
      }
      if (t.kind == Tok::text) {
        Stmt s = make_stmt(Stmt::Kind::text, t.pos);
        s.text = t.text;
        body.push_back(std::move(s));
        next();
        continue;
      }
      if (t.kind == Tok::output_begin) {
        next();
        Stmt s = make_stmt(Stmt::Kind::output, t.pos);
        s.expr = parse_tuple();
        if (cur().kind != Tok::output_end) error(cur().pos, fmt::format("expected '}}}}', found {}", describe(cur())));
        next();
        body.push_back(std::move(s));
        continue;
      }
      if (t.kind != Tok::block_begin) error(t.pos, fmt::format("unexpected {}", describe(t)));
      const Token& tag = peek();
      if (tag.kind != Tok::name) error(tag.pos, fmt::format("expected a tag name, found {}", describe(tag)));
      if (std::find(ends.begin(), ends.end(), tag.text) != ends.end()) {
        end = tag.text;
        return body;
      }
      const Pos tag_open = t.pos;
      next();
      body.push_back(parse_statement(tag_open));
    }
  }

  // The statement after `{%` (at `open`), through its end tag.
  Stmt parse_statement(Pos open) {
    const Token tag = next();
    const std::string& name = tag.text;
    if (name == "if") return parse_if(open);
    if (name == "for") return parse_for(open);
    if (name == "set") return parse_set(open);
    if (name == "break" || name == "continue") {
      if (loops_ == 0) error(tag.pos, fmt::format("{{% {} %}} outside a loop", name));
      expect_block_end(name);
      return make_stmt(name == "break" ? Stmt::Kind::break_ : Stmt::Kind::continue_, tag.pos);
    }
    if (name == "generation") {
      expect_block_end(name);
      Stmt s = make_stmt(Stmt::Kind::generation, open);
      std::string end;
      s.body = parse_body({"endgeneration"}, end, open, "generation");
      close_tag();
      return s;
    }
    static constexpr std::string_view kEnds[] = {"elif", "else", "endif", "endfor", "endset", "endgeneration", "endmacro", "endcall", "endfilter", "endraw", "endblock", "endwith"};
    if (std::find(std::begin(kEnds), std::end(kEnds), name) != std::end(kEnds)) error(tag.pos, fmt::format("unexpected {{% {} %}}", name));
    error(tag.pos, fmt::format("the {{% {} %}} tag is not supported in chat templates", printable(name)));
  }

  // Reads `{% end... %}` (or elif/else) whose name parse_body found.
  void close_tag() {
    next();  // {%
    const std::string name = next().text;
    expect_block_end(name);
  }

  Stmt parse_if(Pos pos) {
    Stmt s = make_stmt(Stmt::Kind::if_, pos);
    ExprPtr cond = parse_expression();
    expect_block_end("if");
    for (;;) {
      std::string end;
      Body body = parse_body({"elif", "else", "endif"}, end, pos, "if");
      s.branches.emplace_back(std::move(cond), std::move(body));
      next();  // {%
      next();  // the tag's name
      if (end == "elif") {
        cond = parse_expression();
        expect_block_end("elif");
        continue;
      }
      if (end == "else") {
        expect_block_end("else");
        s.else_body = parse_body({"endif"}, end, pos, "if");
        close_tag();
      } else {
        expect_block_end("endif");
      }
      return s;
    }
  }

  Stmt parse_for(Pos pos) {
    Stmt s = make_stmt(Stmt::Kind::for_, pos);
    s.targets.push_back(expect_name());
    while (is_op(",")) {
      next();
      s.targets.push_back(expect_name());
    }
    if (!is_name("in")) error(cur().pos, fmt::format("expected 'in', found {}", describe(cur())));
    next();
    s.expr = parse_expression(false);
    if (is_name("if")) {
      next();
      s.filter = parse_expression(false);
    }
    if (is_name("recursive")) error(cur().pos, "recursive loops are not supported in chat templates");
    expect_block_end("for");
    ++loops_;
    const int reads = loop_reads_;
    std::string end;
    s.body = parse_body({"else", "endfor"}, end, pos, "for");
    s.uses_loop = loop_reads_ > reads;
    --loops_;
    if (end == "else") {
      close_tag();
      s.else_body = parse_body({"endfor"}, end, pos, "for");
    }
    close_tag();
    return s;
  }

  Stmt parse_set(Pos pos) {
    Stmt s = make_stmt(Stmt::Kind::set, pos);
    s.targets.push_back(expect_name());
    if (is_op(".")) {
      next();
      s.attribute = expect_name();
    } else {
      while (is_op(",")) {
        next();
        s.targets.push_back(expect_name());
      }
    }
    if (cur().kind == Tok::block_end && s.targets.size() == 1 && s.attribute.empty()) {
      next();
      s.kind = Stmt::Kind::set_block;
      std::string end;
      s.body = parse_body({"endset"}, end, pos, "set");
      close_tag();
      return s;
    }
    expect_op("=");
    s.expr = parse_tuple();
    expect_block_end("set");
    return s;
  }

  ExprPtr node(Expr::Kind kind, Pos pos) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->pos = pos;
    return e;
  }

  // An expression, or several separated by commas: a tuple.
  ExprPtr parse_tuple() {
    const Pos pos = cur().pos;
    ExprPtr first = parse_expression();
    if (!is_op(",")) return first;
    auto t = node(Expr::Kind::tuple, pos);
    t->args.push_back(std::move(first));
    while (is_op(",")) {
      next();
      if (cur().kind == Tok::output_end || cur().kind == Tok::block_end) break;
      t->args.push_back(parse_expression());
    }
    return t;
  }

  ExprPtr parse_expression(bool with_conditional = true) {
    DepthGuard guard(*this, cur().pos);
    ExprPtr e = parse_or();
    while (with_conditional && is_name("if")) {
      const Pos pos = next().pos;
      auto c = node(Expr::Kind::conditional, pos);
      ExprPtr cond = parse_or();
      ExprPtr otherwise;
      if (is_name("else")) {
        next();
        otherwise = parse_expression();
      }
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(otherwise));
      e = std::move(c);
    }
    return e;
  }

  // A left-associative chain `operand (word operand)*` of one keyword operator.
  ExprPtr parse_chain(const char* word, Expr::Kind kind, ExprPtr (Parser::*operand)()) {
    ExprPtr e = (this->*operand)();
    while (is_name(word)) {
      auto o = node(kind, next().pos);
      o->args.push_back(std::move(e));
      o->args.push_back((this->*operand)());
      e = std::move(o);
    }
    return e;
  }

  ExprPtr parse_or() { return parse_chain("or", Expr::Kind::or_, &Parser::parse_and); }
  ExprPtr parse_and() { return parse_chain("and", Expr::Kind::and_, &Parser::parse_not); }

  ExprPtr parse_not() {
    if (is_name("not")) {
      DepthGuard guard(*this, cur().pos);
      auto n = node(Expr::Kind::not_, next().pos);
      n->args.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    const Pos pos = cur().pos;
    ExprPtr first = parse_math1();
    std::unique_ptr<Expr> c;
    for (;;) {
      std::string op;
      if (cur().kind == Tok::op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" || cur().text == ">" || cur().text == "<=" ||
                                    cur().text == ">=")) {
        op = next().text;
      } else if (is_name("in")) {
        next();
        op = "in";
      } else if (is_name("not") && peek().kind == Tok::name && peek().text == "in") {
        next();
        next();
        op = "not in";
      } else {
        break;
      }
      if (!c) {
        c = node(Expr::Kind::compare, pos);
        c->args.push_back(std::move(first));
      }
      c->ops.push_back(op);
      c->args.push_back(parse_math1());
    }
    return c ? std::move(c) : std::move(first);
  }

  ExprPtr binary(std::string op, ExprPtr left, ExprPtr right, Pos pos) {
    auto b = node(Expr::Kind::binary, pos);
    b->name = std::move(op);
    b->args.push_back(std::move(left));
    b->args.push_back(std::move(right));
    return b;
  }

  ExprPtr parse_math1() {
    ExprPtr e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token op = next();
      e = binary(op.text, std::move(e), parse_concat(), op.pos);
    }
    return e;
  }

  ExprPtr parse_concat() {
    ExprPtr e = parse_math2();
    while (is_op("~")) {
      const Token op = next();
      e = binary("~", std::move(e), parse_math2(), op.pos);
    }
    return e;
  }

  ExprPtr parse_math2() {
    ExprPtr e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token op = next();
      e = binary(op.text, std::move(e), parse_pow(), op.pos);
    }
    return e;
  }

  ExprPtr parse_pow() {
    ExprPtr e = parse_unary(true);
    while (is_op("**")) {
      const Token op = next();
      e = binary("**", std::move(e), parse_unary(true), op.pos);
    }
    return e;
  }

  // As jinja2: a sign applies before the postfix and filter operators that follow it.
  ExprPtr parse_unary(bool with_filter) {
    DepthGuard guard(*this, cur().pos);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      const Token op = next();
      e = node(op.text == "-" ? Expr::Kind::negate : Expr::Kind::plus, op.pos);
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filters(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    if (t.kind == Tok::name) {
      const Token n = next();
      auto e = node(Expr::Kind::literal, n.pos);
      if (n.text == "true" || n.text == "True") {
        e->value = Value::boolean(true);
      } else if (n.text == "false" || n.text == "False") {
        e->value = Value::boolean(false);
      } else if (n.text == "none" || n.text == "None") {
        e->value = Value::none();
      } else {
        e->kind = Expr::Kind::name;
        e->name = n.text;
        if (n.text == "loop") ++loop_reads_;
      }
      return e;
    }
    if (t.kind == Tok::string) {
      auto e = node(Expr::Kind::literal, t.pos);
      std::string s;
      while (cur().kind == Tok::string) s += next().text;  // adjacent strings join, as in Python
      e->value = Value::string(std::move(s));
      return e;
    }
    if (t.kind == Tok::integer || t.kind == Tok::floating) {
      auto e = node(Expr::Kind::literal, t.pos);
      e->value = t.kind == Tok::integer ? Value::integer(t.i) : Value::floating(t.f);
      next();
      return e;
    }
    if (is_op("(")) {
      const Pos pos = next().pos;
      if (is_op(")")) {
        next();
        return node(Expr::Kind::tuple, pos);
      }
      ExprPtr first = parse_expression();
      if (is_op(")")) {
        next();
        return first;
      }
      auto tuple = node(Expr::Kind::tuple, pos);
      tuple->args.push_back(std::move(first));
      while (is_op(",")) {
        next();
        if (is_op(")")) break;
        tuple->args.push_back(parse_expression());
      }
      expect_op(")");
      return tuple;
    }
    if (is_op("[")) {
      auto list = node(Expr::Kind::list, next().pos);
      while (!is_op("]")) {
        list->args.push_back(parse_expression());
        if (!is_op(",")) break;
        next();
      }
      expect_op("]");
      return list;
    }
    if (is_op("{")) {
      auto dict = node(Expr::Kind::dict, next().pos);
      while (!is_op("}")) {
        dict->args.push_back(parse_expression());
        expect_op(":");
        dict->args.push_back(parse_expression());
        if (!is_op(",")) break;
        next();
      }
      expect_op("}");
      return dict;
    }
    error(t.pos, fmt::format("unexpected {}", describe(t)));
  }

  ExprPtr parse_postfix(ExprPtr e) {
    for (;;) {
      if (is_op(".")) {
        const Pos pos = next().pos;
        if (cur().kind == Tok::integer) {
          auto item = node(Expr::Kind::item, pos);
          auto index = node(Expr::Kind::literal, pos);
          index->value = Value::integer(next().i);
          item->args.push_back(std::move(e));
          item->args.push_back(std::move(index));
          e = std::move(item);
          continue;
        }
        auto attr = node(Expr::Kind::attr, pos);
        attr->name = expect_name();
        attr->args.push_back(std::move(e));
        e = std::move(attr);
      } else if (is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        const Pos pos = e->pos;
        e = parse_call(std::move(e), Expr::Kind::call, "");
        e->pos = pos;
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr subject) {
    DepthGuard guard(*this, cur().pos);
    const Pos pos = next().pos;  // [
    ExprPtr parts[3];
    int colons = 0;
    if (!is_op(":")) parts[0] = parse_expression();
    while (is_op(":") && colons < 2) {
      next();
      ++colons;
      if (!is_op(":") && !is_op("]")) parts[colons] = parse_expression();
    }
    expect_op("]");
    if (colons == 0) {
      auto item = node(Expr::Kind::item, pos);
      item->args.push_back(std::move(subject));
      item->args.push_back(std::move(parts[0]));
      return item;
    }
    auto slice = node(Expr::Kind::slice, pos);
    slice->args.push_back(std::move(subject));
    for (auto& p : parts) slice->args.push_back(std::move(p));
    return slice;
  }

  // Arguments in parentheses after `subject` (the callee, or a filter's or test's input).
  ExprPtr parse_call(ExprPtr subject, Expr::Kind kind, std::string name) {
    DepthGuard guard(*this, cur().pos);
    auto call = node(kind, cur().pos);
    call->name = std::move(name);
    call->args.push_back(std::move(subject));
    if (!is_op("(")) return call;
    next();
    while (!is_op(")")) {
      if (cur().kind == Tok::name && peek().kind == Tok::op && peek().text == "=") {
        std::string key = next().text;
        next();
        call->kwargs.emplace_back(std::move(key), parse_expression());
      } else {
        if (!call->kwargs.empty()) error(cur().pos, "a positional argument after a keyword argument");
        call->args.push_back(parse_expression());
      }
      if (!is_op(",")) break;
      next();
    }
    expect_op(")");
    return call;
  }

  ExprPtr parse_filters(ExprPtr e) {
    for (;;) {
      if (is_op("|")) {
        next();
        const Pos pos = cur().pos;
        std::string name = expect_name();
        e = parse_call(std::move(e), Expr::Kind::filter, std::move(name));
        e->pos = pos;
      } else if (is_name("is")) {
        next();
        bool negated = false;
        if (is_name("not")) {
          next();
          negated = true;
        }
        const Pos pos = cur().pos;
        std::string name = expect_name();
        ExprPtr test;
        if (is_op("(")) {
          test = parse_call(std::move(e), Expr::Kind::test, std::move(name));
        } else {
          test = node(Expr::Kind::test, pos);
          test->name = std::move(name);
          test->args.push_back(std::move(e));
          const Token& a = cur();
          const bool single_argument = (a.kind == Tok::name && a.text != "else" && a.text != "or" && a.text != "and" && a.text != "if") ||
                                       a.kind == Tok::string || a.kind == Tok::integer || a.kind == Tok::floating || is_op("[") ||
                                       is_op("{");
          if (single_argument) test->args.push_back(parse_postfix(parse_primary()));
        }
        test->pos = pos;
        test->negated = negated;
        e = std::move(test);
      } else if (is_op("(")) {
        e = parse_call(std::move(e), Expr::Kind::call, "");
      } else {
        return e;
      }
    }
  }

  std::vector<Token> t_;
  std::size_t at_ = 0;
  const std::string& label_;
  int depth_ = 0;
  int loops_ = 0;
  int loop_reads_ = 0;  // `loop` names read so far
};

// ---------------------------------------------------------------------------------------------
// Rendering.

Value from_json(const nlohmann::json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null: return Value::none();
    case nlohmann::json::value_t::boolean: return Value::boolean(j.get<bool>());
    case nlohmann::json::value_t::number_integer: return Value::integer(j.get<std::int64_t>());
    case nlohmann::json::value_t::number_unsigned: {
      const auto u = j.get<std::uint64_t>();
      if (u > static_cast<std::uint64_t>(INT64_MAX)) return Value::floating(static_cast<double>(u));
      return Value::integer(static_cast<std::int64_t>(u));
    }
    case nlohmann::json::value_t::number_float: return Value::floating(j.get<double>());
    case nlohmann::json::value_t::string: return Value::string(utf8_make_valid(j.get_ref<const std::string&>()));
    case nlohmann::json::value_t::array: {
      List items;
      for (const auto& x : j) items.push_back(from_json(x));
      return Value::of_list(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      Dict items;
      for (const auto& [k, x] : j.items()) items.emplace_back(utf8_make_valid(k), from_json(x));
      return Value::of_dict(std::move(items));
    }
    default: return Value::undefined("a binary value");
  }
}

enum class Flow : std::uint8_t { normal, break_, continue_ };

class Renderer {
 public:
  Renderer(const std::string& label) : label_(label) {
    for (const char* f : {"raise_exception", "strftime_now", "namespace", "dict", "range"}) globals_.emplace_back(f, Value::function(f));
    scopes_.emplace_back();
  }

  void set(const std::string& name, Value v) { assign(name, std::move(v)); }

  std::string run(const Body& body) {
    exec(body);
    return std::move(out_);
  }

 private:
  using Scope = std::vector<std::pair<std::string, Value>>;

  [[noreturn]] void error(Pos pos, const std::string& what) const { fail("{}:{}:{}: {}", label_, pos.line, pos.column, what); }

  void step(Pos pos) {
    if (++steps_ > kMaxSteps) error(pos, fmt::format("the template ran more than {} steps (a loop that does not end?)", kMaxSteps));
  }
  void charge(Pos pos, std::uint64_t amount) {
    work_ += amount;
    if (work_ > kMaxWork) error(pos, fmt::format("the template made more than {} MiB of values", kMaxWork >> 20));
  }
  Value make_string(Pos pos, std::string s) {
    if (s.size() > kMaxString) error(pos, fmt::format("a string longer than {} MiB", kMaxString >> 20));
    charge(pos, s.size());
    return Value::string(std::move(s));
  }
  Value make_list(Pos pos, List items, bool is_tuple = false) {
    if (items.size() > kMaxList) error(pos, fmt::format("a list longer than {} items", kMaxList));
    charge(pos, items.size());
    return Value::of_list(std::move(items), is_tuple);
  }

  const Value* lookup(const std::string& name) const {
    for (auto scope = scopes_.rbegin(); scope != scopes_.rend(); ++scope) {
      for (const auto& [k, v] : *scope) {
        if (k == name) return &v;
      }
    }
    for (const auto& [k, v] : globals_) {
      if (k == name) return &v;
    }
    return nullptr;
  }
  void assign(const std::string& name, Value v) {
    for (auto& [k, x] : scopes_.back()) {
      if (k == name) {
        x = std::move(v);
        return;
      }
    }
    scopes_.back().emplace_back(name, std::move(v));
  }

  void emit(Pos pos, std::string_view text) {
    if (out_.size() + text.size() > kMaxString) error(pos, fmt::format("the output is longer than {} MiB", kMaxString >> 20));
    charge(pos, text.size());
    out_ += text;
  }

  Flow exec(const Body& body) {
    for (const Stmt& s : body) {
      const Flow f = exec(s);
      if (f != Flow::normal) return f;
    }
    return Flow::normal;
  }

  Flow exec(const Stmt& s) {
    step(s.pos);
    switch (s.kind) {
      case Stmt::Kind::text: emit(s.pos, s.text); return Flow::normal;
      case Stmt::Kind::output: emit(s.pos, to_str(eval(*s.expr))); return Flow::normal;
      case Stmt::Kind::if_:
        for (const auto& [cond, body] : s.branches) {
          if (truthy(eval(*cond))) return exec(body);
        }
        return exec(s.else_body);
      case Stmt::Kind::for_: return exec_for(s);
      case Stmt::Kind::set: {
        Value v = eval(*s.expr);
        if (!s.attribute.empty()) {
          const Value* ns = lookup(s.targets[0]);
          if (!ns || !ns->is(Kind::ns)) error(s.pos, fmt::format("cannot assign attribute on non-namespace object '{}'", s.targets[0]));
          for (auto& [k, x] : *ns->dict) {
            if (k == s.attribute) {
              x = std::move(v);
              return Flow::normal;
            }
          }
          ns->dict->emplace_back(s.attribute, std::move(v));
          return Flow::normal;
        }
        if (s.targets.size() == 1) {
          assign(s.targets[0], std::move(v));
          return Flow::normal;
        }
        const List items = unpack(s.pos, v, s.targets.size());
        for (std::size_t k = 0; k < items.size(); ++k) assign(s.targets[k], items[k]);
        return Flow::normal;
      }
      case Stmt::Kind::set_block: {
        std::string saved = std::move(out_);
        out_.clear();
        const Flow f = exec(s.body);
        std::string captured = std::move(out_);
        out_ = std::move(saved);
        assign(s.targets[0], Value::string(std::move(captured)));
        return f;
      }
      case Stmt::Kind::break_: return Flow::break_;
      case Stmt::Kind::continue_: return Flow::continue_;
      case Stmt::Kind::generation: return exec(s.body);
    }
    return Flow::normal;
  }

  List unpack(Pos pos, const Value& v, std::size_t count) {
    const List items = iterate(pos, v);
    if (items.size() != count) error(pos, fmt::format("cannot unpack {} values into {} names", items.size(), count));
    return items;
  }

  // What `for x in v` visits: a list's items, a dict's keys, a string's characters.
  List iterate(Pos pos, const Value& v) {
    switch (v.kind) {
      case Kind::undefined: return {};
      case Kind::list: return *v.list;
      case Kind::dict: {
        List keys;
        for (const auto& [k, x] : *v.dict) keys.push_back(Value::string(k));
        return keys;
      }
      case Kind::string: {
        List chars;
        for (const char32_t c : code_points(v.s)) {
          std::string one;
          utf8_append(one, c);
          chars.push_back(Value::string(std::move(one)));
        }
        charge(pos, chars.size());
        return chars;
      }
      default: error(pos, fmt::format("'{}' object is not iterable", type_name(v)));
    }
  }

  Flow exec_for(const Stmt& s) {
    List items = iterate(s.pos, eval(*s.expr));
    if (s.filter) {
      List kept;
      for (auto& item : items) {
        scopes_.emplace_back();
        bind_targets(s, item);
        if (truthy(eval(*s.filter))) kept.push_back(std::move(item));
        scopes_.pop_back();
      }
      items = std::move(kept);
    }
    if (items.empty()) return exec(s.else_body);
    const auto n = static_cast<std::int64_t>(items.size());
    for (std::int64_t k = 0; k < n; ++k) {
      step(s.pos);
      scopes_.emplace_back();  // as jinja2: what the body sets lasts one turn
      bind_targets(s, items[static_cast<std::size_t>(k)]);
      if (!s.uses_loop) {
        const Flow f = exec(s.body);
        scopes_.pop_back();
        if (f == Flow::break_) break;
        continue;
      }
      Dict loop = {{"index0", Value::integer(k)},
                   {"index", Value::integer(k + 1)},
                   {"revindex0", Value::integer(n - k - 1)},
                   {"revindex", Value::integer(n - k)},
                   {"first", Value::boolean(k == 0)},
                   {"last", Value::boolean(k == n - 1)},
                   {"length", Value::integer(n)},
                   {"depth", Value::integer(1)},
                   {"depth0", Value::integer(0)},
                   {"previtem", k > 0 ? items[static_cast<std::size_t>(k - 1)] : Value::undefined("loop.previtem")},
                   {"nextitem", k + 1 < n ? items[static_cast<std::size_t>(k + 1)] : Value::undefined("loop.nextitem")}};
      assign("loop", Value::of_dict(std::move(loop)));
      const Flow f = exec(s.body);
      scopes_.pop_back();
      if (f == Flow::break_) break;
    }
    return Flow::normal;
  }

  void bind_targets(const Stmt& s, const Value& item) {
    if (s.targets.size() == 1) {
      assign(s.targets[0], item);
      return;
    }
    const List parts = unpack(s.pos, item, s.targets.size());
    for (std::size_t k = 0; k < parts.size(); ++k) assign(s.targets[k], parts[k]);
  }

  [[noreturn]] void undefined_error(Pos pos, const Value& v) const {
    error(pos, v.s.empty() ? std::string("a value is undefined") : v.s.front() == '\'' ? v.s : fmt::format("'{}' is undefined", v.s));
  }

  Value eval(const Expr& e) {
    step(e.pos);
    if (eval_depth_ >= kMaxEvalDepth) error(e.pos, "expression nested too deeply");
    ++eval_depth_;
    struct Leave {
      int& depth;
      ~Leave() { --depth; }
    } leave{eval_depth_};
    switch (e.kind) {
      case Expr::Kind::literal: return e.value;
      case Expr::Kind::name: {
        const Value* v = lookup(e.name);
        return v ? *v : Value::undefined(e.name);
      }
      case Expr::Kind::attr: return get_attr(e.pos, eval(*e.args[0]), e.name);
      case Expr::Kind::item: return get_item(e.pos, eval(*e.args[0]), eval(*e.args[1]));
      case Expr::Kind::slice: return slice(e);
      case Expr::Kind::call: return call(e);
      case Expr::Kind::filter: return filter(e);
      case Expr::Kind::test: return Value::boolean(test(e) != e.negated);
      case Expr::Kind::negate:
      case Expr::Kind::plus: {
        const Value v = eval(*e.args[0]);
        if (v.is(Kind::undefined)) undefined_error(e.pos, v);
        if (!v.is_number()) error(e.pos, fmt::format("bad operand type for unary {}: '{}'", e.kind == Expr::Kind::negate ? '-' : '+', type_name(v)));
        if (e.kind == Expr::Kind::plus) return v.is(Kind::boolean) ? Value::integer(v.as_int()) : v;
        if (v.is(Kind::floating)) return Value::floating(-v.f);
        if (v.as_int() == INT64_MIN) error(e.pos, "integer overflow");
        return Value::integer(-v.as_int());
      }
      case Expr::Kind::binary: return binary(e.pos, e.name, eval(*e.args[0]), eval(*e.args[1]));
      case Expr::Kind::compare: {
        Value left = eval(*e.args[0]);
        for (std::size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1]);
          if (!compare(e.pos, e.ops[k], left, right)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::Kind::and_: {
        Value left = eval(*e.args[0]);
        return truthy(left) ? eval(*e.args[1]) : left;
      }
      case Expr::Kind::or_: {
        Value left = eval(*e.args[0]);
        return truthy(left) ? left : eval(*e.args[1]);
      }
      case Expr::Kind::not_: return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::Kind::conditional:
        if (truthy(eval(*e.args[0]))) return eval(*e.args[1]);
        return e.args[2] ? eval(*e.args[2]) : Value::undefined("the conditional expression's else");
      case Expr::Kind::list:
      case Expr::Kind::tuple: {
        List items;
        for (const auto& a : e.args) items.push_back(eval(*a));
        return make_list(e.pos, std::move(items), e.kind == Expr::Kind::tuple);
      }
      case Expr::Kind::dict: {
        Dict items;
        for (std::size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k]);
          if (!key.is(Kind::string)) error(e.args[k]->pos, fmt::format("dict keys must be strings here, not {}", type_name(key)));
          Value v = eval(*e.args[k + 1]);
          auto it = std::find_if(items.begin(), items.end(), [&](const auto& kv) { return kv.first == key.s; });
          if (it != items.end()) {
            it->second = std::move(v);
          } else {
            items.emplace_back(key.s, std::move(v));
          }
        }
        charge(e.pos, items.size());
        return Value::of_dict(std::move(items));
      }
    }
    return Value::undefined("");
  }

  Value get_attr(Pos pos, const Value& obj, const std::string& name) {
    if (obj.is(Kind::undefined)) undefined_error(pos, obj);
    if (obj.is(Kind::dict) || obj.is(Kind::ns)) {
      const Value* v = dict_find(*obj.dict, name);
      if (v) return *v;
    }
    return Value::undefined(fmt::format("'{} object' has no attribute '{}'", type_name(obj), printable(name)));
  }

  Value get_item(Pos pos, const Value& obj, const Value& key) {
    if (obj.is(Kind::undefined)) undefined_error(pos, obj);
    const auto missing = [&] { return Value::undefined(fmt::format("'{} object' has no attribute {}", type_name(obj), printable(to_repr(key)))); };
    if (obj.is(Kind::dict) || obj.is(Kind::ns)) {
      if (!key.is(Kind::string)) return missing();
      const Value* v = dict_find(*obj.dict, key.s);
      return v ? *v : missing();
    }
    if ((obj.is(Kind::list) || obj.is(Kind::string)) && key.is_int_like()) {
      const auto cps = obj.is(Kind::string) ? code_points(obj.s) : std::vector<char32_t>{};
      const auto size = static_cast<std::int64_t>(obj.is(Kind::list) ? obj.list->size() : cps.size());
      std::int64_t k = key.as_int();
      if (k < 0) k += size;
      if (k < 0 || k >= size) return missing();
      if (obj.is(Kind::list)) return (*obj.list)[static_cast<std::size_t>(k)];
      return Value::string(from_code_points(cps, static_cast<std::size_t>(k), static_cast<std::size_t>(k) + 1));
    }
    return missing();
  }

  std::optional<std::int64_t> slice_bound(const ExprPtr& e) {
    if (!e) return std::nullopt;
    const Value v = eval(*e);
    if (v.is(Kind::none)) return std::nullopt;
    if (!v.is_int_like()) error(e->pos, fmt::format("slice indices must be integers or None, not {}", type_name(v)));
    return v.as_int();
  }

  Value slice(const Expr& e) {
    const Value obj = eval(*e.args[0]);
    const auto start = slice_bound(e.args[1]);
    const auto stop = slice_bound(e.args[2]);
    const auto step_size = slice_bound(e.args[3]);
    if (obj.is(Kind::undefined)) undefined_error(e.pos, obj);
    if (step_size && *step_size == 0) error(e.pos, "slice step cannot be zero");
    if (obj.is(Kind::list)) {
      List items;
      for (const auto k : slice_positions(static_cast<std::int64_t>(obj.list->size()), start, stop, step_size.value_or(1))) items.push_back((*obj.list)[k]);
      return make_list(e.pos, std::move(items), obj.tuple);
    }
    if (obj.is(Kind::string)) {
      const auto cps = code_points(obj.s);
      std::string out;
      for (const auto k : slice_positions(static_cast<std::int64_t>(cps.size()), start, stop, step_size.value_or(1))) utf8_append(out, cps[k]);
      return make_string(e.pos, std::move(out));
    }
    error(e.pos, fmt::format("'{}' object is not subscriptable", type_name(obj)));
  }

  Value binary(Pos pos, const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return make_string(pos, to_str(a) + to_str(b));
    if (a.is(Kind::undefined)) undefined_error(pos, a);
    if (b.is(Kind::undefined)) undefined_error(pos, b);
    const auto unsupported = [&]() -> Value {
      error(pos, fmt::format("unsupported operand types for {}: '{}' and '{}'", op, type_name(a), type_name(b)));
    };
    if (op == "+") {
      if (a.is(Kind::string) && b.is(Kind::string)) return make_string(pos, a.s + b.s);
      if (a.is(Kind::list) && b.is(Kind::list) && a.tuple == b.tuple) {
        List items = *a.list;
        items.insert(items.end(), b.list->begin(), b.list->end());
        return make_list(pos, std::move(items), a.tuple);
      }
    }
    if (op == "*") {
      const bool a_seq = a.is(Kind::string) || a.is(Kind::list);
      const bool b_seq = b.is(Kind::string) || b.is(Kind::list);
      if ((a_seq && b.is_int_like()) || (b_seq && a.is_int_like())) {
        const Value& seq = a_seq ? a : b;
        const std::int64_t times = std::max<std::int64_t>(0, (a_seq ? b : a).as_int());
        const std::size_t unit = seq.is(Kind::string) ? seq.s.size() : seq.list->size();
        if (unit > 0 && static_cast<std::uint64_t>(times) > kMaxString / unit) error(pos, "a repeated sequence too long");
        if (seq.is(Kind::string)) {
          std::string out;
          for (std::int64_t k = 0; k < times; ++k) out += seq.s;
          return make_string(pos, std::move(out));
        }
        List items;
        for (std::int64_t k = 0; k < times; ++k) items.insert(items.end(), seq.list->begin(), seq.list->end());
        return make_list(pos, std::move(items), seq.tuple);
      }
    }
    if (!a.is_number() || !b.is_number()) return unsupported();
    const bool floats = a.is(Kind::floating) || b.is(Kind::floating) || op == "/";
    if (floats) {
      const double x = a.as_double();
      const double y = b.as_double();
      if (op == "+") return Value::floating(x + y);
      if (op == "-") return Value::floating(x - y);
      if (op == "*") return Value::floating(x * y);
      if (op == "**") return Value::floating(std::pow(x, y));
      if (y == 0) error(pos, "division by zero");
      if (op == "/") return Value::floating(x / y);
      if (op == "//") return Value::floating(std::floor(x / y));
      if (op == "%") {
        double m = std::fmod(x, y);
        if (m != 0 && ((m < 0) != (y < 0))) m += y;
        return Value::floating(m);
      }
      return unsupported();
    }
    const std::int64_t x = a.as_int();
    const std::int64_t y = b.as_int();
    std::int64_t r = 0;
    if (op == "+" || op == "-" || op == "*") {
      const bool overflow = op == "+" ? __builtin_add_overflow(x, y, &r) : op == "-" ? __builtin_sub_overflow(x, y, &r) : __builtin_mul_overflow(x, y, &r);
      if (overflow) error(pos, "integer overflow");
      return Value::integer(r);
    }
    if (op == "**") {
      if (y < 0) return Value::floating(std::pow(static_cast<double>(x), static_cast<double>(y)));
      std::int64_t result = 1;
      for (std::int64_t k = 0; k < y; ++k) {
        if (__builtin_mul_overflow(result, x, &result)) error(pos, "integer overflow");
        if (result == 0 || result == 1) break;
        if (result == -1) {
          result = (y - k - 1) % 2 == 0 ? -1 : 1;
          break;
        }
      }
      return Value::integer(result);
    }
    if (y == 0) error(pos, "integer division or modulo by zero");
    if (x == INT64_MIN && y == -1) error(pos, "integer overflow");
    std::int64_t q = x / y;
    std::int64_t m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) {
      --q;
      m += y;
    }
    if (op == "//") return Value::integer(q);
    if (op == "%") return Value::integer(m);
    return unsupported();
  }

  bool contains(Pos pos, const Value& container, const Value& item) {
    switch (container.kind) {
      case Kind::undefined: return false;
      case Kind::string:
        if (!item.is(Kind::string)) error(pos, fmt::format("'in <string>' requires string as left operand, not {}", type_name(item)));
        return container.s.find(item.s) != std::string::npos;
      case Kind::list:
        return std::any_of(container.list->begin(), container.list->end(), [&](const Value& v) { return equal(v, item); });
      case Kind::dict: return item.is(Kind::string) && dict_find(*container.dict, item.s) != nullptr;
      default: error(pos, fmt::format("argument of type '{}' is not iterable", type_name(container)));
    }
  }

  bool compare(Pos pos, const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in") return contains(pos, b, a);
    if (op == "not in") return !contains(pos, b, a);
    int order = 0;
    if (a.is_number() && b.is_number()) {
      if (a.is(Kind::floating) || b.is(Kind::floating)) {
        const double x = a.as_double();
        const double y = b.as_double();
        if (std::isnan(x) || std::isnan(y)) return false;
        order = x < y ? -1 : x > y ? 1 : 0;
      } else {
        order = a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
      }
    } else if (a.is(Kind::string) && b.is(Kind::string)) {
      order = a.s < b.s ? -1 : a.s > b.s ? 1 : 0;  // UTF-8 byte order is code point order
    } else {
      if (a.is(Kind::undefined)) undefined_error(pos, a);
      if (b.is(Kind::undefined)) undefined_error(pos, b);
      error(pos, fmt::format("'{}' not supported between instances of '{}' and '{}'", op, type_name(a), type_name(b)));
    }
    if (op == "<") return order < 0;
    if (op == ">") return order > 0;
    if (op == "<=") return order <= 0;
    return order >= 0;
  }

  // Arguments of a call, filter or test, matched to parameter names (positional first).
  struct Args {
    std::vector<Value> positional;
    std::vector<std::pair<std::string, Value>> keyword;
    std::size_t first = 0;  // positional[first] is the first argument after the subject

    const Value* get(std::size_t index, std::string_view name) const {
      if (first + index < positional.size()) return &positional[first + index];
      for (const auto& [k, v] : keyword) {
        if (k == name) return &v;
      }
      return nullptr;
    }
    const Value* keyword_only(std::string_view name) const {
      for (const auto& [k, v] : keyword) {
        if (k == name) return &v;
      }
      return nullptr;
    }
  };

  Args eval_args(const Expr& e, std::size_t first) {
    Args a;
    a.first = 0;
    for (std::size_t k = first; k < e.args.size(); ++k) a.positional.push_back(eval(*e.args[k]));
    for (const auto& [name, x] : e.kwargs) a.keyword.emplace_back(name, eval(*x));
    return a;
  }

  std::string string_arg(Pos pos, const Value* v, std::string_view what) {
    if (!v || !v->is(Kind::string)) error(pos, fmt::format("{} needs a string argument", what));
    return v->s;
  }

  Value call(const Expr& e) {
    const Expr& callee = *e.args[0];
    if (callee.kind == Expr::Kind::attr) {
      const Value obj = eval(*callee.args[0]);
      if (obj.is(Kind::string) || obj.is(Kind::dict)) {
        Args a = eval_args(e, 1);
        return method(e.pos, obj, callee.name, a);
      }
      const Value f = get_attr(callee.pos, obj, callee.name);
      if (f.is(Kind::undefined)) error(e.pos, fmt::format("'{}' object has no method '{}'", type_name(obj), printable(callee.name)));
      return call_function(e, f);
    }
    const Value f = eval(callee);
    return call_function(e, f);
  }

  Value call_function(const Expr& e, const Value& f) {
    if (f.is(Kind::undefined)) undefined_error(e.pos, f);
    if (!f.is(Kind::function)) error(e.pos, fmt::format("'{}' object is not callable", type_name(f)));
    Args a = eval_args(e, 1);
    if (f.s == "raise_exception") {
      const Value* message = a.get(0, "message");
      error(e.pos, fmt::format("the template raised an error: {}", message ? to_str(*message) : ""));
    }
    if (f.s == "strftime_now") {
      const std::string format = string_arg(e.pos, a.get(0, "format"), "strftime_now");
      const std::time_t now = std::time(nullptr);
      std::tm local{};
      localtime_r(&now, &local);
      char buf[512];
      const std::size_t n = format.size() < 128 ? std::strftime(buf, sizeof(buf), format.c_str(), &local) : 0;
      return make_string(e.pos, std::string(buf, n));
    }
    if (f.s == "namespace" || f.s == "dict") {
      Dict items;
      for (std::size_t k = 0; k < a.positional.size(); ++k) {
        if (!a.positional[k].is(Kind::dict) && !a.positional[k].is(Kind::ns)) error(e.pos, fmt::format("{}() takes a mapping and keyword arguments", f.s));
        for (const auto& kv : *a.positional[k].dict) items.push_back(kv);
      }
      for (const auto& kw : a.keyword) {
        auto it = std::find_if(items.begin(), items.end(), [&](const auto& kv) { return kv.first == kw.first; });
        if (it != items.end()) {
          it->second = kw.second;
        } else {
          items.push_back(kw);
        }
      }
      return Value::of_dict(std::move(items), f.s == "namespace" ? Kind::ns : Kind::dict);
    }
    // range(stop) or range(start, stop[, step])
    std::vector<std::int64_t> bounds;
    for (const auto& v : a.positional) {
      if (!v.is_int_like()) error(e.pos, fmt::format("range() takes integers, not {}", type_name(v)));
      bounds.push_back(v.as_int());
    }
    if (bounds.empty() || bounds.size() > 3 || !a.keyword.empty()) error(e.pos, "range() takes 1 to 3 integers");
    const std::int64_t start = bounds.size() == 1 ? 0 : bounds[0];
    const std::int64_t stop = bounds.size() == 1 ? bounds[0] : bounds[1];
    const std::int64_t by = bounds.size() == 3 ? bounds[2] : 1;
    if (by == 0) error(e.pos, "range() step must not be zero");
    List items;
    for (std::int64_t k = start; by > 0 ? k < stop : k > stop; k += by) {
      if (items.size() >= kMaxList) error(e.pos, fmt::format("range() of more than {} numbers", kMaxList));
      items.push_back(Value::integer(k));
      if ((by > 0 && k > INT64_MAX - by) || (by < 0 && k < INT64_MIN - by)) break;
    }
    return make_list(e.pos, std::move(items));
  }

  // The str and dict methods that chat templates call.
  Value method(Pos pos, const Value& obj, const std::string& name, const Args& a) {
    const auto optional_string = [&](std::size_t index, std::string_view key) -> std::optional<std::string> {
      const Value* v = a.get(index, key);
      if (!v || v->is(Kind::none)) return std::nullopt;
      if (!v->is(Kind::string)) error(pos, fmt::format("{}() needs a string argument, not {}", name, type_name(*v)));
      return v->s;
    };
    if (obj.is(Kind::dict)) {
      if (name == "items") {
        List items;
        for (const auto& [k, v] : *obj.dict) items.push_back(Value::of_list({Value::string(k), v}, true));
        return make_list(pos, std::move(items));
      }
      if (name == "keys" || name == "values") {
        List items;
        for (const auto& [k, v] : *obj.dict) items.push_back(name == "keys" ? Value::string(k) : v);
        return make_list(pos, std::move(items));
      }
      if (name == "get") {
        const Value* key = a.get(0, "key");
        if (!key) error(pos, "get() needs a key");
        const Value* fallback = a.get(1, "default");
        const Value* v = key->is(Kind::string) ? dict_find(*obj.dict, key->s) : nullptr;
        return v ? *v : fallback ? *fallback : Value::none();
      }
      error(pos, fmt::format("'dict' object has no method '{}'", printable(name)));
    }
    const std::string& s = obj.s;
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      return make_string(pos, python_strip(s, optional_string(0, "chars"), name != "rstrip", name != "lstrip"));
    }
    if (name == "upper" || name == "lower") {
      std::string out = s;
      for (char& c : out) c = static_cast<char>(name == "upper" ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
      return make_string(pos, std::move(out));
    }
    if (name == "title" || name == "capitalize") return make_string(pos, name == "title" ? title_case(s) : capitalize(s));
    if (name == "startswith" || name == "endswith") {
      const Value* prefix = a.get(0, "prefix");
      if (!prefix) error(pos, fmt::format("{}() needs an argument", name));
      List options = prefix->is(Kind::list) ? *prefix->list : List{*prefix};
      for (const auto& o : options) {
        if (!o.is(Kind::string)) error(pos, fmt::format("{}() needs strings", name));
        if (name == "startswith" ? s.starts_with(o.s) : s.ends_with(o.s)) return Value::boolean(true);
      }
      return Value::boolean(false);
    }
    if (name == "split" || name == "rsplit") {
      const auto sep = optional_string(0, "sep");
      const Value* max_value = a.get(1, "maxsplit");
      const std::int64_t max_split = max_value && max_value->is_int_like() ? max_value->as_int() : -1;
      return make_list(pos, split(pos, s, sep, max_split, name == "rsplit"));
    }
    if (name == "replace") {
      const std::string from = string_arg(pos, a.get(0, "old"), "replace()");
      const std::string to = string_arg(pos, a.get(1, "new"), "replace()");
      const Value* count_value = a.get(2, "count");
      const std::int64_t count = count_value && count_value->is_int_like() ? count_value->as_int() : -1;
      return make_string(pos, replace(pos, s, from, to, count));
    }
    if (name == "find" || name == "count") {
      const std::string needle = string_arg(pos, a.get(0, "sub"), name + "()");
      if (name == "find") {
        const auto at = s.find(needle);
        return Value::integer(at == std::string::npos ? -1 : static_cast<std::int64_t>(code_points(s.substr(0, at)).size()));
      }
      if (needle.empty()) return Value::integer(static_cast<std::int64_t>(code_points(s).size()) + 1);
      std::int64_t n = 0;
      for (auto at = s.find(needle); at != std::string::npos; at = s.find(needle, at + needle.size())) ++n;
      return Value::integer(n);
    }
    error(pos, fmt::format("'str' object has no method '{}'", printable(name)));
  }

  static std::string title_case(const std::string& s) {
    std::string out = s;
    bool after_letter = false;
    for (char& c : out) {
      const auto u = static_cast<unsigned char>(c);
      const bool letter = std::isalpha(u) != 0;
      if (letter) c = static_cast<char>(after_letter ? std::tolower(u) : std::toupper(u));
      after_letter = letter || u >= 0x80;
    }
    return out;
  }

  static std::string capitalize(const std::string& s) {
    std::string out = s;
    for (std::size_t k = 0; k < out.size(); ++k) {
      const auto u = static_cast<unsigned char>(out[k]);
      out[k] = static_cast<char>(k == 0 ? std::toupper(u) : std::tolower(u));
    }
    return out;
  }

  List split(Pos pos, const std::string& s, const std::optional<std::string>& sep, std::int64_t max_split, bool from_right) {
    List parts;
    if (sep && sep->empty()) error(pos, "empty separator");
    if (!sep) {
      // Runs of whitespace separate; leading and trailing whitespace make no empty parts.
      const auto cps = code_points(s);
      std::vector<std::pair<std::size_t, std::size_t>> words;
      for (std::size_t k = 0; k < cps.size();) {
        while (k < cps.size() && is_python_space(cps[k])) ++k;
        if (k == cps.size()) break;
        const std::size_t begin = k;
        while (k < cps.size() && !is_python_space(cps[k])) ++k;
        words.emplace_back(begin, k);
      }
      if (max_split >= 0 && static_cast<std::int64_t>(words.size()) > max_split + 1) {
        if (from_right) {
          const std::size_t keep = words.size() - static_cast<std::size_t>(max_split);
          std::size_t end = words[keep - 1].second;
          parts.push_back(Value::string(from_code_points(cps, words[0].first, end)));
          for (std::size_t k = keep; k < words.size(); ++k) parts.push_back(Value::string(from_code_points(cps, words[k].first, words[k].second)));
        } else {
          for (std::size_t k = 0; k < static_cast<std::size_t>(max_split); ++k) parts.push_back(Value::string(from_code_points(cps, words[k].first, words[k].second)));
          std::size_t begin = words[static_cast<std::size_t>(max_split)].first;
          std::size_t end = cps.size();
          while (end > begin && is_python_space(cps[end - 1])) --end;
          parts.push_back(Value::string(from_code_points(cps, begin, end)));
        }
      } else {
        for (const auto& [b, e] : words) parts.push_back(Value::string(from_code_points(cps, b, e)));
      }
      charge(pos, s.size() + parts.size());
      return parts;
    }
    std::vector<std::size_t> cuts;
    for (auto at = s.find(*sep); at != std::string::npos; at = s.find(*sep, at + sep->size())) cuts.push_back(at);
    if (max_split >= 0 && static_cast<std::int64_t>(cuts.size()) > max_split) {
      if (from_right) {
        cuts.erase(cuts.begin(), cuts.end() - max_split);
      } else {
        cuts.resize(static_cast<std::size_t>(max_split));
      }
    }
    std::size_t begin = 0;
    for (const auto at : cuts) {
      parts.push_back(Value::string(s.substr(begin, at - begin)));
      begin = at + sep->size();
    }
    parts.push_back(Value::string(s.substr(begin)));
    charge(pos, s.size() + parts.size());
    return parts;
  }

  std::string replace(Pos pos, const std::string& s, const std::string& from, const std::string& to, std::int64_t count) {
    std::string out;
    if (from.empty()) {
      // Python puts `to` between code points and at both ends.
      const auto cps = code_points(s);
      for (std::size_t k = 0; k <= cps.size(); ++k) {
        if (count < 0 || static_cast<std::int64_t>(k) < count) out += to;
        if (k < cps.size()) utf8_append(out, cps[k]);
        if (out.size() > kMaxString) error(pos, fmt::format("a string longer than {} MiB", kMaxString >> 20));
      }
      return out;
    }
    std::size_t begin = 0;
    std::int64_t done = 0;
    for (auto at = s.find(from); at != std::string::npos && (count < 0 || done < count); at = s.find(from, begin), ++done) {
      out.append(s, begin, at - begin);
      out += to;
      begin = at + from.size();
      if (out.size() > kMaxString) error(pos, fmt::format("a string longer than {} MiB", kMaxString >> 20));
    }
    out.append(s, begin);
    return out;
  }

  Value filter(const Expr& e) {
    const std::string& name = e.name;
    const Value v = eval(*e.args[0]);
    Args a = eval_args(e, 1);
    const Pos pos = e.pos;
    if (name == "trim") {
      const Value* chars = a.get(0, "chars");
      return make_string(pos, python_strip(to_str(v), chars && chars->is(Kind::string) ? std::optional<std::string>(chars->s) : std::nullopt, true, true));
    }
    if (name == "length" || name == "count") {
      switch (v.kind) {
        case Kind::undefined: return Value::integer(0);
        case Kind::string: return Value::integer(static_cast<std::int64_t>(code_points(v.s).size()));
        case Kind::list: return Value::integer(static_cast<std::int64_t>(v.list->size()));
        case Kind::dict: return Value::integer(static_cast<std::int64_t>(v.dict->size()));
        default: error(pos, fmt::format("object of type '{}' has no len()", type_name(v)));
      }
    }
    if (name == "tojson") {
      const Value* indent = a.get(0, "indent");
      int spaces = -1;
      if (indent && indent->is_int_like()) spaces = static_cast<int>(std::clamp<std::int64_t>(indent->as_int(), 0, 64));
      std::string out;
      with_context(fmt::format("{}:{}:{}", label_, pos.line, pos.column), [&] { to_json(v, spaces, 0, out); });
      return make_string(pos, std::move(out));
    }
    if (name == "string") return make_string(pos, to_str(v));
    if (name == "safe") return v;
    if (name == "lower" || name == "upper" || name == "title" || name == "capitalize") return method(pos, Value::string(to_str(v)), name, Args{});
    if (name == "replace") {
      Args shifted = a;
      return method(pos, Value::string(to_str(v)), "replace", shifted);
    }
    if (name == "first" || name == "last") {
      const List items = v.is(Kind::list) ? *v.list : iterate(pos, v);
      if (items.empty()) return Value::undefined(fmt::format("'{}' of an empty sequence", name));
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      const Value* sep = a.get(0, "d");
      const Value* attribute = a.get(1, "attribute");
      std::string out;
      bool first = true;
      for (const auto& item : iterate(pos, v)) {
        if (!first) out += sep ? to_str(*sep) : "";
        out += to_str(attribute ? get_attr(pos, item, to_str(*attribute)) : item);
        first = false;
        if (out.size() > kMaxString) error(pos, fmt::format("a string longer than {} MiB", kMaxString >> 20));
      }
      return make_string(pos, std::move(out));
    }
    if (name == "default" || name == "d") {
      const Value* fallback = a.get(0, "default_value");
      const Value* boolean = a.get(1, "boolean");
      const bool replace_falsy = boolean && truthy(*boolean);
      if (v.is(Kind::undefined) || (replace_falsy && !truthy(v))) return fallback ? *fallback : Value::string("");
      return v;
    }
    if (name == "items") {
      if (v.is(Kind::undefined)) return make_list(pos, {});
      if (!v.is(Kind::dict)) error(pos, fmt::format("items: a mapping is needed, not {}", type_name(v)));
      return method(pos, v, "items", Args{});
    }
    if (name == "list") return make_list(pos, iterate(pos, v));
    if (name == "reverse") {
      if (v.is(Kind::string)) {
        auto cps = code_points(v.s);
        std::reverse(cps.begin(), cps.end());
        return make_string(pos, from_code_points(cps, 0, cps.size()));
      }
      List items = iterate(pos, v);
      std::reverse(items.begin(), items.end());
      return make_list(pos, std::move(items));
    }
    if (name == "int" || name == "float" || name == "abs") return number_filter(pos, name, v, a);
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attribute = name.ends_with("attr");
      const bool keep_matches = name.starts_with("select");
      const std::size_t test_at = by_attribute ? 1 : 0;
      std::string attribute;
      if (by_attribute) attribute = string_arg(pos, a.get(0, "attribute"), name);
      const Value* test_name = a.get(test_at, "test");
      if (test_name && !test_name->is(Kind::string)) error(pos, fmt::format("{}: the test must be named by a string", name));
      const std::vector<Value> test_args(a.positional.begin() + static_cast<std::ptrdiff_t>(std::min(a.positional.size(), test_at + 1)), a.positional.end());
      List kept;
      for (const auto& item : iterate(pos, v)) {
        const Value subject = by_attribute ? (item.is(Kind::dict) || item.is(Kind::ns) ? get_attr(pos, item, attribute) : Value::undefined(attribute)) : item;
        const bool match = test_name ? run_test(pos, test_name->s, subject, test_args) : truthy(subject);
        if (match == keep_matches) kept.push_back(item);
      }
      return make_list(pos, std::move(kept));
    }
    if (name == "map") {
      const Value* attribute = a.keyword_only("attribute");
      List out;
      for (const auto& item : iterate(pos, v)) {
        if (attribute) {
          out.push_back(get_attr(pos, item, to_str(*attribute)));
        } else {
          error(pos, "map: only map(attribute=...) is supported");
        }
      }
      return make_list(pos, std::move(out));
    }
    error(pos, fmt::format("unknown filter '{}'", printable(name)));
  }

  Value number_filter(Pos pos, const std::string& name, const Value& v, const Args& a) {
    if (name == "abs") {
      if (v.is(Kind::floating)) return Value::floating(std::fabs(v.f));
      if (!v.is_int_like()) error(pos, fmt::format("bad operand type for abs(): '{}'", type_name(v)));
      if (v.as_int() == INT64_MIN) error(pos, "integer overflow");
      return Value::integer(std::abs(v.as_int()));
    }
    const Value* fallback = a.get(0, "default");
    double d = 0;
    bool ok = true;
    if (v.is_number()) {
      d = v.as_double();
    } else if (v.is(Kind::string)) {
      const std::string t = python_strip(v.s, std::nullopt, true, true);
      if (name == "int") {
        std::int64_t i = 0;
        const auto r = std::from_chars(t.data(), t.data() + t.size(), i);
        if (r.ec == std::errc() && r.ptr == t.data() + t.size()) return Value::integer(i);
      }
      const auto r = std::from_chars(t.data(), t.data() + t.size(), d);
      ok = r.ec == std::errc() && r.ptr == t.data() + t.size() && !t.empty();
    } else {
      ok = false;
    }
    if (name == "float") return ok ? Value::floating(d) : fallback ? *fallback : Value::floating(0);
    if (v.is_int_like()) return Value::integer(v.as_int());
    if (!ok || !std::isfinite(d) || std::fabs(d) >= 9.2e18) return fallback ? *fallback : Value::integer(0);
    return Value::integer(static_cast<std::int64_t>(d));
  }

  bool test(const Expr& e) {
    const Value v = eval(*e.args[0]);
    std::vector<Value> args;
    for (std::size_t k = 1; k < e.args.size(); ++k) args.push_back(eval(*e.args[k]));
    if (!e.kwargs.empty()) error(e.pos, fmt::format("the test '{}' takes no keyword arguments", printable(e.name)));
    return run_test(e.pos, e.name, v, args);
  }

  bool run_test(Pos pos, const std::string& name, const Value& v, const std::vector<Value>& args) {
    const auto argument = [&]() -> const Value& {
      if (args.empty()) error(pos, fmt::format("the test '{}' needs an argument", name));
      return args[0];
    };
    if (name == "defined") return !v.is(Kind::undefined);
    if (name == "undefined") return v.is(Kind::undefined);
    if (name == "none") return v.is(Kind::none);
    if (name == "string") return v.is(Kind::string);
    if (name == "number") return v.is_number();
    if (name == "integer") return v.is(Kind::integer);
    if (name == "float") return v.is(Kind::floating);
    if (name == "boolean") return v.is(Kind::boolean);
    if (name == "true") return v.is(Kind::boolean) && v.b;
    if (name == "false") return v.is(Kind::boolean) && !v.b;
    if (name == "mapping") return v.is(Kind::dict);
    if (name == "iterable") return v.is(Kind::undefined) || v.is(Kind::string) || v.is(Kind::list) || v.is(Kind::dict);
    if (name == "sequence") return v.is(Kind::undefined) || v.is(Kind::string) || v.is(Kind::list) || v.is(Kind::dict);
    if (name == "callable") return v.is(Kind::function);
    if (name == "odd" || name == "even") {
      if (!v.is_int_like()) error(pos, fmt::format("the test '{}' needs an integer", name));
      return (v.as_int() % 2 != 0) == (name == "odd");
    }
    if (name == "divisibleby") {
      const Value& d = argument();
      if (!v.is_int_like() || !d.is_int_like() || d.as_int() == 0) error(pos, "divisibleby needs integers, the divisor not 0");
      return d.as_int() == -1 || v.as_int() % d.as_int() == 0;
    }
    if (name == "equalto" || name == "eq" || name == "==") return equal(v, argument());
    if (name == "ne" || name == "!=") return !equal(v, argument());
    if (name == "lt" || name == "lessthan") return compare(pos, "<", v, argument());
    if (name == "le") return compare(pos, "<=", v, argument());
    if (name == "gt" || name == "greaterthan") return compare(pos, ">", v, argument());
    if (name == "ge") return compare(pos, ">=", v, argument());
    if (name == "in") return contains(pos, argument(), v);
    if (name == "sameas") {
      const Value& o = argument();
      if (v.kind != o.kind) return false;
      if (v.is(Kind::none) || v.is(Kind::undefined)) return true;
      if (v.is(Kind::boolean)) return v.b == o.b;
      return false;
    }
    if (name == "lower" || name == "upper") {
      if (!v.is(Kind::string)) return false;
      bool cased = false;
      for (const char c : v.s) {
        const auto u = static_cast<unsigned char>(c);
        if (std::isalpha(u)) {
          cased = true;
          if (name == "lower" ? std::isupper(u) : std::islower(u)) return false;
        }
      }
      return cased;
    }
    error(pos, fmt::format("unknown test '{}'", printable(name)));
  }

  const std::string& label_;
  std::vector<std::pair<std::string, Value>> globals_;
  std::vector<Scope> scopes_;
  std::string out_;
  std::uint64_t steps_ = 0;
  std::uint64_t work_ = 0;
  int eval_depth_ = 0;
};

}  // namespace

struct ChatTemplate::Program {
  Body body;
};

ChatTemplate::ChatTemplate(std::string_view source, std::string label) : label_(std::move(label)) {
  auto program = std::make_shared<Program>();
  Lexer lexer(utf8_make_valid(source), label_);
  Parser parser(lexer.run(), label_);
  program->body = parser.parse_template();
  program_ = std::move(program);
}

ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

void ChatTemplate::set_special_tokens(const nlohmann::json& tokens) {
  if (!tokens.is_object()) fail("{}: special tokens must be a JSON object", label_);
  for (const auto& [k, v] : tokens.items()) defaults_[k] = v;
}

std::string ChatTemplate::render(const nlohmann::json& variables) const {
  if (!variables.is_object()) fail("{}: the template's variables must be a JSON object", label_);
  Renderer r(label_);
  // As transformers' render_jinja_template: tools and documents are passed, as None.
  r.set("tools", Value::none());
  r.set("documents", Value::none());
  for (const auto& [k, v] : defaults_.items()) r.set(k, from_json(v));
  for (const auto& [k, v] : variables.items()) r.set(k, from_json(v));
  return r.run(program_->body);
}

std::string ChatTemplate::apply(const nlohmann::json& messages, bool add_generation_prompt) const {
  // As apply_chat_template: a message's keys whose value is null are dropped (templates test for absent keys).
  nlohmann::json cleaned = messages;
  if (cleaned.is_array()) {
    for (auto& m : cleaned) {
      if (!m.is_object()) continue;
      for (auto it = m.begin(); it != m.end();) it = it->is_null() ? m.erase(it) : std::next(it);
    }
  }
  return render(nlohmann::json{{"messages", std::move(cleaned)}, {"add_generation_prompt", add_generation_prompt}});
}

ChatTemplate load_chat_template(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  nlohmann::json special = nlohmann::json::object();
  std::optional<std::string> text;
  std::string label;
  const fs::path config_path = root / "tokenizer_config.json";
  if (fs::exists(config_path)) {
    const nlohmann::json config = parse_json_unique_keys(read_text_file(config_path.string()), config_path.string());
    if (!config.is_object()) fail("{}: not a JSON object", config_path.string());
    for (const char* name : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"}) {
      if (!config.contains(name)) continue;
      const auto& token = config[name];
      if (token.is_string()) {
        special[name] = token;
      } else if (token.is_object() && token.contains("content") && token["content"].is_string()) {
        special[name] = token["content"];
      }
    }
    if (config.contains("chat_template")) {
      const auto& t = config["chat_template"];
      label = config_path.string();
      if (t.is_string()) {
        text = t.get<std::string>();
      } else if (t.is_array()) {
        for (const auto& entry : t) {
          if (entry.is_object() && entry.value("name", "") == "default" && entry.contains("template") && entry["template"].is_string()) {
            text = entry["template"].get<std::string>();
          }
        }
        if (!text) fail("{}: \"chat_template\" is a list without a \"default\" template", label);
        label += " (chat_template \"default\")";
      } else if (!t.is_null()) {
        fail("{}: \"chat_template\" must be a string or a list of {{\"name\", \"template\"}}, not {}", label, json_summary(t));
      }
    }
  }
  // chat_template.jinja takes precedence over the others, as in transformers.
  const fs::path jinja_path = root / "chat_template.jinja";
  const fs::path json_path = root / "chat_template.json";
  if (fs::exists(jinja_path)) {
    text = read_text_file(jinja_path.string());
    label = jinja_path.string();
  } else if (!text && fs::exists(json_path)) {
    const nlohmann::json j = parse_json_unique_keys(read_text_file(json_path.string()), json_path.string());
    if (!j.is_object() || !j.contains("chat_template") || !j["chat_template"].is_string()) {
      fail("{}: expected an object with a string \"chat_template\"", json_path.string());
    }
    text = j["chat_template"].get<std::string>();
    label = json_path.string();
  }
  if (!text) {
    fail("{}: no chat template (looked for chat_template.jinja, tokenizer_config.json's \"chat_template\" and chat_template.json)", dir);
  }
  ChatTemplate t(*text, label);
  t.set_special_tokens(special);
  return t;
}

}  // namespace mopt::io
