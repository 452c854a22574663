// The forward pass against logits transformers computed for the same
// checkpoints (tools/fixtures/make_golden_logits.py): batched prefill of two
// sequences of different lengths, and step-by-step decode with the KV cache.
// Error measure: max |ours - theirs| / max |theirs| over all logits, <= 1e-4.
#include "model/llama.h"

#include <gtest/gtest.h>

#include <cmath>

#include "io/safetensors.h"
#include "support/temp_dir.h"

namespace mopt::model {
namespace {

std::vector<std::int32_t> ids_of(const io::SafetensorsFile& f, const std::string& name) {
  const Tensor t = f.tensor(name);
  std::vector<std::int32_t> ids;
  for (std::uint64_t i = 0; i < t.numel(); ++i) ids.push_back(static_cast<std::int32_t>(t.data<std::int64_t>()[i]));
  return ids;
}

double relative_error(const float* ours, const std::vector<float>& theirs) {
  double max_diff = 0, max_ref = 0;
  for (std::size_t i = 0; i < theirs.size(); ++i) {
    max_diff = std::max(max_diff, static_cast<double>(std::fabs(ours[i] - theirs[i])));
    max_ref = std::max(max_ref, static_cast<double>(std::fabs(theirs[i])));
  }
  return max_diff / max_ref;
}

class GoldenLogits : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenLogits, BatchedPrefillMatchesTransformers) {
  const Model m = Model::load(testing::data_path("hf/" + GetParam()));
  const auto golden = io::SafetensorsFile::open(testing::data_path("logits/" + GetParam() + ".safetensors"));
  const auto a = ids_of(golden, "a.input_ids");
  const auto b = ids_of(golden, "b.input_ids");
  std::vector<std::int32_t> packed = a;
  packed.insert(packed.end(), b.begin(), b.end());
  const std::vector<SequenceSpan> batch = {{0, static_cast<std::int64_t>(a.size()), 0, 0},
                                           {static_cast<std::int64_t>(a.size()), static_cast<std::int64_t>(b.size()), 0, 1}};
  std::vector<float> logits;
  m.forward(packed, batch, nullptr, LogitsFor::all_rows, logits);
  const std::int64_t vocab = m.config().vocab_size;
  EXPECT_LE(relative_error(logits.data(), golden.tensor("a.prefill_logits").to_f32()), 1e-4) << "sequence a";
  EXPECT_LE(relative_error(logits.data() + a.size() * vocab, golden.tensor("b.prefill_logits").to_f32()), 1e-4) << "sequence b";

  // The same through a KV cache (two slots), and only the last rows.
  KvCache cache(m.config(), 2, 128);
  std::vector<float> last;
  m.forward(packed, batch, &cache, LogitsFor::last_row_of_each_sequence, last);
  EXPECT_LE(relative_error(last.data(), std::vector<float>(logits.begin() + static_cast<std::ptrdiff_t>((a.size() - 1) * vocab),
                                                           logits.begin() + static_cast<std::ptrdiff_t>(a.size() * vocab))),
            1e-6);
}

TEST_P(GoldenLogits, DecodeWithKvCacheMatchesTransformers) {
  const Model m = Model::load(testing::data_path("hf/" + GetParam()));
  const auto golden = io::SafetensorsFile::open(testing::data_path("logits/" + GetParam() + ".safetensors"));
  const auto a = ids_of(golden, "a.input_ids");
  const auto expected = golden.tensor("a.decode_logits").to_f32();
  const std::int64_t vocab = m.config().vocab_size;
  KvCache cache(m.config(), 1, static_cast<std::int64_t>(a.size()));
  std::vector<float> logits, all;
  const SequenceSpan prefill{0, 8, 0, 0};
  m.forward(std::span(a.data(), 8), std::span(&prefill, 1), &cache, LogitsFor::all_rows, logits);
  all = logits;
  for (std::size_t t = 8; t < a.size(); ++t) {
    const SequenceSpan step{0, 1, static_cast<std::int64_t>(t), 0};
    m.forward(std::span(a.data() + t, 1), std::span(&step, 1), &cache, LogitsFor::last_row_of_each_sequence, logits);
    all.insert(all.end(), logits.begin(), logits.end());
  }
  ASSERT_EQ(all.size(), a.size() * static_cast<std::size_t>(vocab));
  EXPECT_LE(relative_error(all.data(), expected), 1e-4);
}

TEST_P(GoldenLogits, HiddenStatesAfterEachLayer) {
  const Model m = Model::load(testing::data_path("hf/" + GetParam()));
  const auto golden = io::SafetensorsFile::open(testing::data_path("logits/" + GetParam() + ".safetensors"));
  const auto b = ids_of(golden, "b.input_ids");
  const auto expected = golden.tensor("b.hidden_states").to_f32();
  const std::int64_t H = m.config().hidden_size;
  const auto n = static_cast<std::int64_t>(b.size());
  std::vector<float> hidden(static_cast<std::size_t>(n * H));
  m.embed(b, hidden.data());
  EXPECT_LE(relative_error(hidden.data(), std::vector<float>(expected.begin(), expected.begin() + n * H)), 1e-6) << "embeddings";
  Workspace ws;
  const SequenceSpan s{0, n, 0, 0};
  for (std::int64_t l = 0; l < m.num_layers(); ++l) {
    decoder_layer_forward(m.config(), m.inv_freq(), l, m.layer(l), hidden.data(), n, std::span(&s, 1), nullptr, ws);
    const auto begin = expected.begin() + (l + 1) * n * H;
    EXPECT_LE(relative_error(hidden.data(), std::vector<float>(begin, begin + n * H)), 1e-4) << "after layer " << l;
  }
}

TEST_P(GoldenLogits, RopeFrequenciesMatchTransformers) {
  const Model m = Model::load(testing::data_path("hf/" + GetParam()));
  const auto golden = io::SafetensorsFile::open(testing::data_path("logits/" + GetParam() + ".safetensors"));
  const auto expected = golden.tensor("rope.inv_freq").to_f32();
  ASSERT_EQ(expected.size(), m.inv_freq().size());
  for (std::size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(m.inv_freq()[i], expected[i], 1e-6 * expected[i]) << i;
}

INSTANTIATE_TEST_SUITE_P(Model, GoldenLogits, ::testing::Values("llama", "mistral", "qwen2", "qwen3"));

}  // namespace
}  // namespace mopt::model
