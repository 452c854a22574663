// Speed and memory of models side by side: prefill and decode tokens/s at
// several batch sizes, each model against a 16-bit baseline measured in the
// same run, interleaved (round r runs every model before round r + 1), with
// medians over the rounds; and decode's share of the memory-bandwidth
// roofline, the bandwidth itself measured in the same process.
//
// Decode at batch B: B sequences, each with `prompt` tokens prefilled into its
// KV-cache slot, then `gen` steps of one token per sequence (one forward over
// B rows, logits of every sequence). Prefill runs one sequence per forward
// (`prompt` rows). The roofline of a decode step is the bytes it must read:
// every weight the step multiplies by (Linears as the kernels hold them,
// norms, lm_head; of the embeddings only B rows) plus the KV cache up to the
// mean position; at `bandwidth` bytes/s, B tokens per step.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "model/llama.h"

namespace mopt::eval {

struct BenchOptions {
  std::vector<std::int64_t> batches{1, 32, 64};
  std::int64_t prompt = 512;
  std::int64_t gen = 128;
  int rounds = 3;
  std::uint64_t seed = 0;
};

struct BenchModel {
  std::string name;    // the path it came from
  std::string format;  // "bf16", "int4 g128", ...
  model::Model* model = nullptr;
  // Peak RSS (bytes) of a process running only this model, per batch (same order as options.batches);
  // measured by the caller in a separate process, empty when not measured.
  std::vector<std::uint64_t> peak_rss;
};

struct BenchRow {
  std::string name, format;
  std::int64_t batch = 0;
  std::uint64_t weight_bytes = 0;    // as the forward pass holds them
  std::uint64_t kv_cache_bytes = 0;  // the cache for batch x (prompt + gen) tokens
  std::uint64_t peak_rss_bytes = 0;  // 0 when not measured
  std::uint64_t decode_step_bytes = 0;  // what one decode step reads (the roofline's numerator)
  double prefill_tokens_per_s = 0, decode_tokens_per_s = 0;
  double decode_layers_tokens_per_s = 0;  // counting the decoder layers' time only (no lm_head)
  double decode_speedup = 0, prefill_speedup = 0, layers_decode_speedup = 0;  // against the baseline (row of models[0])
  double memory_saving = 0;  // baseline weight bytes / weight bytes
  // A 2:4 model against the first model of its format without " 2:4" at the same batch (0: none in the run).
  double twin_decode_speedup = 0, twin_prefill_speedup = 0, twin_layers_decode_speedup = 0;
  std::string twin_format;
  double roofline_fraction = 0;  // decode tokens/s over bandwidth-bound tokens/s
};

struct BenchReport {
  double bandwidth_bytes_per_s = 0;
  int threads = 0;
  std::string products = "f32";  // the Precision the models run ("bf16" or "f32")
  BenchOptions options;
  std::vector<BenchRow> rows;  // per model, per batch
};

// Read bandwidth of memory with every OpenMP thread streaming a buffer far larger than the caches:
// the median of `repeats` passes, bytes/s.
double measure_read_bandwidth(std::size_t bytes = std::size_t{1} << 29, int repeats = 5);

using BenchProgress = std::function<void(const std::string& what, std::size_t done, std::size_t total)>;

// models[0] is the baseline. Throws Error when a model's vocabulary or context cannot hold the run.
BenchReport run_benchmark(std::span<const BenchModel> models, const BenchOptions& options, const BenchProgress& progress = {});

// Bytes one decode step at batch `batch` reads at context `context` (see above).
std::uint64_t decode_step_bytes(const model::Model& model, std::int64_t batch, double context, std::size_t kv_element_bytes);

// The peak RSS after allocating each batch's cache and running one prefill and two decode steps
// (what run_benchmark's runs hold at their peak), one value per batch; for a separate process.
std::vector<std::uint64_t> probe_peak_rss(model::Model& model, const BenchOptions& options);

// The table (the reference's columns: batch, memory saving, tokens/s, speedup; then the rest).
std::string format_bench_table(const BenchReport& report);

}  // namespace mopt::eval
