#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/thread_pool.h"
#include "eval/generate.h"
#include "eval/multiple_choice.h"
#include "eval/perplexity.h"
#include "support/temp_dir.h"

namespace mopt::eval {
namespace {

TEST(SlidingWindows, NonOverlappingAndOverlapping) {
  // Stride = ctx: consecutive windows. The first token of every window has
  // nothing before it in the window, so HF's procedure never scores it.
  auto w = sliding_windows(10, 4, 4);
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].begin, 0);
  EXPECT_EQ(w[0].end, 4);
  EXPECT_EQ(w[0].first_scored, 1);
  EXPECT_EQ(w[1].first_scored, 5);
  EXPECT_EQ(w[2].begin, 8);
  EXPECT_EQ(w[2].end, 10);
  // Stride < ctx: later windows score only their new tokens.
  w = sliding_windows(10, 4, 2);
  ASSERT_EQ(w.size(), 4u);
  EXPECT_EQ(w[1].begin, 2);
  EXPECT_EQ(w[1].end, 6);
  EXPECT_EQ(w[1].first_scored, 4);
  EXPECT_EQ(w.back().end, 10);
  std::int64_t scored = 0;
  for (const auto& x : w) scored += x.end - x.first_scored;
  EXPECT_EQ(scored, 9);  // every token but the first, once
  EXPECT_THROW(sliding_windows(10, 1, 1), Error);
  EXPECT_THROW(sliding_windows(10, 4, 5), Error);
  EXPECT_THROW(sliding_windows(10, 4, 0), Error);
}

TEST(LogSoftmax, NormalizesInDoublePrecision) {
  const float logits[] = {1.0f, 2.0f, 3.0f, -100.0f};
  std::vector<double> lp;
  log_softmax(logits, 4, lp);
  double total = 0;
  for (const double v : lp) total += std::exp(v);
  EXPECT_NEAR(total, 1.0, 1e-12);
  EXPECT_NEAR(lp[2] - lp[1], 1.0, 1e-12);
}

TEST(SampleToken, GreedyAndNucleus) {
  const float logits[] = {0.1f, 5.0f, 4.9f, -3.0f};
  std::uint64_t rng = 7;
  EXPECT_EQ(sample_token(logits, 4, 0.0f, 1.0f, rng), 1);
  // top_p small enough that only the most likely token remains.
  for (int i = 0; i < 20; ++i) EXPECT_EQ(sample_token(logits, 4, 1.0f, 0.3f, rng), 1);
  // With top_p 1 both likely tokens come up; token 3 (e^-8 relative) is rare.
  int counts[4] = {};
  for (int i = 0; i < 2000; ++i) ++counts[sample_token(logits, 4, 1.0f, 1.0f, rng)];
  EXPECT_GT(counts[1], 700);
  EXPECT_GT(counts[2], 700);
  EXPECT_LT(counts[3], 10);
}

TEST(McCsv, QuotedFieldsHeaderAndErrors) {
  const std::string csv =
      "question,A,B,C,D,answer\n"
      "\"What is 2+2?\",3,4,5,\"six, or more\",B\r\n"
      "\"A \"\"quoted\"\" word\nand a newline\",a,b,c,d,D\n";
  const auto q = parse_mc_csv(csv, "t.csv");
  ASSERT_EQ(q.size(), 2u);
  EXPECT_EQ(q[0].question, "What is 2+2?");
  EXPECT_EQ(q[0].choices[3], "six, or more");
  EXPECT_EQ(q[0].answer, 1);
  EXPECT_EQ(q[1].question, "A \"quoted\" word\nand a newline");
  EXPECT_EQ(q[1].answer, 3);
  auto error_of = [](const std::string& text) {
    try {
      parse_mc_csv(text, "t.csv");
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error_of("q,a,b,c,d\n").find("row 1 has 5 fields"), std::string::npos);
  EXPECT_NE(error_of("q,a,b,c,d,E\n").find("answer 'E'"), std::string::npos);
  EXPECT_NE(error_of("\"q,a,b,c,d,A\n").find("not closed"), std::string::npos);
  EXPECT_NE(error_of("").find("no questions"), std::string::npos);
}

TEST(McPrompt, MmluFormat) {
  const McQuestion shot{"Q1?", {"a", "b", "c", "d"}, 2};
  const McQuestion q{"Q2?", {"w", "x", "y", "z"}, 0};
  EXPECT_EQ(mc_prompt({shot}, q),
            "The following are multiple choice questions (with answers).\n\n"
            "Q1?\nA. a\nB. b\nC. c\nD. d\nAnswer: C\n\n"
            "Q2?\nA. w\nB. x\nC. y\nD. z\nAnswer:");
}

}  // namespace
}  // namespace mopt::eval

#include "io/safetensors.h"

