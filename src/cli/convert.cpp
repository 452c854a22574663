#include <fmt/format.h>

#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
#include "export/compressed_tensors.h"
#include "export/gguf_export.h"
#include "io/gguf_convert.h"

namespace mopt::cli {

int run_convert(const ConvertOptions& options) {
  std::unique_ptr<Progress> progress;
  io::convert_gguf_to_hf(options.gguf, options.out_dir, [&](std::size_t /*done*/, std::size_t total) {
    if (!progress) progress = std::make_unique<Progress>("convert", total, "tensors");
    progress->advance();
  });
  if (progress) progress->finish();
  fmt::print("wrote {}\n", options.out_dir);
  return 0;
}

int run_export(const ExportOptions& options) {
  if (options.to == "compressed-tensors") {
    const auto r = exporter::export_compressed_tensors(options.model, options.out);
    for (const auto& name : r.requantized) {
      fmt::print(stderr, "note: {} kept a pre_quant_scale (compressed-tensors has none): folded into its columns and re-quantized\n", name);
    }
    fmt::print("wrote {} ({} quantized linears, {:.1f} MiB)\n", options.out, r.quantized_linears, static_cast<double>(r.bytes) / (1 << 20));
    return 0;
  }
  if (options.to != "gguf") fail("--to {}: mopt exports to gguf or compressed-tensors", options.to);
  const exporter::GgufExportOptions o = exporter::gguf_options_from_name(options.type);
  const auto r = exporter::export_gguf(options.model, options.out, o);
  if (r.exact_linears + r.requantized_linears > 0) {
    fmt::print(stderr, "{} quantized linears written code for code, {} dequantized and quantized to {}\n", r.exact_linears, r.requantized_linears,
               o.native ? "Q8_0" : options.type);
  }
  if (r.activation_quantization_dropped) fmt::print(stderr, "note: llama.cpp does not quantize activations as this checkpoint's scheme does\n");
  fmt::print("wrote {}\n", options.out);
  return 0;
}

}  // namespace mopt::cli
