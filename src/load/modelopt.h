// Reading the Hugging Face "modelopt" checkpoint (export/hf_modelopt.h writes
// it): hf_quant_config.json (or config.json's quantization_config), and each
// quantized Linear as P.weight codes, P.weight_scale, P.weight_scale_2,
// P.input_scale, P.pre_quant_scale; self_attn.k_proj.k_scale / v_proj.v_scale.
// Also mopt's own staging forms of it (INT4 on Q4_0's grid, GGUF blocks),
// which only the GGUF export reads.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "io/checkpoint.h"
#include "load/quantized.h"

namespace mopt::load {

// True when `dir` holds a modelopt checkpoint (hf_quant_config.json, or a config.json
// "quantization_config" with quant_method "modelopt").
bool is_modelopt_checkpoint(const std::string& dir);

// Its quantization description: hf_quant_config.json's "quantization" object, or config.json's
// quantization_config when there is no hf_quant_config.json; `label` receives the file read. Throws
// Error naming the file when neither holds an object.
nlohmann::json modelopt_quantization(const std::string& dir, std::string* label = nullptr);

// The tensors the format adds beside config.json's: the scales above (the lm_head's too).
io::TensorLayout modelopt_layout();

// The format's reader; throws Error naming the file for a config it cannot read.
QuantizedReader modelopt_reader(const std::string& dir);

// Opens a modelopt checkpoint and checks every quantized Linear's codes and
// scales against its format (dtypes, shapes, finite positive scales) without
// dequantizing anything; throws Error naming the file and tensor.
void validate_modelopt_checkpoint(const std::string& dir);

}  // namespace mopt::load
