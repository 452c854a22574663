// The loading rules of the serving engines (../shared/reference/FORMATS.md §5,
// §6), applied to a checkpoint directory without the engines: which
// quantization configs each accepts, and the names, dtypes and shapes of the
// tensors it reads for every Linear. An empty list means the engine's loader
// finds what it needs; each entry names the file or tensor and the rule.
//
//   vllm      config.json quantization_config: modelopt (FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO,
//             NVFP4, W4A16_NVFP4, MXFP8, MIXED_PRECISION of those) or compressed-tensors
//             (pack-quantized W4A16/W8A16, int-quantized W8A8, float-quantized FP8, nvfp4-pack-quantized).
//   trtllm    hf_quant_config.json (it takes precedence) with a "quantization" object, any algorithm
//             mopt writes; W4A16_AWQ/W4A8_AWQ per-Linear tensors; W4A8 scales equal across fused groups;
//             or compressed-tensors 8-bit FP8 only.
#pragma once

#include <string>
#include <vector>

namespace mopt::exporter {

enum class Engine { vllm, trtllm };
const char* engine_name(Engine engine);

std::vector<std::string> check_engine_rules(const std::string& dir, Engine engine);

}  // namespace mopt::exporter
