// Small helpers around nlohmann::json for parsing untrusted files.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace mopt::io {

// Parses `text` as JSON; an object with the same key twice is an error (which
// one would win is undefined by the format). Errors say `what` and where.
nlohmann::json parse_json_unique_keys(std::string_view text, std::string_view what);

// "a string", "an array of 3", "the number -1", ... for error messages.
std::string json_summary(const nlohmann::json& value);

// `text` with control characters escaped as \xNN, so messages stay one line.
std::string printable(std::string_view text);

// Reads a whole file; throws Error naming it.
std::string read_text_file(const std::string& path);

}  // namespace mopt::io
