// The forward pass against logits transformers computed for the same
// checkpoints (tools/fixtures/make_golden_logits.py): batched prefill of two
// sequences of different lengths, and step-by-step decode with the KV cache.
// Error measure: max |ours - theirs| / max |theirs| over all logits, <= 1e-4.
#include "model/llama.h"

#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "io/safetensors.h"
#include "kernels/linear.h"
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
  Model m = Model::load(testing::data_path("hf/" + GetParam()));
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
  Model m = Model::load(testing::data_path("hf/" + GetParam()));
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
  Model m = Model::load(testing::data_path("hf/" + GetParam()));
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
  Model m = Model::load(testing::data_path("hf/" + GetParam()));
  const auto golden = io::SafetensorsFile::open(testing::data_path("logits/" + GetParam() + ".safetensors"));
  const auto expected = golden.tensor("rope.inv_freq").to_f32();
  ASSERT_EQ(expected.size(), m.inv_freq().size());
  for (std::size_t i = 0; i < expected.size(); ++i) EXPECT_NEAR(m.inv_freq()[i], expected[i], 1e-6 * expected[i]) << i;
}

INSTANTIATE_TEST_SUITE_P(Model, GoldenLogits, ::testing::Values("llama", "mistral", "qwen2", "qwen3"));

}  // namespace
}  // namespace mopt::model

namespace mopt::model {
namespace {

// Records what decoder_layer_forward shows an observer.
struct Recorder : LayerObserver {
  struct Seen {
    std::int64_t layer;
    LinearKind kind;
    std::vector<float> x;
    std::int64_t rows, cols;
  };
  std::vector<Seen> inputs;
  std::vector<float> k, v;
  std::int64_t kv_rows = 0, kv_dim = 0;
  void linear_input(std::int64_t layer, LinearKind kind, const float* x, std::int64_t rows, std::int64_t cols) override {
    inputs.push_back({layer, kind, std::vector<float>(x, x + rows * cols), rows, cols});
  }
  void key_value(std::int64_t, const float* keys, const float* values, std::int64_t rows, std::int64_t dim) override {
    k.assign(keys, keys + rows * dim);
    v.assign(values, values + rows * dim);
    kv_rows = rows;
    kv_dim = dim;
  }
};

TEST(LayerObserver, SeesEveryLinearInputAndKeysAfterRope) {
  Model m = Model::load(testing::data_path("hf/llama"));
  const auto& c = m.config();
  const std::int64_t n = 6;
  const std::vector<std::int32_t> tokens = {5, 17, 200, 3, 99, 42};
  std::vector<float> hidden(static_cast<std::size_t>(n * c.hidden_size));
  m.embed(tokens, hidden.data());
  Recorder rec;
  Workspace ws;
  const SequenceSpan s{0, n, 0, 0};
  decoder_layer_forward(c, m.inv_freq(), 0, m.layer(0), hidden.data(), n, std::span(&s, 1), nullptr, ws, &rec);
  ASSERT_EQ(rec.inputs.size(), 7u);  // q, k, v, o, gate, up, down
  auto find = [&](LinearKind kind) -> const Recorder::Seen& {
    for (const auto& x : rec.inputs) {
      if (x.kind == kind) return x;
    }
    throw std::runtime_error("not observed");
  };
  EXPECT_EQ(find(LinearKind::q).x, find(LinearKind::k).x);  // one normalized input feeds q, k and v
  EXPECT_EQ(find(LinearKind::gate).x, find(LinearKind::up).x);
  EXPECT_NE(find(LinearKind::q).x, find(LinearKind::gate).x);  // a different norm before the MLP
  EXPECT_EQ(find(LinearKind::o).cols, c.num_heads * c.head_dim);
  EXPECT_EQ(find(LinearKind::down).cols, c.intermediate_size);
  EXPECT_EQ(find(LinearKind::down).rows, n);
  // At position 0 RoPE is the identity: the observed key row is k_proj of the input row.
  ASSERT_EQ(rec.kv_rows, n);
  ASSERT_EQ(rec.kv_dim, c.num_kv_heads * c.head_dim);
  std::vector<float> k0(static_cast<std::size_t>(rec.kv_dim));
  kernels::linear_forward(find(LinearKind::k).x.data(), 1, m.layer(0).k.weight, nullptr, k0.data());
  for (std::int64_t i = 0; i < rec.kv_dim; ++i) EXPECT_NEAR(rec.k[static_cast<std::size_t>(i)], k0[static_cast<std::size_t>(i)], 1e-5);
  // At later positions it is rotated: not equal to the projection.
  std::vector<float> k3(static_cast<std::size_t>(rec.kv_dim));
  kernels::linear_forward(find(LinearKind::k).x.data() + 3 * c.hidden_size, 1, m.layer(0).k.weight, nullptr, k3.data());
  double diff = 0;
  for (std::int64_t i = 0; i < rec.kv_dim; ++i) diff += std::fabs(rec.k[static_cast<std::size_t>(3 * rec.kv_dim + i)] - k3[static_cast<std::size_t>(i)]);
  EXPECT_GT(diff, 1e-3);
}

TEST(Model, RefusesBadBatchesAndTokens) {
  Model m = Model::load(testing::data_path("hf/llama"));
  std::vector<float> logits;
  const std::vector<std::int32_t> tokens = {1, 2, 3};
  const SequenceSpan wrong{0, 2, 0, 0};
  EXPECT_THROW(m.forward(tokens, std::span(&wrong, 1), nullptr, LogitsFor::all_rows, logits), Error);
  const std::vector<std::int32_t> outside = {1, 999};
  const SequenceSpan two{0, 2, 0, 0};
  EXPECT_THROW(m.forward(outside, std::span(&two, 1), nullptr, LogitsFor::all_rows, logits), Error);
  KvCache small(m.config(), 1, 2);
  const SequenceSpan three{0, 3, 0, 0};
  EXPECT_THROW(m.forward(tokens, std::span(&three, 1), &small, LogitsFor::all_rows, logits), Error);
  EXPECT_THROW(m.require_tokenizer(), Error);  // the fixture has no tokenizer.json
}

}  // namespace
}  // namespace mopt::model
