#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>

#include "algo/ptq.h"
#include "cli/commands.h"
#include "cli/quantize_common.h"
#include "core/error.h"
#include "core/memory.h"
#include "export/compressed_tensors.h"
#include "export/gguf_export.h"
#include "export/hf_modelopt.h"
#include "export/targets.h"
#include "load/load_model.h"
#include "io/atomic_file.h"
#include "io/checkpoint.h"
#include "io/dataset.h"
#include "io/ggml_grid.h"
#include "io/tokenizer.h"
#include "quant/formats.h"

namespace mopt::cli {

namespace {

using nlohmann::json;

std::string format_error(double e) { return e < 0.0 ? "-" : fmt::format("{:.5f}", e); }

// The report's notes on what an algorithm chose in a layer (or the lm_head).
std::string algorithm_notes(const algo::LayerReport& l) {
  std::string notes;
  if (!l.alphas.empty()) {
    notes = "alpha";
    for (const auto& [name, alpha] : l.alphas) notes += fmt::format(" {}={:.1f}", name.substr(name.find('.') + 1), alpha);
  }
  if (l.gptq_retries > 0) notes += fmt::format(" gptq: {} damping retries", l.gptq_retries);
  if (l.gptq_fallbacks > 0) notes += fmt::format(" gptq: {} Linears fell back to rounding (indefinite Hessian)", l.gptq_fallbacks);
  return notes;
}

}  // namespace

quant::Recipe recipe_from_options(const QuantizeOptions& o) {
  quant::Recipe r;
  if (!o.recipe.empty()) r = quant::load_recipe(o.recipe);
  if (!o.format.empty()) r.format = o.format;
  if (r.format.empty()) fail("quantize needs --format or a --recipe naming one");
  if (o.group_size > 0) r.group_size = o.group_size;
  if (!o.algo.empty()) r.algorithm = o.algo;
  if (!o.kv_cache.empty()) r.kv_cache = o.kv_cache;
  if (!o.calibrator.empty()) r.calibrator = quant::parse_calib_method(o.calibrator);
  if (o.percentile > 0.0) r.percentile = o.percentile;
  if (o.calib_size > 0) r.calib_size = o.calib_size;
  if (o.seq_len > 0) r.seq_len = o.seq_len;
  if (o.seed >= 0) r.seed = static_cast<std::uint64_t>(o.seed);
  if (o.quantize_lm_head) r.quantize_lm_head = true;
  for (const auto& e : o.exclude) r.exclude.push_back(e);
  if (!o.sparsity.empty()) r.sparsity = o.sparsity;
  if (!o.sparse_algo.empty()) {
    if (r.sparsity.empty()) fail("--sparse-algo applies with --sparsity 2:4");
    r.sparse_algo = o.sparse_algo;
  }
  if (!o.sparse_exclude.empty() && r.sparsity.empty()) fail("--sparse-exclude applies with --sparsity 2:4");
  for (const auto& e : o.sparse_exclude) r.sparse_exclude.push_back(e);
  for (const auto& ov : o.overrides) {
    const auto eq = ov.rfind('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == ov.size()) fail("--override '{}' is not GLOB=FORMAT", ov);
    r.overrides.push_back({ov.substr(0, eq), ov.substr(eq + 1)});
  }
  r.validate();
  return r;
}

quant::Recipe with_gguf_target_grid(const QuantizeOptions& o, quant::Recipe r, const io::ModelConfig& config) {
  if (o.export_format != "gguf") return r;
  const std::string target = gguf_target_type(o, r);
  // A GGUF Q4_0 file holds INT4 weights code for code. By default they are quantized in its own blocks
  // as every other integer type is (below); with an explicit group size (a multiple of 32 sharing one
  // scale) or a clip search, on Q4_0's grid in those groups (16 levels, the scale the block stores), so
  // that AWQ, GPTQ and the rounding still choose what the file keeps.
  const auto int4 = [](const std::string& format) {
    const quant::FormatRow* row = quant::find_format(format);
    return row != nullptr && row->weight.element == quant::Element::int4 && !row->weight.fp8_second_stage;
  };
  const bool has_int4 = int4(r.format) || std::any_of(r.overrides.begin(), r.overrides.end(), [&](const auto& ov) { return int4(ov.format); });
  const std::string algorithm = r.effective_algorithm();
  const bool clip_search = algorithm == "awq_clip" || algorithm == "awq_full";
  if (has_int4 && target.rfind("q4_0", 0) == 0 && (r.group_size > 0 || clip_search)) {
    r.int4_grid = quant::IntGrid::q4_0;
    if (r.group_size == 0) r.group_size = 32;
    return r;
  }
  // The other integer types: each Linear in the blocks of its tensor's type in the file.
  const exporter::GgufExportOptions go = exporter::gguf_options_from_name(target);
  for (const auto& [module, type] : exporter::gguf_linear_types(go, config)) {
    if (io::ggml_has_grid(type)) r.ggml_blocks[module] = type;
  }
  const bool any = std::any_of(r.ggml_blocks.begin(), r.ggml_blocks.end(), [&](const auto& m) {
    const quant::LinearScheme s = r.scheme_for(m.first);
    return s.weight && s.weight->grid == quant::IntGrid::ggml;
  });
  if (!any) {
    r.ggml_blocks.clear();
    return r;
  }
  if (o.group_size > 0) fail("--group-size {}: a {} GGUF file's blocks set the groups of its weights", o.group_size, target);
  if (clip_search) {
    fail("--algo {}: its clip search is for a symmetric grid; a {} file's blocks take their scales from llama.cpp's own search "
         "(use awq_lite, gptq or awq_lite+gptq)", algorithm, target);
  }
  return r;
}

std::string gguf_target_type(const QuantizeOptions& o, const quant::Recipe& recipe) {
  if (!o.gguf_type.empty()) return o.gguf_type;
  // By default the GGUF type that holds the format's codes (its row's): NVFP4/MXFP4 as such, INT4 as Q4_0, INT8 as Q8_0.
  if (recipe.format == "none") return "bf16";  // pruning alone: nothing to quantize
  const quant::FormatRow* row = quant::find_format(recipe.format);
  if (row == nullptr) fail("unknown format '{}'", recipe.format);
  return row->gguf_type;
}

void check_export_target(const QuantizeOptions& o, const quant::Recipe& recipe) {
  const exporter::ExportTarget& target = exporter::export_target(o.export_format);
  if (!o.gguf_type.empty() && o.export_format != "gguf") fail("--gguf-type applies to --export gguf");
  if (o.export_format == "compressed-tensors") {
    // Refuse a format compressed-tensors cannot hold before any work is done.
    if (!recipe.format.empty() && recipe.format != "none") exporter::compressed_tensors_group(quant::format_scheme(recipe.format, recipe.group_size));
    if (recipe.kv_cache && !quant::kv_scheme(*recipe.kv_cache).compressed_tensors) fail("compressed-tensors has no form for a {} KV cache", *recipe.kv_cache);
  }
  if (o.export_format == "gguf" && !o.gguf_type.empty()) exporter::gguf_options_from_name(o.gguf_type);
  const bool head_quantized = recipe.scheme_for("lm_head").quantized();
  if (head_quantized && !target.holds_quantized_lm_head) {
    fail("--quantize-lm-head: the {} export keeps the lm_head in 16 bits; only --export modelopt holds a quantized lm_head", o.export_format);
  }
}

algo::CalibrationSet calibration_from_options(const QuantizeOptions& o, const io::Checkpoint& ckpt, const quant::Recipe& recipe) {
  algo::CalibrationSet calib;
  const bool need = algo::needs_calibration(ckpt.config(), recipe);
  if (need && o.calib.empty()) {
    if (!recipe.sparsity.empty() && recipe.sparse_algo != "magnitude") {
      fail("--sparse-algo {} needs calibration text (--calib FILE); magnitude pruning does not", recipe.sparse_algo);
    }
    if (recipe.effective_algorithm() != "max") {
      fail("--format {} with algorithm {} needs calibration text (--calib FILE)", recipe.format, recipe.effective_algorithm());
    }
    fail("--format {}{} quantizes activations or the KV cache and needs calibration text (--calib FILE)", recipe.format,
         recipe.kv_cache ? " --kv-cache " + *recipe.kv_cache : "");
  }
  if (!o.calib.empty()) {
    const io::Tokenizer tokenizer = io::Tokenizer::load(o.model);
    std::vector<std::string> docs;
    for (const auto& path : o.calib) {
      for (auto& d : io::read_documents(path)) docs.push_back(std::move(d));
    }
    calib = algo::make_calibration_set(docs, tokenizer, recipe.calib_size, recipe.seq_len, recipe.seed);
    fmt::print(stderr, "calibration: {} samples, {} tokens (seq-len {}, seed {})\n", calib.sequences.size(), calib.tokens(),
               recipe.seq_len, recipe.seed);
  }
  return calib;
}

std::uint64_t convert_export(const std::string& modelopt_dir, const QuantizeOptions& o, const quant::Recipe& recipe, std::uint64_t modelopt_bytes) {
  std::uint64_t output_bytes = modelopt_bytes;
  if (o.export_format == "compressed-tensors") {
    const auto r = exporter::export_compressed_tensors(modelopt_dir, o.out_dir, 4ull << 30, !recipe.sparsity.empty());
    output_bytes = r.bytes;
    if (r.sparse_linears > 0) {
      fmt::print(stderr, "compressed-tensors: {} linears 2:4 sparse ({}{})\n", r.sparse_linears, r.sparsity_format,
                 r.sparsity_format == "dense" ? ": packed codes keep their zeros in place" : "");
    }
  } else if (o.export_format == "gguf") {
    const exporter::GgufExportOptions go = exporter::gguf_options_from_name(gguf_target_type(o, recipe));
    const auto r = exporter::export_gguf(modelopt_dir, o.out_dir, go);
    output_bytes = std::filesystem::file_size(o.out_dir);
    fmt::print(stderr, "gguf: {} quantized linears written code for code, {} quantized to the GGUF type{}\n", r.exact_linears,
               r.requantized_linears, r.activation_quantization_dropped ? " (llama.cpp does not quantize activations as this format does)" : "");
  }
  return output_bytes;
}

namespace {

// What the grids of a GGUF target mean for the weights, before the work starts.
void print_grid_notes(const quant::Recipe& recipe) {
  if (recipe.int4_grid == quant::IntGrid::q4_0) {
    fmt::print(stderr, "int4: on Q4_0's grid for the GGUF file (16 levels, its f16 block scales), groups of {}\n", recipe.group_size);
  }
  if (!recipe.ggml_blocks.empty()) {
    std::map<std::string, int> counts;
    for (const auto& [module, type] : recipe.ggml_blocks) {
      const quant::LinearScheme s = recipe.scheme_for(module);
      if (s.weight && s.weight->grid == quant::IntGrid::ggml) ++counts[std::string(io::ggml_type_info(static_cast<std::uint32_t>(type))->name)];
    }
    std::string list;
    for (const auto& [name, n] : counts) list += fmt::format("{}{} {}", list.empty() ? "" : ", ", n, name);
    const std::string algorithm = recipe.effective_algorithm();
    fmt::print(stderr, "weights in the GGUF file's own blocks ({}): llama.cpp's quantizer sets their scales, {}\n", list,
               algorithm == "max" ? "the weights are rounded on them" : algorithm + " searches and rounds on them");
  }
}

// One line per layer (and the lm_head): formats, errors (before and after an algorithm), seconds; the pruning summary.
void print_layer_table(const algo::PtqReport& report, const quant::Recipe& recipe) {
  const bool with_algorithm = report.algorithm != "max";
  if (with_algorithm) {
    fmt::print("{:>5}  {:<24} {:>12} {:>12} {:>12} {:>8}  {}\n", "layer", "format", "weight err", "out err rtn", "out err " + report.algorithm,
               "seconds", "notes");
  } else {
    fmt::print("{:>5}  {:<24} {:>12} {:>12} {:>8}\n", "layer", "format", "weight err", "output err", "seconds");
  }
  for (const auto& l : report.layers) {
    if (!with_algorithm) {
      fmt::print("{:>5}  {:<24} {:>12} {:>12} {:>8.2f}\n", l.layer, l.formats, format_error(l.weight_error), format_error(l.output_error), l.seconds);
      continue;
    }
    fmt::print("{:>5}  {:<24} {:>12} {:>12} {:>12} {:>8.2f}  {}\n", l.layer, l.formats, format_error(l.weight_error), format_error(l.output_error_rtn),
               format_error(l.output_error), l.seconds, algorithm_notes(l));
  }
  if (report.head) {
    const auto& h = *report.head;
    if (with_algorithm) {
      const std::string notes = algorithm_notes(h);
      fmt::print("{:>5}  {:<24} {:>12} {:>12} {:>12} {:>8.2f}  {}\n", "head", "lm_head " + h.formats, format_error(h.weight_error),
                 format_error(h.output_error_rtn), format_error(h.output_error), h.seconds, notes + (notes.empty() ? "" : "; ") + "output err: logits");
    } else {
      fmt::print("{:>5}  {:<24} {:>12} {:>12} {:>8.2f}  {}\n", "head", "lm_head " + h.formats, format_error(h.weight_error), format_error(h.output_error),
                 h.seconds, "(output err: logits)");
    }
  }
  if (report.sparse_linears > 0) {
    double err = 0.0;
    for (const auto& l : report.layers) err += l.sparse_weight_error * l.sparse_linears;
    int retries = 0, fallbacks = 0;
    for (const auto& l : report.layers) {
      retries += l.sparse_retries;
      fallbacks += l.sparse_fallbacks;
    }
    fmt::print("pruned {} linears to 2:4 ({}); mean ||W_pruned - W|| / ||W|| {:.4f}{}{}\n", report.sparse_linears, recipe.sparse_algo,
               err / static_cast<double>(report.sparse_linears), retries > 0 ? fmt::format("; {} damping retries", retries) : "",
               fallbacks > 0 ? fmt::format("; {} Linears fell back to magnitude order (indefinite Hessian)", fallbacks) : "");
  }
}

struct RunSizes {
  std::uint64_t source_bytes = 0, output_bytes = 0;
  double seconds = 0.0;
  std::uint64_t peak_rss_bytes = 0;
};

// --report: the run as JSON.
void write_report(const QuantizeOptions& o, const quant::Recipe& recipe, const algo::PtqReport& report, const RunSizes& sizes) {
  json layers = json::array();
  for (const auto& l : report.layers) {
    json alphas = json::object();
    for (const auto& [name, alpha] : l.alphas) alphas[name] = alpha;
    layers.push_back({{"layer", l.layer},
                      {"format", l.formats},
                      {"weight_error", l.weight_error},
                      {"output_error", l.output_error < 0.0 ? json(nullptr) : json(l.output_error)},
                      {"output_error_rtn", l.output_error_rtn < 0.0 ? json(nullptr) : json(l.output_error_rtn)},
                      {"awq_alpha", alphas},
                      {"gptq_damping_retries", l.gptq_retries},
                      {"gptq_fallbacks", l.gptq_fallbacks},
                      {"sparse_linears", l.sparse_linears},
                      {"sparse_weight_error", l.sparse_weight_error},
                      {"seconds", l.seconds}});
  }
  json j = {{"model", o.model},
            {"out", o.out_dir},
            {"format", recipe.format},
            {"algorithm", recipe.effective_algorithm()},
            {"kv_cache", recipe.kv_cache ? json(*recipe.kv_cache) : json(nullptr)},
            {"calibrator", quant::calib_method_name(recipe.calibrator)},
            {"calib_samples", report.calib_sequences},
            {"calib_tokens", report.calib_tokens},
            {"quantized_linears", report.quantized_linears},
            {"sparsity", recipe.sparsity.empty() ? json(nullptr) : json(recipe.sparsity)},
            {"sparse_algo", recipe.sparsity.empty() ? json(nullptr) : json(recipe.sparse_algo)},
            {"sparse_linears", report.sparse_linears},
            {"source_bytes", sizes.source_bytes},
            {"export", o.export_format},
            {"output_bytes", sizes.output_bytes},
            {"seconds", sizes.seconds},
            {"peak_rss_bytes", sizes.peak_rss_bytes},
            {"layers", layers},
            {"lm_head", report.head ? json{{"format", report.head->formats},
                                           {"weight_error", report.head->weight_error},
                                           {"logits_error", report.head->output_error < 0.0 ? json(nullptr) : json(report.head->output_error)},
                                           {"seconds", report.head->seconds}}
                                    : json(nullptr)}};
  io::write_file_atomically(o.report, j.dump(2) + "\n");
}

}  // namespace

int run_quantize(const QuantizeOptions& o) {
  if (o.auto_bits != 0.0) return run_auto_quantize(o);
  const auto start = std::chrono::steady_clock::now();
  if (!(o.gptq_damp > 0.0) || !std::isfinite(o.gptq_damp)) fail("--gptq-damp {} is not a positive number", o.gptq_damp);
  quant::Recipe from_options = recipe_from_options(o);
  check_export_target(o, from_options);
  if (std::filesystem::exists(o.out_dir)) fail("{}: already exists (choose a new output)", o.out_dir);
  if (load::is_quantized_checkpoint(o.model)) fail("{}: already quantized; quantize the original checkpoint", o.model);
  const io::Checkpoint ckpt = io::Checkpoint::open(o.model);
  const quant::Recipe recipe = with_gguf_target_grid(o, std::move(from_options), ckpt.config());
  const algo::CalibrationSet calib = calibration_from_options(o, ckpt, recipe);

  // Another format is converted from the modelopt checkpoint, written first into a temporary directory beside the output.
  io::ScratchDir staging;
  std::string modelopt_dir = o.out_dir;
  if (exporter::export_target(o.export_format).converted_from_modelopt) modelopt_dir = staging.create(o.out_dir) + "/modelopt";
  print_grid_notes(recipe);
  exporter::HfModeloptWriter writer(ckpt, modelopt_dir, recipe);
  algo::PtqOptions options;
  options.fold_pre_quant_scales = !exporter::export_target(o.export_format).stores_pre_quant_scale;
  options.propagate_quantized = o.propagate_quantized;
  options.batch_sequences = o.calib_batch;
  options.gptq_damp = o.gptq_damp;
  options.gptq_act_order = o.gptq_act_order;
  const algo::PtqReport report =
      algo::quantize_checkpoint(ckpt, recipe, calib, options, [&](quant::QuantizedLayer&& layer) { writer.add_layer(layer); },
                                [&](quant::QuantizedLayer&& head) { writer.add_head(head); });
  writer.finish();
  const std::uint64_t output_bytes = convert_export(modelopt_dir, o, recipe, writer.bytes_written());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::uint64_t peak = peak_rss_bytes();

  std::uint64_t source_bytes = 0;
  for (const auto& loc : ckpt.tensors().all()) source_bytes += loc.entry->end - loc.entry->begin;

  print_layer_table(report, recipe);
  fmt::print("quantized {} linears of {} layers to {} ({}{}); {:.1f} MiB -> {:.1f} MiB; {:.1f} s; peak RSS {:.1f} MiB\n",
             report.quantized_linears, report.layers.size(), recipe.format, recipe.effective_algorithm(),
             recipe.kv_cache ? ", kv " + *recipe.kv_cache : "", static_cast<double>(source_bytes) / (1 << 20),
             static_cast<double>(output_bytes) / (1 << 20), seconds, static_cast<double>(peak) / (1 << 20));
  fmt::print("wrote {}\n", o.out_dir);

  if (!o.report.empty()) write_report(o, recipe, report, {source_bytes, output_bytes, seconds, peak});
  return 0;
}

}  // namespace mopt::cli
