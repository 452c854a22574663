#include "eval/bench.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>

#include "core/error.h"
#include "core/memory.h"
#include "core/thread_pool.h"

namespace mopt::eval {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::vector<std::int32_t> random_tokens(std::int64_t n, std::int64_t vocab, std::mt19937_64& rng) {
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(vocab - 1));
  std::vector<std::int32_t> t(static_cast<std::size_t>(n));
  for (auto& v : t) v = d(rng);
  return t;
}

struct Timing {
  double prefill_s = 0, decode_s = 0, decode_layers_s = 0;
};

// Prefills `batch` sequences of `prompt` tokens into `cache` (one forward each), then `steps` decode steps.
Timing run_once(model::Model& m, model::KvCache& cache, std::int64_t batch, std::int64_t prompt, std::int64_t steps,
                std::mt19937_64& rng, std::int64_t prefill_sequences) {
  const std::int64_t vocab = m.config().vocab_size;
  std::vector<float> logits;
  Timing t;
  auto t0 = std::chrono::steady_clock::now();
  for (std::int64_t s = 0; s < prefill_sequences; ++s) {
    const auto tokens = random_tokens(prompt, vocab, rng);
    const model::SequenceSpan span{0, prompt, 0, s};
    m.forward(tokens, {&span, 1}, &cache, model::LogitsFor::last_row_of_each_sequence, logits);
  }
  t.prefill_s = seconds_since(t0);
  std::vector<model::SequenceSpan> spans(static_cast<std::size_t>(batch));
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(batch));
  std::uniform_int_distribution<std::int32_t> d(0, static_cast<std::int32_t>(vocab - 1));
  m.reset_profile();
  t0 = std::chrono::steady_clock::now();
  for (std::int64_t step = 0; step < steps; ++step) {
    for (std::int64_t b = 0; b < batch; ++b) {
      spans[static_cast<std::size_t>(b)] = {b, 1, prompt + step, b};
      tokens[static_cast<std::size_t>(b)] = d(rng);
    }
    m.forward(tokens, spans, &cache, model::LogitsFor::last_row_of_each_sequence, logits);
  }
  t.decode_s = seconds_since(t0);
  t.decode_layers_s = m.profile().layers_seconds;
  return t;
}

void check_model(const model::Model& m, const BenchOptions& o, const std::string& name) {
  const auto& c = m.config();
  if (o.prompt < 1 || o.gen < 1) fail("bench needs a prompt and a generation of at least one token");
  if (o.prompt + o.gen > c.max_position_embeddings) {
    fail("{}: prompt {} + gen {} tokens exceed the model's context of {}", name, o.prompt, o.gen, c.max_position_embeddings);
  }
  for (const auto b : o.batches) {
    if (b < 1 || b > 4096) fail("batch size {} is outside 1..4096", b);
  }
}

std::string human_bytes(std::uint64_t b) {
  const double v = static_cast<double>(b);
  if (v >= 1e9) return fmt::format("{:.2f} GB", v / 1e9);
  if (v >= 1e6) return fmt::format("{:.1f} MB", v / 1e6);
  return fmt::format("{:.0f} kB", v / 1e3);
}

}  // namespace

double measure_read_bandwidth(std::size_t bytes, int repeats) {
  std::vector<std::uint64_t> buffer(bytes / sizeof(std::uint64_t));
  const auto n = static_cast<std::int64_t>(buffer.size());
  constexpr std::int64_t kGrain = 1 << 16;
  parallel_ranges(n, kGrain, [&](std::int64_t i0, std::int64_t i1) {  // first touch by the pool's threads
    for (std::int64_t i = i0; i < i1; ++i) buffer[static_cast<std::size_t>(i)] = static_cast<std::uint64_t>(i);
  });
  std::vector<double> rates;
  volatile std::uint64_t sink = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::atomic<std::uint64_t> sum{0};
    parallel_ranges(n, kGrain, [&](std::int64_t i0, std::int64_t i1) {
      std::uint64_t part = 0;
      for (std::int64_t i = i0; i < i1; ++i) part += buffer[static_cast<std::size_t>(i)];
      sum.fetch_add(part, std::memory_order_relaxed);
    });
    rates.push_back(static_cast<double>(bytes) / seconds_since(t0));
    sink = sink + sum;
  }
  return median(rates);
}

