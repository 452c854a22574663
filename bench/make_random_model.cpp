// Writes a Llama checkpoint with random bf16 weights (N(0, 0.02), unit norms)
// and the bundled model's tokenizer: the same layer shape at any depth, for
// showing that quantization memory does not grow with the number of layers.
// (`mopt create-random` writes real models' shapes; this takes any sizes.)
//
//   build/bench/make_random_model OUT_DIR --layers 8 [--hidden 1024] [--intermediate 2816]
//                                 [--heads 16] [--kv-heads 8] [--tokenizer models/tiny-kjv]
#include <fmt/format.h>

#include <cstdlib>
#include <string>

#include "export/random_checkpoint.h"
#include "io/tokenizer.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    fmt::print(stderr, "usage: make_random_model OUT_DIR --layers N [--hidden H] [--intermediate I] [--heads A] [--kv-heads K] [--tokenizer DIR]\n");
    return 2;
  }
  const std::string out = argv[1];
  std::int64_t layers = 8, hidden = 1024, inter = 2816, heads = 16, kv_heads = 8;
  std::string tokenizer_dir = "models/tiny-kjv";
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--layers") layers = std::atoll(argv[i + 1]);
    else if (k == "--hidden") hidden = std::atoll(argv[i + 1]);
    else if (k == "--intermediate") inter = std::atoll(argv[i + 1]);
    else if (k == "--heads") heads = std::atoll(argv[i + 1]);
    else if (k == "--kv-heads") kv_heads = std::atoll(argv[i + 1]);
    else if (k == "--tokenizer") tokenizer_dir = argv[i + 1];
  }
  try {
    const auto vocab = mopt::io::Tokenizer::load(tokenizer_dir).vocab_size();
    const auto shape = mopt::exporter::llama_shape("random", hidden, inter, layers, heads, kv_heads, vocab);
    mopt::exporter::write_random_checkpoint(shape, out, {42, tokenizer_dir});
    fmt::print("{}: {} layers, hidden {}, intermediate {}\n", out, layers, hidden, inter);
  } catch (const std::exception& e) {
    fmt::print(stderr, "make_random_model: {}\n", e.what());
    return 1;
  }
  return 0;
}
