// Tokenizer speed: load time of tokenizer.json and encode throughput on
// English text, one thread, median of repeated runs. The first encode of each
// run starts with an empty word cache (a fresh tokenizer), so the figure
// includes cache misses as a real first pass over a corpus does.
//
//   build/bench/tokenizer_bench TOKENIZER_JSON_OR_DIR [TEXT_FILE...]
//
// Without text files it reads the license texts every Debian system carries
// (/usr/share/common-licenses), about 200 KB of English.
#include <fmt/format.h>

#include "bench_util.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <vector>

#include "io/json_util.h"
#include "io/tokenizer.h"

using mopt::bench::median;
using mopt::bench::seconds_since;

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: tokenizer_bench TOKENIZER [TEXT_FILE...]\n");
    return 2;
  }
  std::string text;
  if (argc > 2) {
    for (int i = 2; i < argc; ++i) text += mopt::io::read_text_file(argv[i]);
  } else {
    for (const auto& e : std::filesystem::directory_iterator("/usr/share/common-licenses")) {
      if (e.is_regular_file()) text += mopt::io::read_text_file(e.path().string()) + "\n";
    }
  }
  constexpr int kRuns = 5;
  std::vector<double> load_s, encode_s;
  std::size_t tokens = 0;
  for (int run = 0; run < kRuns; ++run) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto tok = mopt::io::Tokenizer::load(argv[1]);
    load_s.push_back(seconds_since(t0));
    const auto t1 = std::chrono::steady_clock::now();
    tokens = tok.encode(text).size();
    encode_s.push_back(seconds_since(t1));
  }
  const double mb = static_cast<double>(text.size()) / 1e6;
  fmt::print("tokenizer {}\n", argv[1]);
  fmt::print("load:   median {:.3f} s over {} runs\n", median(load_s), kRuns);
  fmt::print("encode: {:.3f} MB -> {} tokens, median {:.3f} s = {:.2f} MB/s ({:.0f} tokens/s), one thread\n", mb, tokens,
             median(encode_s), mb / median(encode_s), static_cast<double>(tokens) / median(encode_s));
  return 0;
}
