#include "eval/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/ops.h"

namespace mopt::eval {

std::vector<Window> sliding_windows(std::int64_t n, std::int64_t ctx, std::int64_t stride) {
  if (ctx < 2) fail("context must be at least 2 tokens, got {}", ctx);
  if (stride < 1 || stride > ctx) fail("stride must be between 1 and the context ({}), got {}", ctx, stride);
  std::vector<Window> out;
  std::int64_t prev_end = 0;
  for (std::int64_t begin = 0; begin < n; begin += stride) {
    const std::int64_t end = std::min(begin + ctx, n);
    const std::int64_t target_len = end - prev_end;
    out.push_back({begin, end, std::max(begin + 1, end - target_len)});
    prev_end = end;
    if (end == n) break;
  }
  return out;
}

void log_softmax(const float* logits, std::int64_t n, std::vector<double>& out) {
  out.resize(static_cast<std::size_t>(n));
  const double lse = kernels::log_sum_exp(logits, n);
  for (std::int64_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = static_cast<double>(logits[i]) - lse;
}

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// Packs windows [w0, w1) into one batch of at most max_tokens tokens (at
// least one window) and returns w1.
std::size_t pack_windows(std::span<const std::int32_t> tokens, const std::vector<Window>& windows, std::size_t w0,
                         std::int64_t max_tokens, std::vector<model::SequenceSpan>& batch, std::vector<std::int32_t>& packed) {
  batch.clear();
  packed.clear();
  std::size_t w1 = w0;
  while (w1 < windows.size() &&
         (packed.empty() || static_cast<std::int64_t>(packed.size()) + (windows[w1].end - windows[w1].begin) <= max_tokens)) {
    const auto& w = windows[w1];
    batch.push_back({static_cast<std::int64_t>(packed.size()), w.end - w.begin, 0, 0});
    packed.insert(packed.end(), tokens.begin() + w.begin, tokens.begin() + w.end);
    ++w1;
  }
  return w1;
}

// A position to score: the logits that predict token `position`.
struct ScoredRow {
  std::int64_t position;
  const float* logits;
};

template <typename Visit>
std::int64_t run_windows_decode(model::Model& m, std::span<const std::int32_t> tokens, const std::vector<Window>& windows,
                                const ProgressFn& progress, Visit visit) {
  std::int64_t longest = 1;
  for (const auto& w : windows) longest = std::max(longest, w.end - w.begin);
  model::KvCache cache = m.new_cache(1, longest);
  std::vector<float> logits;
  std::int64_t processed = 0;
  if (progress) progress(0, windows.size());
  for (std::size_t i = 0; i < windows.size(); ++i) {
    const auto& w = windows[i];
    for (std::int64_t p = w.begin; p < w.end; ++p) {
      const model::SequenceSpan span{0, 1, p - w.begin, 0};
      m.forward(tokens.subspan(static_cast<std::size_t>(p), 1), {&span, 1}, &cache, model::LogitsFor::all_rows, logits);
      // The logits after token p predict token p + 1.
      if (p + 1 >= w.first_scored && p + 1 < w.end) {
        const ScoredRow row{p + 1, logits.data()};
        visit(std::span<const ScoredRow>(&row, 1));
      }
    }
    processed += w.end - w.begin;
    if (progress) progress(i + 1, windows.size());
  }
  return processed;
}

template <typename Visit>
std::int64_t run_windows(model::Model& m, std::span<const std::int32_t> tokens, const std::vector<Window>& windows,
                         const ProgressFn& progress, Visit visit) {
  constexpr std::int64_t kBatchTokens = 2048;
  std::int64_t processed = 0;
  std::vector<float> logits;
  const std::int64_t vocab = m.config().vocab_size;
  if (progress) progress(0, windows.size());
  std::vector<model::SequenceSpan> batch;
  std::vector<std::int32_t> packed;
  std::vector<ScoredRow> rows;
  for (std::size_t w0 = 0; w0 < windows.size();) {
    const std::size_t w1 = pack_windows(tokens, windows, w0, kBatchTokens, batch, packed);
    m.forward(packed, batch, nullptr, model::LogitsFor::all_rows, logits);
    rows.clear();
    for (std::size_t i = w0; i < w1; ++i) {
      const auto& w = windows[i];
      const auto& s = batch[i - w0];
      for (std::int64_t p = w.first_scored; p < w.end; ++p) {
        // The logits at row p-1 of the window predict token p.
        rows.push_back({p, logits.data() + (s.offset + (p - 1 - w.begin)) * vocab});
      }
    }
    visit(std::span<const ScoredRow>(rows));
    processed += static_cast<std::int64_t>(packed.size());
    w0 = w1;
    if (progress) progress(w0, windows.size());
  }
  return processed;
}

void finish(PerplexityResult& r, std::int64_t total, std::int64_t processed, double seconds) {
  r.total_tokens = total;
  r.perplexity = r.scored_tokens > 0 ? std::exp(r.nll_sum / static_cast<double>(r.scored_tokens)) : 0.0;
  r.seconds = seconds;
  r.tokens_per_second = seconds > 0 ? static_cast<double>(processed) / seconds : 0.0;
}

}  // namespace

PerplexityResult perplexity(model::Model& m, std::span<const std::int32_t> tokens, std::int64_t ctx, std::int64_t stride,
                            const ProgressFn& progress, WindowRun run) {
  if (tokens.size() < 2) fail("perplexity needs at least 2 tokens, got {}", tokens.size());
  const auto windows = sliding_windows(static_cast<std::int64_t>(tokens.size()), ctx, stride);
  PerplexityResult r;
  const std::int64_t vocab = m.config().vocab_size;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<double> nll;
  // Each row's log Σ e^ on the pool; the sums in position order, so the result is the same at any
  // thread count.
  auto score = [&](std::span<const ScoredRow> rows) {
    nll.resize(rows.size());
    parallel_each(static_cast<std::int64_t>(rows.size()), 8, rows.size() > 8, [&](std::int64_t k) {
      const ScoredRow& row = rows[static_cast<std::size_t>(k)];
      const auto target = tokens[static_cast<std::size_t>(row.position)];
      nll[static_cast<std::size_t>(k)] = kernels::log_sum_exp(row.logits, vocab) - static_cast<double>(row.logits[target]);
    });
    for (std::size_t k = 0; k < rows.size(); ++k) {
      if (!std::isfinite(nll[k])) fail("non-finite log-likelihood at token {}", rows[k].position);
      r.nll_sum += nll[k];
      ++r.scored_tokens;
      r.token_nll.push_back({rows[k].position, nll[k]});
    }
  };
  const std::int64_t processed = run == WindowRun::decode ? run_windows_decode(m, tokens, windows, progress, score)
                                                          : run_windows(m, tokens, windows, progress, score);
  finish(r, static_cast<std::int64_t>(tokens.size()), processed, seconds_since(t0));
  std::sort(r.token_nll.begin(), r.token_nll.end(), [](const TokenNll& a, const TokenNll& b) { return a.position < b.position; });
  return r;
}

KldResult kl_divergence(model::Model& m, model::Model& base, std::span<const std::int32_t> tokens,
                        std::int64_t ctx, std::int64_t stride, const ProgressFn& progress) {
  if (tokens.size() < 2) fail("KL divergence needs at least 2 tokens, got {}", tokens.size());
  if (m.config().vocab_size != base.config().vocab_size) {
    fail("the models have different vocabularies ({} and {})", m.config().vocab_size, base.config().vocab_size);
  }
  const auto windows = sliding_windows(static_cast<std::int64_t>(tokens.size()), ctx, stride);
  const std::int64_t vocab = m.config().vocab_size;
  KldResult r;
  std::vector<double> klds;
  double dnll_sum = 0, dnll_square_sum = 0;  // per-token NLL(model) - NLL(base)
  std::int64_t agree = 0;
  struct RowScore {
    double nll_base = 0, nll_model = 0, kl = 0;
    bool agree = false;
  };
  std::vector<std::pair<std::int64_t, std::int64_t>> rows;  // (position, row of the logits)
  std::vector<RowScore> scores;
  std::vector<float> logits_base, logits_model;
  double seconds_base = 0, seconds_model = 0;
  std::int64_t processed = 0;
  // Both models run the same group of windows in turn; only that group's
  // logits are held, so memory stays small whatever the vocabulary.
  constexpr std::int64_t kBatchTokens = 512;
  if (progress) progress(0, windows.size());
  std::vector<model::SequenceSpan> batch;
  std::vector<std::int32_t> packed;
  for (std::size_t w0 = 0; w0 < windows.size();) {
    const std::size_t w1 = pack_windows(tokens, windows, w0, kBatchTokens, batch, packed);
    auto t0 = std::chrono::steady_clock::now();
    base.forward(packed, batch, nullptr, model::LogitsFor::all_rows, logits_base);
    seconds_base += seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    m.forward(packed, batch, nullptr, model::LogitsFor::all_rows, logits_model);
    seconds_model += seconds_since(t0);
    rows.clear();
    for (std::size_t i = w0; i < w1; ++i) {
      const auto& w = windows[i];
      const auto& s = batch[i - w0];
      for (std::int64_t p = w.first_scored; p < w.end; ++p) rows.push_back({p, s.offset + (p - 1 - w.begin)});
    }
    // Each row on the pool, gathered in position order: the same result at any thread count.
    scores.resize(rows.size());
    parallel_each(static_cast<std::int64_t>(rows.size()), 8, rows.size() > 8, [&](std::int64_t k) {
      const auto [p, row] = rows[static_cast<std::size_t>(k)];
      const float* lb = logits_base.data() + row * vocab;
      const float* lm = logits_model.data() + row * vocab;
      RowScore& out = scores[static_cast<std::size_t>(k)];
      double lse_base = 0, lse_model = 0;
      out.kl = kernels::softmax_kl(lb, lm, vocab, lse_base, lse_model);
      const auto target = tokens[static_cast<std::size_t>(p)];
      out.nll_base = lse_base - static_cast<double>(lb[target]);
      out.nll_model = lse_model - static_cast<double>(lm[target]);
      out.agree = std::max_element(lb, lb + vocab) - lb == std::max_element(lm, lm + vocab) - lm;
    });
    for (std::size_t k = 0; k < rows.size(); ++k) {
      const RowScore& sc = scores[k];
      if (!std::isfinite(sc.nll_base) || !std::isfinite(sc.nll_model) || !std::isfinite(sc.kl)) {
        fail("non-finite log-likelihood at token {} ({})", rows[k].first,
             !std::isfinite(sc.nll_base) ? "the base model" : "the model");
      }
      r.base.nll_sum += sc.nll_base;
      r.model.nll_sum += sc.nll_model;
      const double d = sc.nll_model - sc.nll_base;
      dnll_sum += d;
      dnll_square_sum += d * d;
      klds.push_back(std::max(0.0, sc.kl));
      agree += sc.agree ? 1 : 0;
    }
    processed += static_cast<std::int64_t>(packed.size());
    w0 = w1;
    if (progress) progress(w0, windows.size());
  }
  r.base.scored_tokens = r.model.scored_tokens = static_cast<std::int64_t>(klds.size());
  finish(r.base, static_cast<std::int64_t>(tokens.size()), processed, seconds_base);
  finish(r.model, static_cast<std::int64_t>(tokens.size()), processed, seconds_model);
  r.positions = static_cast<std::int64_t>(klds.size());
  const auto n = static_cast<double>(klds.size());
  // The standard error of a mean from its sums: sqrt(sample variance / n) (0 for a single value).
  const auto stderr_of = [n](double sum, double square_sum) {
    if (n < 2) return 0.0;
    const double mean = sum / n;
    return std::sqrt(std::max(0.0, (square_sum - n * mean * mean) / (n - 1)) / n);
  };
  double sum = 0, square_sum = 0;
  for (const double k : klds) {
    sum += k;
    square_sum += k * k;
  }
  r.mean_kld = sum / n;
  r.kld_stderr = stderr_of(sum, square_sum);
  r.mean_dnll = dnll_sum / n;
  r.dnll_stderr = stderr_of(dnll_sum, dnll_square_sum);
  std::sort(klds.begin(), klds.end());
  auto pct = [&](double q) { return klds[std::min(klds.size() - 1, static_cast<std::size_t>(q * static_cast<double>(klds.size())))]; };
  r.median_kld = pct(0.5);
  r.p90_kld = pct(0.90);
  r.p95_kld = pct(0.95);
  r.p99_kld = pct(0.99);
  r.p999_kld = pct(0.999);
  r.max_kld = klds.back();
  r.top1_agreement = static_cast<double>(agree) / static_cast<double>(klds.size());
  return r;
}

}  // namespace mopt::eval
