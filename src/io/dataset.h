// Text datasets for calibration: a plain text file is one document; a .jsonl
// file holds one JSON object per line whose "text" field is a document.
#pragma once

#include <string>
#include <vector>

namespace mopt::io {

// Throws Error naming the file (and line, for JSONL) on a missing file,
// malformed JSON, a record without a string "text", or no text at all.
std::vector<std::string> read_documents(const std::string& path);

}  // namespace mopt::io
