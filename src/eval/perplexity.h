// Perplexity and KL divergence over a token stream, with Hugging Face's
// sliding-window procedure: windows of `ctx` tokens starting every `stride`
// tokens; each window scores only the tokens the previous windows did not
// (the first token of the stream is never scored: nothing predicts it).
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "model/llama.h"

namespace mopt::eval {

struct Window {
  std::int64_t begin, end;  // tokens [begin, end) go into the model
  std::int64_t first_scored;  // positions [first_scored, end) are scored
};
// The windows of a stream of n tokens.
std::vector<Window> sliding_windows(std::int64_t n, std::int64_t ctx, std::int64_t stride);

struct TokenNll {
  std::int64_t position;  // of the predicted token in the stream
  double nll;
};

struct PerplexityResult {
  double nll_sum = 0;             // natural-log negative likelihood, summed in f64
  std::int64_t scored_tokens = 0;
  std::int64_t total_tokens = 0;
  double perplexity = 0;
  double seconds = 0;
  double tokens_per_second = 0;   // tokens through the model (windows overlap when stride < ctx)
  std::vector<TokenNll> token_nll;  // every scored token, in stream order (for paired comparisons of two runs)
};

using ProgressFn = std::function<void(std::size_t done, std::size_t total)>;

// How windows go through the model: whole (prefill: many rows per Linear, as
// training and evaluation do), or one token at a time through the KV cache
// (decode: the path generation takes, with its own kernels).
enum class WindowRun { prefill, decode };

PerplexityResult perplexity(model::Model& model, std::span<const std::int32_t> tokens, std::int64_t ctx,
                            std::int64_t stride, const ProgressFn& progress = {}, WindowRun run = WindowRun::prefill);

struct KldResult {
  PerplexityResult base, model;
  double mean_kld = 0;
  double median_kld = 0, p90_kld = 0, p95_kld = 0, p99_kld = 0, p999_kld = 0, max_kld = 0;
  double top1_agreement = 0;  // fraction of scored positions whose argmax agrees
  std::int64_t positions = 0;
  // The standard error of mean_kld, and the per-token difference of the two NLLs (model - base): its
  // mean is ln(ppl(model) / ppl(base)) exactly, its standard error the paired one (tokens taken as
  // independent draws, as llama.cpp's perplexity tool takes them) that says whether two models' ppl
  // differ by more than the text's noise.
  double kld_stderr = 0;
  double mean_dnll = 0, dnll_stderr = 0;
};

// KL(base || model) per scored position, and both perplexities.
KldResult kl_divergence(model::Model& model, model::Model& base, std::span<const std::int32_t> tokens,
                        std::int64_t ctx, std::int64_t stride, const ProgressFn& progress = {});

// log-softmax of one row of logits, in f64: out[i] = logit[i] - logsumexp(logits).
void log_softmax(const float* logits, std::int64_t n, std::vector<double>& out);

}  // namespace mopt::eval
