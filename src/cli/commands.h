// The subcommands of the mopt program. Each is thin: it parses nothing itself
// (main.cpp does) and calls into the library.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mopt::cli {

struct InspectOptions {
  std::string path;
  bool tensors = false;
  bool json = false;
};
int run_inspect(const InspectOptions& options);

struct TokenizeOptions {
  std::string tokenizer;  // tokenizer.json or a model directory
  std::string text;
  bool special = false;  // add the post-processor's special tokens (BOS, ...)
};
int run_tokenize(const TokenizeOptions& options);

struct DetokenizeOptions {
  std::string tokenizer;
  std::string ids;  // "1,2,3" or "[1, 2, 3]"
  bool skip_special = false;
};
int run_detokenize(const DetokenizeOptions& options);
struct ConvertOptions {
  std::string gguf;
  std::string out_dir;
};
int run_convert(const ConvertOptions& options);

// "1,2,3", "[1, 2, 3]" or "1 2 3" -> ids; throws Error on anything else.
std::vector<std::int32_t> parse_ids(const std::string& text);

// "mopt 0.1.0" and the CPU features this build uses.
std::string version_text();

}  // namespace mopt::cli
