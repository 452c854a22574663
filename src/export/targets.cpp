#include "export/targets.h"

#include "core/error.h"

namespace mopt::exporter {

const std::vector<ExportTarget>& export_targets() {
  static const std::vector<ExportTarget> targets = {
      {"modelopt", true, true, false},
      {"compressed-tensors", false, false, true},  // no pre_quant_scale: vLLM's schemes take the input as it is
      {"gguf", false, false, true},                // llama.cpp scales no input
  };
  return targets;
}

const ExportTarget& export_target(std::string_view name) {
  std::string names;
  for (const auto& t : export_targets()) {
    if (t.name == name) return t;
    names += (names.empty() ? "" : ", ") + t.name;
  }
  fail("--export {}: one of {}", name, names);
}

}  // namespace mopt::exporter