namespace mopt::eval {
namespace {

// Perplexity of a fixture sequence in one window, against the NLL computed
// from transformers' own logits for the same tokens.
TEST(Perplexity, MatchesTransformersLogits) {
  model::Model m = model::Model::load(testing::data_path("hf/qwen3"));
  const auto golden = io::SafetensorsFile::open(testing::data_path("logits/qwen3.safetensors"));
  const Tensor ids_t = golden.tensor("a.input_ids");
  std::vector<std::int32_t> ids;
  for (std::uint64_t i = 0; i < ids_t.numel(); ++i) ids.push_back(static_cast<std::int32_t>(ids_t.data<std::int64_t>()[i]));
  const auto logits = golden.tensor("a.prefill_logits").to_f32();
  const std::int64_t vocab = m.config().vocab_size;
  double nll = 0;
  std::vector<double> lp, token_nll;
  for (std::size_t p = 1; p < ids.size(); ++p) {
    log_softmax(logits.data() + (p - 1) * static_cast<std::size_t>(vocab), vocab, lp);
    token_nll.push_back(-lp[static_cast<std::size_t>(ids[p])]);
    nll += token_nll.back();
  }
  const double expected = std::exp(nll / static_cast<double>(ids.size() - 1));
  const auto n = static_cast<std::int64_t>(ids.size());
  const PerplexityResult r = perplexity(m, ids, n, n);
  EXPECT_EQ(r.scored_tokens, n - 1);
  EXPECT_NEAR(r.perplexity, expected, 1e-5 * expected);
  // Each token's NLL, in stream order, summing to the total.
  ASSERT_EQ(r.token_nll.size(), token_nll.size());
  double sum = 0;
  for (std::size_t i = 0; i < token_nll.size(); ++i) {
    EXPECT_EQ(r.token_nll[i].position, static_cast<std::int64_t>(i + 1));
    EXPECT_NEAR(r.token_nll[i].nll, token_nll[i], 1e-4 + 1e-4 * token_nll[i]) << "token " << i + 1;
    sum += r.token_nll[i].nll;
  }
  EXPECT_NEAR(sum, r.nll_sum, 1e-9 * r.nll_sum);
  // Overlapping windows score every token once too, and decode scores the same tokens alike.
  const PerplexityResult overlapping = perplexity(m, ids, 16, 8);
  EXPECT_EQ(overlapping.scored_tokens, n - 1);
  const PerplexityResult decoded = perplexity(m, ids, 16, 8, {}, WindowRun::decode);
  ASSERT_EQ(decoded.token_nll.size(), overlapping.token_nll.size());
  for (std::size_t i = 0; i < decoded.token_nll.size(); ++i) {
    EXPECT_EQ(decoded.token_nll[i].position, overlapping.token_nll[i].position);
    EXPECT_EQ(overlapping.token_nll[i].position, static_cast<std::int64_t>(i + 1));
    EXPECT_NEAR(decoded.token_nll[i].nll, overlapping.token_nll[i].nll, 1e-3 + 1e-3 * overlapping.token_nll[i].nll) << "token " << i + 1;
  }
  // A model against itself: zero divergence, full agreement.
  const KldResult k = kl_divergence(m, m, ids, 16, 16);
  EXPECT_LT(k.mean_kld, 1e-9);
  EXPECT_DOUBLE_EQ(k.top1_agreement, 1.0);
  EXPECT_NEAR(k.model.perplexity, k.base.perplexity, 1e-9);
}

TEST(KlDivergence, TwoModelsAsDefinedAndTheSameAtAnyThreadCount) {
  // Two different models of one vocabulary: each scored position's KL(base ‖ model) computed here from
  // their logits in long double, term by term, against kl_divergence's; and the results bit for bit
  // the same on one thread as on several (rows are scored on the pool, summed in order).
  model::Model base = model::Model::load(testing::data_path("hf/llama"));
  model::Model m = model::Model::load(testing::data_path("hf/qwen3"));
  const std::int64_t vocab = m.config().vocab_size;
  std::vector<std::int32_t> ids;
  for (int i = 0; i < 100; ++i) ids.push_back(static_cast<std::int32_t>((i * 37 + 11) % vocab));
  const std::int64_t ctx = 32;
  std::vector<long double> want, dnll;  // per position: KL, and NLL(model) - NLL(base)
  long double nll_base = 0, nll_model = 0;
  std::int64_t agree = 0;
  for (const Window& w : sliding_windows(static_cast<std::int64_t>(ids.size()), ctx, ctx)) {
    const std::span<const std::int32_t> seq(ids.data() + w.begin, static_cast<std::size_t>(w.end - w.begin));
    const model::SequenceSpan span{0, w.end - w.begin, 0, 0};
    std::vector<float> lb, lm;
    base.forward(seq, std::span(&span, 1), nullptr, model::LogitsFor::all_rows, lb);
    m.forward(seq, std::span(&span, 1), nullptr, model::LogitsFor::all_rows, lm);
    for (std::int64_t p = w.first_scored; p < w.end; ++p) {
      const float* b = lb.data() + (p - 1 - w.begin) * vocab;
      const float* q = lm.data() + (p - 1 - w.begin) * vocab;
      auto lse = [&](const float* x) {
        long double mx = -INFINITY, s = 0;
        for (std::int64_t v = 0; v < vocab; ++v) mx = std::max(mx, static_cast<long double>(x[v]));
        for (std::int64_t v = 0; v < vocab; ++v) s += std::exp(static_cast<long double>(x[v]) - mx);
        return mx + std::log(s);
      };
      const long double sb = lse(b), sq = lse(q);
      long double kl = 0;
      for (std::int64_t v = 0; v < vocab; ++v) {
        const long double pb = static_cast<long double>(b[v]) - sb, pq = static_cast<long double>(q[v]) - sq;
        kl += std::exp(pb) * (pb - pq);
      }
      want.push_back(kl);
      const auto t = static_cast<std::size_t>(ids[static_cast<std::size_t>(p)]);
      nll_base += sb - b[t];
      nll_model += sq - q[t];
      dnll.push_back((sq - q[t]) - (sb - b[t]));
      agree += std::max_element(b, b + vocab) - b == std::max_element(q, q + vocab) - q;
    }
  }
  const int threads = compute_threads();
  set_compute_threads(1);
  const KldResult one = kl_divergence(m, base, ids, ctx, ctx);
  set_compute_threads(std::max(2, threads));
  const KldResult many = kl_divergence(m, base, ids, ctx, ctx);
  set_compute_threads(threads);
  ASSERT_EQ(one.positions, static_cast<std::int64_t>(want.size()));
  long double mean = 0;
  for (const long double k : want) mean += k;
  mean /= static_cast<long double>(want.size());
  // Standard errors of the means, two-pass: sqrt(sum (v - mean)^2 / (n - 1) / n).
  const auto stderr_of = [](const std::vector<long double>& v) {
    long double m = 0, ss = 0;
    for (const long double x : v) m += x;
    m /= static_cast<long double>(v.size());
    for (const long double x : v) ss += (x - m) * (x - m);
    return std::pair{static_cast<double>(m), static_cast<double>(std::sqrt(ss / static_cast<long double>(v.size() - 1) / static_cast<long double>(v.size())))};
  };
  const auto [kld_mean, kld_se] = stderr_of(want);
  const auto [dnll_mean, dnll_se] = stderr_of(dnll);
  EXPECT_GT(kld_se, 0.0);
  EXPECT_NEAR(one.kld_stderr, kld_se, 1e-5 * kld_se);
  EXPECT_NEAR(one.mean_dnll, dnll_mean, 1e-6 * std::fabs(dnll_mean) + 1e-9);
  EXPECT_NEAR(one.dnll_stderr, dnll_se, 1e-5 * dnll_se);
  // The mean NLL difference is the log of the perplexity ratio.
  EXPECT_NEAR(one.mean_dnll, std::log(one.model.perplexity / one.base.perplexity), 1e-9);
  EXPECT_EQ(one.dnll_stderr, many.dnll_stderr);
  std::sort(want.begin(), want.end());
  EXPECT_GT(one.mean_kld, 1e-3);  // different models: a divergence to measure
  EXPECT_NEAR(one.mean_kld, static_cast<double>(mean), 1e-5 * static_cast<double>(mean));
  EXPECT_NEAR(one.max_kld, static_cast<double>(want.back()), 1e-5 * static_cast<double>(want.back()));
  EXPECT_NEAR(one.median_kld, static_cast<double>(want[want.size() / 2]), 1e-5 * static_cast<double>(want[want.size() / 2]));
  const auto n = static_cast<long double>(want.size());
  EXPECT_NEAR(one.base.perplexity, static_cast<double>(std::exp(nll_base / n)), 1e-6 * one.base.perplexity);
  EXPECT_NEAR(one.model.perplexity, static_cast<double>(std::exp(nll_model / n)), 1e-6 * one.model.perplexity);
  EXPECT_DOUBLE_EQ(one.top1_agreement, static_cast<double>(agree) / static_cast<double>(n));
  EXPECT_EQ(one.mean_kld, many.mean_kld);
  EXPECT_EQ(one.max_kld, many.max_kld);
  EXPECT_EQ(one.base.perplexity, many.base.perplexity);
  EXPECT_EQ(one.model.perplexity, many.model.perplexity);
  EXPECT_EQ(one.top1_agreement, many.top1_agreement);
  // Perplexity alike.
  set_compute_threads(1);
  const PerplexityResult p1 = perplexity(m, ids, ctx, ctx);
  set_compute_threads(std::max(2, threads));
  const PerplexityResult p2 = perplexity(m, ids, ctx, ctx);
  set_compute_threads(threads);
  EXPECT_EQ(p1.nll_sum, p2.nll_sum);
  EXPECT_NEAR(p1.perplexity, one.model.perplexity, 1e-9 * p1.perplexity);
}

}  // namespace
}  // namespace mopt::eval

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/json_util.h"

