// Reading compressed-tensors checkpoints (llm-compressor's format, vLLM's own
// path; export/compressed_tensors.h writes them): config.json's
// quantization_config groups matched to each Linear, pack-quantized and
// nvfp4-pack-quantized codes unpacked, float- and int-quantized weights as
// stored, sparse-24-bitmask weights made dense, into the modelopt layout
// (load/quantized.h), so the model computes exactly what the export does.
#pragma once

#include <string>

#include "io/checkpoint.h"
#include "load/quantized.h"

namespace mopt::load {

// True when config.json has quantization_config.quant_method "compressed-tensors".
bool is_compressed_tensors_checkpoint(const std::string& dir);

// The tensors the format adds beside config.json's (packed codes, scales, 2:4 parts) and
// the Linear weights it stores under other names.
io::TensorLayout compressed_tensors_layout();

QuantizedReader compressed_tensors_reader(const std::string& dir);

// Whether a config group's target (or an ignore entry) names `module`: "Linear", the exact module
// name, or "re:REGEX" matched from the start, as compressed-tensors matches them.
bool compressed_tensors_target_matches(const std::string& target, const std::string& module);

}  // namespace mopt::load
