// The targets `--export` names, one row each. What a target can hold decides what the pipeline does
// before writing to it: a target without pre_quant_scale tensors asks the PTQ pipeline to fold AWQ's
// and SmoothQuant's scales into the weights (algo::PtqOptions::fold_pre_quant_scales), and a target
// written by converting a modelopt export stages that export beside its output.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace mopt::exporter {

struct ExportTarget {
  std::string name;                     // "modelopt", "compressed-tensors", "gguf"
  bool stores_pre_quant_scale = false;  // holds a Linear's input scale as its own tensor
  bool holds_quantized_lm_head = false;
  bool converted_from_modelopt = false;  // written from a modelopt export (export_compressed_tensors, export_gguf)
};

// Every target, in the order `--export` lists them.
const std::vector<ExportTarget>& export_targets();
// The target named `name`; throws Error naming the ones there are.
const ExportTarget& export_target(std::string_view name);

}  // namespace mopt::exporter
