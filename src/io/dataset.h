// Text datasets for calibration: a plain text file is one document; a .jsonl
// file holds one JSON object per line whose "text" field is a document, or a supervised example
// {"prompt", "response"} whose two parts together are one.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mopt::io {

// Throws Error naming the file (and line, for JSONL) on a missing file,
// malformed JSON, a record with neither a string "text" nor string "prompt" and "response", or no
// text at all.
std::vector<std::string> read_documents(const std::string& path);

// record(object, "PATH:LINE") for every non-blank line of JSONL text read from `path`; a line that is
// not valid JSON (or repeats a key) throws Error naming the file and line.
void for_each_jsonl_record(const std::string& text, const std::string& path,
                           const std::function<void(const nlohmann::json& record, const std::string& label)>& record);

}  // namespace mopt::io
