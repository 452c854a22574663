// Text generation with a KV cache: greedy or temperature / top-p sampling,
// streaming each piece of text as soon as it is complete UTF-8.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "model/llama.h"

namespace mopt::eval {

struct GenerateOptions {
  std::int64_t max_tokens = 128;
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;
  std::uint64_t seed = 0;
  bool stop_at_eos = true;
};

struct GenerateStats {
  std::int64_t prompt_tokens = 0;
  std::int64_t generated_tokens = 0;
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

// Picks the next token from logits [vocab]: argmax when temperature is 0, else
// a draw from the smallest set of most likely tokens whose probability reaches top_p.
std::int32_t sample_token(const float* logits, std::int64_t vocab, float temperature, float top_p, std::uint64_t& rng_state);

std::vector<std::int32_t> generate(model::Model& model, std::span<const std::int32_t> prompt, const GenerateOptions& options,
                                   const std::function<void(std::string_view)>& on_text, GenerateStats* stats = nullptr);

}  // namespace mopt::eval
