// A quantized export run by the quantized kernels computes what its fake
// quantization (the definition) computes: the same perplexity within 0.5%,
// through prefill and through decode with the KV cache; and the benchmark
// built on both.
#include <gtest/gtest.h>

#include <algorithm>

#include <cmath>

#include "eval/bench.h"
#include "eval/perplexity.h"
#include "load/load_model.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::load {
namespace {

using testing::heldout;
using testing::quantize;
using testing::TempDir;

TEST(QuantizedRun, KernelsComputeWhatFakeQuantizationDefines) {
  struct Case {
    const char* format;
    const char* kv;
  };
  // (INT8 weight-only, FP8 per channel and block, MXFP8 share these kernels; qlinear_test covers every type.)
  const Case cases[] = {{"int4_rtn", nullptr}, {"w4a8_awq", nullptr}, {"int8", nullptr},
                        {"fp8", "fp8"},        {"nvfp4", nullptr},    {"mxfp4", nullptr}};
  const std::vector<std::int32_t> tokens(heldout().begin(), heldout().begin() + 256);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.format);
    TempDir tmp;
    quantize(c.format, "max", tmp.file("q"), false, c.kv ? std::optional<std::string>(c.kv) : std::nullopt);
    model::Model kernels = load_model(tmp.file("q"), QuantizedRun::kernels);
    model::Model fake = load_model(tmp.file("q"), QuantizedRun::fake_quant);
    ASSERT_TRUE(kernels.layer(0).q.quantized);
    ASSERT_FALSE(fake.layer(0).q.quantized);
    EXPECT_LT(kernels.resident_weight_bytes(), fake.resident_weight_bytes());
    EXPECT_EQ(kernels.new_cache(1, 4).element() == kernels::KvElement::e4m3, c.kv != nullptr);
    const double definition = eval::perplexity(fake, tokens, 128, 128).perplexity;
    for (const auto run : {eval::WindowRun::prefill, eval::WindowRun::decode}) {
      const double ppl = eval::perplexity(kernels, tokens, 128, 128, {}, run).perplexity;
      EXPECT_NEAR(ppl / definition, 1.0, 0.005) << (run == eval::WindowRun::decode ? "decode" : "prefill") << " " << ppl << " vs " << definition;
    }
  }
}

TEST(Perplexity, DecodeThroughTheCacheEqualsPrefill) {
  model::Model m = model::Model::load(testing::two_layer_tiny_kjv());
  const std::vector<std::int32_t> tokens(heldout().begin(), heldout().begin() + 300);
  const double a = eval::perplexity(m, tokens, 128, 64).perplexity;
  const double b = eval::perplexity(m, tokens, 128, 64, {}, eval::WindowRun::decode).perplexity;
  EXPECT_NEAR(a, b, 1e-4 * a);
}

TEST(Bench, ReportsEveryModelAndBatchAgainstTheBaseline) {
  TempDir tmp;
  quantize("int8", "max", tmp.file("q"));
  model::Model base = load_model(testing::two_layer_tiny_kjv());
  base.set_kv_element(kernels::KvElement::bf16);
  model::Model q = load_model(tmp.file("q"));
  q.set_kv_element(kernels::KvElement::bf16);
  // The same model again under a 2:4 label: paired with its dense twin ("int8") by the format.
  // (and the baseline under a 2:4 label: its twin is the baseline, labelled as `mopt bench` labels it).
  const std::vector<eval::BenchModel> models = {
      {"base", "bf16 (baseline)", &base, {}}, {"q", "int8", &q, {11, 22}}, {"q24", "int8 2:4", &q, {}}, {"b24", "bf16 2:4", &base, {}}};
  eval::BenchOptions o;
  o.batches = {1, 5};
  o.prompt = 12;
  o.gen = 3;
  o.rounds = 1;
  std::size_t calls = 0;
  const auto r = eval::run_benchmark(models, o, [&](const std::string&, std::size_t, std::size_t) { ++calls; });
  EXPECT_EQ(calls, 9u);  // eight runs and the end
  EXPECT_GT(r.bandwidth_bytes_per_s, 1e8);
  ASSERT_EQ(r.rows.size(), 8u);
  for (const auto& row : r.rows) {
    SCOPED_TRACE(row.format + " batch " + std::to_string(row.batch));
    EXPECT_GT(row.prefill_tokens_per_s, 0.0);
    EXPECT_GT(row.decode_tokens_per_s, 0.0);
    EXPECT_GT(row.roofline_fraction, 0.0);
    EXPECT_TRUE(std::isfinite(row.roofline_fraction));
    model::Model& m = row.name == "base" || row.name == "b24" ? base : q;
    EXPECT_EQ(row.weight_bytes, m.resident_weight_bytes());
    EXPECT_EQ(row.kv_cache_bytes, static_cast<std::uint64_t>(2 * 2 * row.batch * 15 * 4 * 32 * 2));  // layers, k/v, tokens, kv dim (4 heads of 32), bf16
    // Untied embeddings: only `batch` rows of the table are read per step.
    const auto& c = m.config();
    const double context = 12 + 2.0;
    const std::uint64_t expect = m.resident_weight_bytes() - m.embedding_bytes() +
                                 m.embedding_bytes() / static_cast<std::uint64_t>(c.vocab_size) * static_cast<std::uint64_t>(row.batch) +
                                 static_cast<std::uint64_t>(static_cast<double>(row.batch) * context * 2 * 2 * 128 * 2);
    EXPECT_EQ(row.decode_step_bytes, expect);
    if (row.name == "q24" || row.name == "b24") {
      const std::string dense = row.name == "q24" ? "q" : "base";
      const auto twin = std::find_if(r.rows.begin(), r.rows.end(), [&](const eval::BenchRow& d) { return d.name == dense && d.batch == row.batch; });
      ASSERT_NE(twin, r.rows.end());
      EXPECT_EQ(row.twin_format, row.name == "q24" ? "int8" : "bf16");
      EXPECT_DOUBLE_EQ(row.twin_decode_speedup, row.decode_tokens_per_s / twin->decode_tokens_per_s);
      EXPECT_DOUBLE_EQ(row.twin_prefill_speedup, row.prefill_tokens_per_s / twin->prefill_tokens_per_s);
      continue;
    }
    EXPECT_TRUE(row.twin_format.empty());
    EXPECT_EQ(row.twin_decode_speedup, 0.0);
    if (row.name == "base") {
      EXPECT_EQ(row.decode_speedup, 1.0);
      EXPECT_EQ(row.memory_saving, 1.0);
      EXPECT_EQ(row.peak_rss_bytes, 0u);
    } else {
      EXPECT_DOUBLE_EQ(row.memory_saving, static_cast<double>(base.resident_weight_bytes()) / static_cast<double>(q.resident_weight_bytes()));
      EXPECT_GT(row.memory_saving, 1.2);  // two layers: the 16-bit embeddings and head are most of it
      EXPECT_EQ(row.peak_rss_bytes, row.batch == 1 ? 11u : 22u);
      EXPECT_GT(row.decode_speedup, 0.0);
    }
  }
  const auto rss = eval::probe_peak_rss(q, o);
  ASSERT_EQ(rss.size(), 2u);
  EXPECT_GT(rss[0], 1000000u);
  EXPECT_GE(rss[1], rss[0]);
  const std::string table = eval::format_bench_table(r);
  EXPECT_NE(table.find("int8"), std::string::npos);
  EXPECT_NE(table.find("2:4 models against the dense model of the same format:"), std::string::npos) << table;
  EXPECT_NE(table.find("the dense int8"), std::string::npos) << table;
}

}  // namespace
}  // namespace mopt::load