namespace mopt::eval {
namespace {

std::string repo_path(const std::string& relative) { return std::string(MOPT_SOURCE_DIR) + "/" + relative; }

// The bundled model's held-out perplexity equals what transformers computed
// for the same checkpoint and procedure (models/tiny-kjv/reference_eval.json),
// within 0.1%; the token counts equal exactly (same tokenizer).
TEST(TinyKjv, HeldOutPerplexityMatchesTransformers) {
  std::ifstream in(repo_path("models/tiny-kjv/reference_eval.json"));
  ASSERT_TRUE(in) << "models/tiny-kjv/reference_eval.json";
  const auto reference = nlohmann::json::parse(in);
  model::Model m = model::Model::load(repo_path("models/tiny-kjv"));
  // The World English Bible text is checked the same way by hand (docs); one
  // file keeps the suite short under the sanitizers.
  for (const std::string file : {"kjv-heldout.txt"}) {
    const auto tokens = m.require_tokenizer().encode(io::read_text_file(repo_path("data/" + file)));
    const auto& facts = reference["files"][file];
    EXPECT_EQ(static_cast<std::int64_t>(tokens.size()), facts["tokens"].get<std::int64_t>()) << file;
    for (const auto& r : facts["results"]) {
      if (r["stride"] != 256) continue;  // the overlapping runs cost twice as much under the sanitizers
      const PerplexityResult ours = perplexity(m, tokens, r["context"], r["stride"]);
      EXPECT_EQ(ours.scored_tokens, r["scored_tokens"].get<std::int64_t>()) << file;
      const double expected = r["ppl"];
      EXPECT_NEAR(ours.perplexity, expected, 1e-3 * expected) << file;
    }
  }
}

TEST(TinyKjv, LogitsMatchTransformers) {
  model::Model m = model::Model::load(repo_path("models/tiny-kjv"));
  const auto golden = io::SafetensorsFile::open(repo_path("models/tiny-kjv/reference_logits.safetensors"));
  const Tensor ids_t = golden.tensor("input_ids");
  std::vector<std::int32_t> ids;
  for (std::uint64_t i = 0; i < ids_t.numel(); ++i) ids.push_back(static_cast<std::int32_t>(ids_t.data<std::int64_t>()[i]));
  const auto expected = golden.tensor("logits").to_f32();
  std::vector<float> logits;
  const model::SequenceSpan s{0, static_cast<std::int64_t>(ids.size()), 0, 0};
  m.forward(ids, std::span(&s, 1), nullptr, model::LogitsFor::all_rows, logits);
  double diff = 0, scale = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(logits[i] - expected[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(expected[i])));
  }
  EXPECT_LE(diff / scale, 1e-4) << "max |diff| " << diff << " of logits up to " << scale;
}

TEST(TinyKjv, MultipleChoiceAndGenerationRun) {
  model::Model m = model::Model::load(repo_path("models/tiny-kjv"));
  const auto questions = parse_mc_csv(io::read_text_file(repo_path("data/bible-mc.csv")), "bible-mc.csv");
  const McResult r = multiple_choice(m, questions, 2);
  EXPECT_EQ(r.questions, static_cast<std::int64_t>(questions.size()) - 2);
  EXPECT_EQ(r.predictions.size(), static_cast<std::size_t>(r.questions));
  GenerateOptions g;
  g.max_tokens = 16;
  std::string streamed;
  const auto prompt = m.require_tokenizer().encode("In the beginning", true);
  const auto out = generate(m, prompt, g, [&](std::string_view piece) { streamed += piece; });
  EXPECT_EQ(streamed, m.require_tokenizer().decode(out, true));  // the stream adds up to the text
  EXPECT_FALSE(out.empty());
  // Greedy decoding is deterministic; with the KV cache it equals re-running the whole sequence.
  std::vector<std::int32_t> seq = prompt;
  std::vector<float> logits;
  for (const auto expected_token : out) {
    const model::SequenceSpan s{0, static_cast<std::int64_t>(seq.size()), 0, 0};
    m.forward(seq, std::span(&s, 1), nullptr, model::LogitsFor::last_row_of_each_sequence, logits);
    const auto argmax = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    ASSERT_EQ(argmax, expected_token);
    seq.push_back(argmax);
  }
}

}  // namespace
}  // namespace mopt::eval
