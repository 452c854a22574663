#include <fmt/format.h>

#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
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
  if (options.to != "gguf") fail("--to {}: mopt exports to gguf (compressed-tensors is not built yet)", options.to);
  exporter::GgufExportOptions o;
  o.type = exporter::gguf_type_from_name(options.type);
  exporter::export_gguf(options.model, options.out, o);
  fmt::print("wrote {}\n", options.out);
  return 0;
}

}  // namespace mopt::cli
