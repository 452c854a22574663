#include <fmt/format.h>

#include <algorithm>

#include <cstdio>

#include "algo/sparsity.h"
#include "cli/commands.h"
#include "cli/format.h"
#include "load/load_model.h"
#include "load/summary.h"
#include "model/llama.h"

namespace mopt::cli {

namespace {

// How many of the decoder Linears are 2:4 sparse (every group of 4 input columns with at most 2
// non-zeros), read as evaluation loads them (quantized ones dequantized).
nlohmann::json sparsity_summary(const std::string& path) {
  const model::Model m = load::load_model(path, load::QuantizedRun::fake_quant);
  std::int64_t linears = 0, sparse = 0;
  std::uint64_t zeros = 0, weights = 0;
  std::vector<std::string> dense;
  for (std::int64_t l = 0; l < m.num_layers(); ++l) {
    for (const auto kind : model::kAllLinears) {
      const model::Linear& lin = m.layer(l).linear(kind);
      const std::vector<float> w = lin.weight_f32();
      const std::int64_t out = lin.out_features(), in = lin.in_features();
      ++linears;
      if (algo::is_24_sparse(w.data(), out, in)) ++sparse;
      else dense.push_back(fmt::format("model.layers.{}.{}", l, model::linear_name(kind)));
      zeros += static_cast<std::uint64_t>(std::count(w.begin(), w.end(), 0.0f));
      weights += w.size();
    }
  }
  return {{"linears", linears}, {"sparse_24", sparse}, {"zero_fraction", weights ? static_cast<double>(zeros) / static_cast<double>(weights) : 0.0},
          {"dense", dense}};
}

}  // namespace

int run_inspect(const InspectOptions& options) {
  nlohmann::json s = load::summarize(options.path);
  if (options.sparsity) s["sparsity"] = sparsity_summary(options.path);
  if (options.json) {
    nlohmann::json out = s;
    if (!options.tensors) out.erase("tensors");
    fmt::print("{}\n", out.dump(2));
    return 0;
  }
  auto row = [](const char* key, const std::string& value) { fmt::print("{:<14}{}\n", key, value); };
  row("path", s["path"].get<std::string>());
  if (s["kind"] == "model") {
    row("architecture", fmt::format("{} ({})", s["architecture"].get<std::string>(), s["model_type"].get<std::string>()));
    row("layers", std::to_string(s["num_layers"].get<std::int64_t>()));
    row("hidden", fmt::format("{} (intermediate {})", s["hidden_size"].get<std::int64_t>(),
                              s["intermediate_size"].get<std::int64_t>()));
    row("heads", fmt::format("{} query, {} key/value, head_dim {}", s["num_heads"].get<std::int64_t>(),
                             s["num_kv_heads"].get<std::int64_t>(), s["head_dim"].get<std::int64_t>()));
    row("vocab", std::to_string(s["vocab_size"].get<std::int64_t>()));
    row("rope", fmt::format("theta {}, scaling {}", s["rope_theta"].get<double>(), s["rope_scaling"].get<std::string>()));
    row("tied lm_head", s["tie_word_embeddings"].get<bool>() ? "yes" : "no");
    row("dtype", s["dtype"].get<std::string>());
    if (s.contains("quantization") && s["quantization"].is_object()) {
      const auto& q = s["quantization"];
      std::string text = q.contains("quant_algo") && q["quant_algo"].is_string() ? q["quant_algo"].get<std::string>() : "none";
      if (q.contains("group_size") && q["group_size"].is_number()) text += fmt::format(", group {}", q["group_size"].get<std::int64_t>());
      if (q.contains("kv_cache_quant_algo") && q["kv_cache_quant_algo"].is_string()) text += ", KV cache " + q["kv_cache_quant_algo"].get<std::string>();
      if (q.contains("quantized_layers") && q["quantized_layers"].is_object()) text += fmt::format(" ({} layers listed)", q["quantized_layers"].size());
      // The reference's exports list lm_head among the excluded modules unless it was quantized.
      if (q.contains("exclude_modules") && q["exclude_modules"].is_array()) {
        const auto& ex = q["exclude_modules"];
        if (std::find(ex.begin(), ex.end(), "lm_head") == ex.end()) text += ", lm_head quantized";
      }
      row("quantized", text);
    }
  }
  if (s["kind"] == "gguf") {
    row("format", fmt::format("GGUF v{}, {} metadata entries", s["gguf_version"].get<std::uint32_t>(), s["metadata_count"].get<std::uint64_t>()));
    if (s.contains("architecture")) row("architecture", s["architecture"].get<std::string>());
    if (s.contains("num_layers")) row("layers", std::to_string(s["num_layers"].get<std::uint64_t>()));
    if (s.contains("hidden_size")) row("hidden", std::to_string(s["hidden_size"].get<std::uint64_t>()));
  }
  const auto params = s["parameters"].get<std::uint64_t>();
  row("parameters", fmt::format("{} ({})", with_thousands(params), short_count(params)));
  const auto nfiles = s["files"].size();
  row("tensors", fmt::format("{} in {} file{}", s["tensor_count"].get<std::uint64_t>(), nfiles, nfiles == 1 ? "" : "s"));
  for (const auto& [dtype, bytes] : s["bytes_by_dtype"].items()) {
    row("bytes", fmt::format("{} {} ({})", dtype, with_thousands(bytes.get<std::uint64_t>()), byte_size(bytes.get<std::uint64_t>())));
  }
  row("total size", byte_size(s["total_bytes"].get<std::uint64_t>()));
  if (s.contains("sparsity")) {
    const auto& sp = s["sparsity"];
    row("sparsity", fmt::format("2:4 in {} of {} decoder Linears; {:.1f}% of their weights are zero", sp["sparse_24"].get<std::int64_t>(),
                                sp["linears"].get<std::int64_t>(), 100.0 * sp["zero_fraction"].get<double>()));
  }
  if (options.tensors) {
    std::size_t width = 4;
    for (const auto& t : s["tensors"]) width = std::max(width, t["name"].get<std::string>().size());
    fmt::print("\n{:<{}}  {:<8} {:<16} {:>12}  {}\n", "name", width, "dtype", "shape", "bytes", "file");
    for (const auto& t : s["tensors"]) {
      std::string shape = "[";
      for (std::size_t i = 0; i < t["shape"].size(); ++i) shape += (i ? ", " : "") + std::to_string(t["shape"][i].get<std::int64_t>());
      shape += "]";
      fmt::print("{:<{}}  {:<8} {:<16} {:>12}  {}\n", t["name"].get<std::string>(), width, t["dtype"].get<std::string>(),
                 shape, with_thousands(t["bytes"].get<std::uint64_t>()), t["file"].get<std::string>());
    }
  }
  return 0;
}

}  // namespace mopt::cli
