// eval::sequence_loss: the loss training validates with, on any loaded model — the same number as
// TrainableModel::loss on the same examples (f32 products), and packed batches change nothing.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "eval/loss.h"
#include "io/checkpoint.h"
#include "model/llama.h"
#include "support/temp_dir.h"
#include "train/model.h"

namespace mopt::eval {
namespace {

TEST(SequenceLoss, EqualsTheTrainingLossAndItsStandardError) {
  const std::string dir = testing::data_path("hf/llama");
  auto m = model::Model::load(dir);
  m.set_precision(kernels::Precision::f32);
  std::vector<ScoredSequence> seqs;
  train::Batch batch;
  std::uint64_t state = 7;
  for (int s = 0; s < 5; ++s) {
    ScoredSequence q;
    const int n = 20 + 13 * s;
    for (int i = 0; i < n; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      q.tokens.push_back(static_cast<std::int32_t>((state >> 33) % 256));
    }
    for (int i = 0; i < n; ++i) q.targets.push_back(i + 1 < n && i >= n / 3 ? q.tokens[static_cast<std::size_t>(i + 1)] : -1);
    batch.bounds.push_back(static_cast<std::int64_t>(batch.tokens.size()));
    batch.tokens.insert(batch.tokens.end(), q.tokens.begin(), q.tokens.end());
    batch.targets.insert(batch.targets.end(), q.targets.begin(), q.targets.end());
    seqs.push_back(std::move(q));
  }
  batch.bounds.push_back(static_cast<std::int64_t>(batch.tokens.size()));
  const LossResult r = sequence_loss(m, seqs);
  auto trainable = train::TrainableModel::from_checkpoint(io::Checkpoint::open(dir), false);
  const train::LossResult t = trainable.loss(batch);
  ASSERT_EQ(r.scored_tokens, t.targets);
  EXPECT_NEAR(r.mean, t.loss_sum / static_cast<double>(t.targets), 1e-5);
  const double n = static_cast<double>(t.targets), mean = t.loss_sum / n;
  EXPECT_NEAR(r.stderr_, std::sqrt((t.cross_entropy_squares / n - mean * mean) / (n - 1)), 1e-5);
  EXPECT_GT(r.stderr_, 0.0);
  // One sequence at a time gives the same per-token losses.
  for (std::size_t s = 0, k = 0; s < seqs.size(); ++s) {
    const LossResult one = sequence_loss(m, {seqs[s]});
    for (const double l : one.token_nll) EXPECT_NEAR(l, r.token_nll[k++], 1e-6);
  }
  seqs[0].targets[5] = 300;
  EXPECT_THROW(sequence_loss(m, seqs), Error);
}

}  // namespace
}  // namespace mopt::eval