std::uint64_t decode_step_bytes(const model::Model& m, std::int64_t batch, double context, std::size_t kv_element_bytes) {
  const auto& c = m.config();
  std::uint64_t bytes = m.resident_weight_bytes();
  // Only `batch` rows of the embedding table are read, unless it is also the head.
  if (!m.head_is_embedding_table()) {
    const std::uint64_t table = m.embedding_bytes();
    bytes = bytes - table + table / static_cast<std::uint64_t>(c.vocab_size) * static_cast<std::uint64_t>(batch);
  }
  const double kv = static_cast<double>(batch) * context * static_cast<double>(c.num_layers) * 2.0 *
                    static_cast<double>(c.num_kv_heads * c.head_dim) * static_cast<double>(kv_element_bytes);
  return bytes + static_cast<std::uint64_t>(kv);
}

std::vector<std::uint64_t> probe_peak_rss(model::Model& m, const BenchOptions& o) {
  check_model(m, o, "model");
  std::vector<std::int64_t> batches = o.batches;
  std::mt19937_64 rng(o.seed);
  std::vector<std::uint64_t> out;
  for (const auto b : batches) {
    model::KvCache cache = m.new_cache(b, o.prompt + o.gen);
    run_once(m, cache, b, o.prompt, std::min<std::int64_t>(2, o.gen), rng, 1);
    out.push_back(peak_rss_bytes());
  }
  return out;
}

BenchReport run_benchmark(std::span<const BenchModel> models, const BenchOptions& o, const BenchProgress& progress) {
  if (models.empty()) fail("bench needs at least one model");
  for (const auto& bm : models) check_model(*bm.model, o, bm.name);
  BenchReport report;
  report.options = o;
  report.threads = compute_threads();
  if (!models.empty()) report.products = models[0].model->precision() == kernels::Precision::bf16 ? "bf16" : "f32";
  report.bandwidth_bytes_per_s = measure_read_bandwidth();

  const std::size_t nb = o.batches.size();
  // [model][batch] -> per-round timings
  std::vector<std::vector<std::vector<Timing>>> timings(models.size(), std::vector<std::vector<Timing>>(nb));
  std::vector<std::vector<std::uint64_t>> kv_bytes(models.size(), std::vector<std::uint64_t>(nb));
  std::vector<std::vector<std::size_t>> kv_element(models.size(), std::vector<std::size_t>(nb));
  const std::size_t total = static_cast<std::size_t>(o.rounds) * models.size() * nb;
  std::size_t done = 0;
  std::mt19937_64 rng(o.seed);
  for (int round = 0; round < o.rounds; ++round) {
    for (std::size_t bi = 0; bi < nb; ++bi) {
      for (std::size_t mi = 0; mi < models.size(); ++mi) {
        const auto& bm = models[mi];
        const std::int64_t b = o.batches[bi];
        if (progress) progress(fmt::format("{} batch {} round {}/{}", bm.format, b, round + 1, o.rounds), done, total);
        model::KvCache cache = bm.model->new_cache(b, o.prompt + o.gen);
        kv_bytes[mi][bi] = cache.bytes();
        kv_element[mi][bi] = kernels::kv_element_bytes(cache.element());
        timings[mi][bi].push_back(run_once(*bm.model, cache, b, o.prompt, o.gen, rng, b));
        ++done;
      }
    }
  }
  if (progress) progress("done", done, total);

  for (std::size_t mi = 0; mi < models.size(); ++mi) {
    const auto& bm = models[mi];
    for (std::size_t bi = 0; bi < nb; ++bi) {
      const std::int64_t b = o.batches[bi];
      BenchRow row;
      row.name = bm.name;
      row.format = bm.format;
      row.batch = b;
      row.weight_bytes = bm.model->resident_weight_bytes();
      row.kv_cache_bytes = kv_bytes[mi][bi];
      row.peak_rss_bytes = bi < bm.peak_rss.size() ? bm.peak_rss[bi] : 0;
      std::vector<double> prefill, decode, layers;
      for (const auto& t : timings[mi][bi]) {
        prefill.push_back(static_cast<double>(b * o.prompt) / t.prefill_s);
        decode.push_back(static_cast<double>(b * o.gen) / t.decode_s);
        layers.push_back(static_cast<double>(b * o.gen) / t.decode_layers_s);
      }
      row.prefill_tokens_per_s = median(prefill);
      row.decode_tokens_per_s = median(decode);
      row.decode_layers_tokens_per_s = median(layers);
      const double context = static_cast<double>(o.prompt) + static_cast<double>(o.gen + 1) / 2.0;
      row.decode_step_bytes = decode_step_bytes(*bm.model, b, context, kv_element[mi][bi]);
      const double roofline = static_cast<double>(b) * report.bandwidth_bytes_per_s / static_cast<double>(row.decode_step_bytes);
      row.roofline_fraction = row.decode_tokens_per_s / roofline;
      report.rows.push_back(row);
    }
  }
  // Against the baseline (models[0]) at the same batch.
  for (auto& row : report.rows) {
    for (const auto& base : report.rows) {
      if (base.name != models[0].name || base.format != models[0].format || base.batch != row.batch) continue;
      row.decode_speedup = row.decode_tokens_per_s / base.decode_tokens_per_s;
      row.prefill_speedup = row.prefill_tokens_per_s / base.prefill_tokens_per_s;
      row.layers_decode_speedup = row.decode_layers_tokens_per_s / base.decode_layers_tokens_per_s;
      row.memory_saving = static_cast<double>(base.weight_bytes) / static_cast<double>(row.weight_bytes);
      break;
    }
  }
  // Each 2:4 model against its dense twin: the same format without " 2:4" (a 16-bit one may be the
  // baseline, labelled "bf16 (baseline)"), the same batch.
  for (auto& row : report.rows) {
    const std::size_t at = row.format.find(" 2:4");
    if (at == std::string::npos) continue;
    const std::string twin = row.format.substr(0, at) + row.format.substr(at + 4);
    for (const auto& dense : report.rows) {
      if ((dense.format != twin && dense.format != twin + " (baseline)") || dense.batch != row.batch) continue;
      row.twin_format = twin;
      row.twin_decode_speedup = row.decode_tokens_per_s / dense.decode_tokens_per_s;
      row.twin_prefill_speedup = row.prefill_tokens_per_s / dense.prefill_tokens_per_s;
      row.twin_layers_decode_speedup = row.decode_layers_tokens_per_s / dense.decode_layers_tokens_per_s;
      break;
    }
  }
  return report;
}

