// The loss of a model on scored sequences: supervised examples whose targets mark the tokens to
// predict (a prompt/response pair's response and EOS), the validation loss training reports,
// measured on any model mopt loads (quantized kernels, GGUF) so that a checkpoint written by
// quantize or train --qat is scored as the training scored it.
#pragma once

#include <cstdint>
#include <vector>

#include "eval/perplexity.h"
#include "model/llama.h"

namespace mopt::eval {

struct ScoredSequence {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;  // targets[i]: the token tokens[i] predicts, or < 0 (not scored)
};

struct LossResult {
  double mean = 0;      // mean cross-entropy over the scored tokens (nats)
  double stderr_ = 0;   // its standard error over tokens
  std::int64_t scored_tokens = 0;
  std::int64_t sequences = 0;
  double seconds = 0;
  std::vector<double> token_nll;  // every scored token's, in order (for paired comparisons)
};

// Each sequence runs from position 0 (several packed into one forward pass); a target outside the
// vocabulary is an error naming the sequence.
LossResult sequence_loss(model::Model& model, const std::vector<ScoredSequence>& sequences, const ProgressFn& progress = {});

}  // namespace mopt::eval
