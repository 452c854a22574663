#include "io/dataset.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_util.h"

namespace mopt::io {

std::vector<std::string> read_documents(const std::string& path) {
  const std::string text = read_text_file(path);
  std::vector<std::string> docs;
  const bool jsonl = path.size() >= 6 && path.substr(path.size() - 6) == ".jsonl";
  if (!jsonl) {
    if (text.find_first_not_of(" \t\r\n") == std::string::npos) fail("{}: no text", path);
    docs.push_back(text);
    return docs;
  }
  for_each_jsonl_record(text, path, [&](const nlohmann::json& j, const std::string& label) {
    std::string doc;
    if (j.is_object() && j.contains("text") && j["text"].is_string()) {
      doc = j["text"].get<std::string>();
    } else if (j.is_object() && j.contains("prompt") && j["prompt"].is_string() && j.contains("response") && j["response"].is_string()) {
      doc = j["prompt"].get<std::string>() + j["response"].get<std::string>();  // a supervised example, whole
    } else {
      fail("{}: a record needs a string \"text\" field, or string \"prompt\" and \"response\" fields", label);
    }
    if (!doc.empty()) docs.push_back(std::move(doc));
  });
  if (docs.empty()) fail("{}: no text", path);
  return docs;
}

void for_each_jsonl_record(const std::string& text, const std::string& path,
                           const std::function<void(const nlohmann::json& record, const std::string& label)>& record) {
  std::size_t start = 0;
  std::int64_t line_no = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    ++line_no;
    const std::string_view line(text.data() + start, end - start);
    start = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string label = path + ":" + std::to_string(line_no);
    record(parse_json_unique_keys(line, label), label);
  }
}

}  // namespace mopt::io