std::string format_bench_table(const BenchReport& r) {
  std::string s = fmt::format(
      "gemm: {}; products asked: {}\n{} threads; memory read bandwidth {:.1f} GB/s (measured in this run); prompt {} tokens, gen {} tokens; medians of {} rounds\n",
      kernels::describe_gemm(), r.products, r.threads, r.bandwidth_bytes_per_s / 1e9, r.options.prompt, r.options.gen, r.options.rounds);
  std::size_t width = 22;  // the format column fits the longest name
  for (const auto& row : r.rows) width = std::max(width, row.format.size());
  s += fmt::format("{:<{}} {:>5} {:>10} {:>10} {:>10} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9}\n", "format", width, "batch", "weights",
                   "mem saving", "peak RSS", "prefill/s", "decode/s", "speedup", "prefill x", "layers x", "roofline", "KV cache");
  for (const auto& row : r.rows) {
    s += fmt::format("{:<{}} {:>5} {:>10} {:>9.2f}x {:>10} {:>10.1f} {:>11.2f} {:>8.2f}x {:>8.2f}x {:>8.2f}x {:>8.0f}% {:>9}\n", row.format, width,
                     row.batch, human_bytes(row.weight_bytes), row.memory_saving, row.peak_rss_bytes ? human_bytes(row.peak_rss_bytes) : "-",
                     row.prefill_tokens_per_s, row.decode_tokens_per_s, row.decode_speedup, row.prefill_speedup, row.layers_decode_speedup,
                     100.0 * row.roofline_fraction, human_bytes(row.kv_cache_bytes));
  }
  bool twins = false;
  for (const auto& row : r.rows) {
    if (row.twin_format.empty()) continue;
    if (!twins) s += "2:4 models against the dense model of the same format:\n";
    twins = true;
    s += fmt::format("  {:<{}} batch {:>3}: decode {:.2f}x, prefill {:.2f}x, decoder layers {:.2f}x the dense {}\n", row.format, width, row.batch,
                     row.twin_decode_speedup, row.twin_prefill_speedup, row.twin_layers_decode_speedup, row.twin_format);
  }
  return s;
}

}  // namespace mopt::eval
