// Speed of a model as it is stored (16-bit, or a quantized export on its kernels): prefill of a prompt and
// step-by-step decode with the KV cache, batch 1, median of repeated runs.
//
//   build/bench/model_bench MODEL_DIR [--prompt 512] [--gen 64] [--runs 3] [--products bf16|f32]
//
// Prints tokens/s for prefill and decode, the weight bytes, the decode
// rate in weight bytes per second (the memory traffic decode needs), and
// peak RSS.
#include <fmt/format.h>

#include "bench_util.h"
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/cpu_features.h"
#include "core/startup_settings.h"
#include "load/load_model.h"
#include "model/llama.h"

using mopt::bench::median;
using mopt::bench::seconds_since;

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);  // the libraries set up as mopt sets them
  if (argc < 2) {
    fmt::print(stderr, "usage: model_bench MODEL_DIR [--prompt N] [--gen N] [--runs N] [--products bf16|f32]\n");
    return 2;
  }
  std::int64_t prompt_len = 512, gen = 64;
  int runs = 3;
  bool bf16_products = true;
  for (int i = 2; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--prompt") == 0) prompt_len = std::atoll(argv[i + 1]);
    if (std::strcmp(argv[i], "--gen") == 0) gen = std::atoll(argv[i + 1]);
    if (std::strcmp(argv[i], "--runs") == 0) runs = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--products") == 0) bf16_products = std::strcmp(argv[i + 1], "f32") != 0;
  }
  auto m = mopt::load::load_model(argv[1]);  // a quantized export runs on its kernels
  m.set_precision(bf16_products ? mopt::kernels::Precision::bf16 : mopt::kernels::Precision::f32);
  const auto& c = m.config();
  prompt_len = std::min<std::int64_t>(prompt_len, c.max_position_embeddings - gen);
  std::mt19937 rng(1);
  std::uniform_int_distribution<std::int32_t> id(0, static_cast<std::int32_t>(c.vocab_size - 1));
  std::vector<std::int32_t> prompt(static_cast<std::size_t>(prompt_len));
  for (auto& t : prompt) t = id(rng);

  std::vector<double> prefill_s, decode_s;
  std::vector<float> logits;
  for (int r = 0; r < runs; ++r) {
    mopt::model::KvCache cache(c, 1, prompt_len + gen);
    const mopt::model::SequenceSpan first{0, prompt_len, 0, 0};
    auto t0 = std::chrono::steady_clock::now();
    m.forward(prompt, std::span(&first, 1), &cache, mopt::model::LogitsFor::last_row_of_each_sequence, logits);
    prefill_s.push_back(seconds_since(t0));
    t0 = std::chrono::steady_clock::now();
    std::int32_t next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    for (std::int64_t t = 0; t < gen; ++t) {
      const mopt::model::SequenceSpan step{0, 1, prompt_len + t, 0};
      m.forward(std::span(&next, 1), std::span(&step, 1), &cache, mopt::model::LogitsFor::last_row_of_each_sequence, logits);
      next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    decode_s.push_back(seconds_since(t0));
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double prefill_tps = static_cast<double>(prompt_len) / median(prefill_s);
  const double decode_tps = static_cast<double>(gen) / median(decode_s);
  const double weights = static_cast<double>(m.weight_bytes());
  fmt::print("model {} ({} layers, hidden {}), cpu: {}\n", argv[1], c.num_layers, c.hidden_size,
             mopt::describe(mopt::cpu_features()));
  fmt::print("weights {:.1f} MiB; peak RSS {:.1f} MiB\n", weights / (1 << 20), static_cast<double>(usage.ru_maxrss) / 1024.0);
  fmt::print("prefill {} tokens: {:.1f} tokens/s (median of {})\n", prompt_len, prefill_tps, runs);
  fmt::print("decode {} tokens, batch 1: {:.1f} tokens/s = {:.1f} GB/s of weights\n", gen, decode_tps, decode_tps * weights / 1e9);
  return 0;
}
