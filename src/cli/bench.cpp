// mopt bench and mopt create-random.
#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "eval/bench.h"
#include "load/load_model.h"
#include "export/random_checkpoint.h"

namespace mopt::cli {

namespace {

using nlohmann::json;

std::vector<std::int64_t> parse_batches(const std::string& text) {
  std::vector<std::int64_t> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::size_t used = 0;
    std::int64_t v = 0;
    try {
      v = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || item.empty() || v < 1) fail("--batch {}: expected positive integers separated by commas", text);
    out.push_back(v);
  }
  if (out.empty()) fail("--batch is empty");
  return out;
}

// The model as its 16-bit self: quantized Linears dequantized, no activation or KV quantization,
// float weights in bf16.
model::Model load_16bit(const std::string& dir, kernels::Precision products) {
  model::Model m = load::load_model(dir, load::QuantizedRun::fake_quant);
  m.set_precision(products);
  for (std::int64_t i = 0; i < m.num_layers(); ++i) {
    auto& l = m.mutable_layer(i);
    for (const auto kind : model::kAllLinears) l.linear(kind).input_transform = {};
    l.key_transform = {};
    l.value_transform = {};
    l.kv_e4m3_amax.reset();
  }
  m.convert_float_weights(DType::BF16);
  m.set_kv_element(kernels::KvElement::bf16);
  return m;
}

model::Model load_for_bench(const std::string& dir, kernels::Precision products) {
  model::Model m = load::load_model(dir, load::QuantizedRun::kernels);
  m.set_precision(products);
  m.set_kv_element(kernels::KvElement::bf16);
  return m;
}

std::string format_of(const model::Model& m) {
  std::set<std::string> kinds;
  for (std::int64_t i = 0; i < m.num_layers(); ++i) {
    for (const auto kind : model::kAllLinears) {
      const auto& lin = m.layer(i).linear(kind);
      kinds.insert(lin.describe());
    }
  }
  std::string label = fmt::format("{}", fmt::join(kinds, "+"));
  if (m.lm_head().quantized) label += ", head " + m.lm_head().quantized->describe();
  if (m.new_cache(1, 1).element() == kernels::KvElement::e4m3) label += " kv-fp8";
  return label;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (const char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// Runs `self bench --probe-rss` for one model and reads its peak RSS per batch.
std::vector<std::uint64_t> probe_in_child(const std::string& self, const std::string& dir, bool as_baseline, const BenchCliOptions& o) {
  std::string cmd = fmt::format("{} bench --probe-rss {} --batch {} --prompt {} --gen {}", shell_quote(self), shell_quote(dir),
                                shell_quote(o.batches), o.prompt, o.gen);
  if (as_baseline) cmd += " --probe-as-baseline";
  cmd += " --products " + shell_quote(o.products);
  if (o.threads > 0) cmd += fmt::format(" --threads {}", o.threads);
  cmd += " 2>&1";
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) fail("bench: could not start {}", self);
  std::string output;
  char buffer[4096];
  while (std::fgets(buffer, sizeof buffer, pipe.get()) != nullptr) output += buffer;
  const int status = pclose(pipe.release());
  if (status != 0) fail("bench: measuring the peak RSS of {} failed: {}", dir, output);
  try {
    return json::parse(output).get<std::vector<std::uint64_t>>();
  } catch (const json::exception&) {
    fail("bench: unreadable peak-RSS report for {}: {}", dir, output);
  }
}

}  // namespace

int run_bench(const BenchCliOptions& o, const std::string& argv0) {
  if (o.threads > 0) set_compute_threads(o.threads);
  const kernels::Precision products = parse_products(o.products);
  eval::BenchOptions options;
  options.batches = parse_batches(o.batches);
  options.prompt = o.prompt;
  options.gen = o.gen;
  options.rounds = o.rounds;
  if (o.rounds < 1) fail("--rounds must be at least 1");
  if (o.probe_rss) {
    if (o.models.size() != 1) fail("--probe-rss takes one model");
    model::Model m = o.probe_as_baseline ? load_16bit(o.models[0], products) : load_for_bench(o.models[0], products);
    fmt::print("{}\n", json(eval::probe_peak_rss(m, options)).dump());
    return 0;
  }
  std::error_code ec;
  std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec || self.empty()) self = argv0;

  const std::string base_dir = o.base.empty() ? o.models[0] : o.base;
  std::vector<std::string> dirs{base_dir};
  for (const auto& d : o.models) dirs.push_back(d);
  // Peak RSS first, each model alone in a process of its own (before this one holds any model).
  std::vector<std::vector<std::uint64_t>> rss(dirs.size());
  if (!o.no_rss) {
    Progress p("bench: peak RSS", dirs.size(), "models");
    for (std::size_t i = 0; i < dirs.size(); ++i) {
      rss[i] = probe_in_child(self, dirs[i], i == 0, o);
      p.advance();
    }
    p.finish();
  }
  std::vector<model::Model> models;
  models.reserve(dirs.size());
  models.push_back(load_16bit(base_dir, products));
  for (const auto& d : o.models) models.push_back(load_for_bench(d, products));
  // Said here, not in the peak-RSS children (their output is read as JSON).
  report_plain_loops(models[0], base_dir + " (baseline)");
  for (std::size_t i = 0; i < o.models.size(); ++i) report_plain_loops(models[i + 1], o.models[i]);
  std::vector<eval::BenchModel> bench_models;
  for (std::size_t i = 0; i < models.size(); ++i) {
    bench_models.push_back({dirs[i], i == 0 ? "bf16 (baseline)" : format_of(models[i]), &models[i], rss[i]});
  }
  std::unique_ptr<Progress> bar;
  std::size_t previous = 0;
  const auto report = eval::run_benchmark(bench_models, options, [&](const std::string&, std::size_t done, std::size_t total) {
    if (!bar) bar = std::make_unique<Progress>("bench", total, "runs");
    bar->advance(done - previous);
    previous = done;
  });
  if (bar) bar->finish();
  if (o.json) {
    json rows = json::array();
    for (const auto& r : report.rows) {
      rows.push_back({{"model", r.name}, {"format", r.format}, {"batch", r.batch}, {"weight_bytes", r.weight_bytes},
                      {"peak_rss_bytes", r.peak_rss_bytes}, {"kv_cache_bytes", r.kv_cache_bytes},
                      {"prefill_tokens_per_s", r.prefill_tokens_per_s}, {"decode_tokens_per_s", r.decode_tokens_per_s},
                      {"decode_speedup", r.decode_speedup}, {"prefill_speedup", r.prefill_speedup},
                      {"layers_decode_speedup", r.layers_decode_speedup}, {"memory_saving", r.memory_saving},
                      {"dense_twin", r.twin_format}, {"dense_twin_decode_speedup", r.twin_decode_speedup},
                      {"dense_twin_prefill_speedup", r.twin_prefill_speedup},
                      {"roofline_fraction", r.roofline_fraction}, {"decode_step_bytes", r.decode_step_bytes},
                      {"bandwidth_bytes_per_s", report.bandwidth_bytes_per_s}, {"threads", report.threads},
                      {"prompt", options.prompt}, {"gen", options.gen}});
    }
    fmt::print("{}\n", rows.dump(2));
  } else {
    fmt::print("{}", eval::format_bench_table(report));
  }
  return 0;
}

int run_create_random(const CreateRandomOptions& o) {
  const auto& shape = exporter::shape_named(o.like);
  exporter::write_random_checkpoint(shape, o.out, {o.seed, o.tokenizer});
  fmt::print("{}: random weights in the shape of {}\n", o.out, shape.name);
  return 0;
}

}  // namespace mopt::cli
