// What `mopt quantize` and `mopt train --qat` share: the recipe from the flags, the refusals made
// before any work, the calibration text, and the conversion of a written modelopt checkpoint into
// the other export formats.
#pragma once

#include <cstdint>
#include <string>

#include "algo/ptq.h"
#include "cli/commands.h"
#include "io/checkpoint.h"
#include "quant/recipe.h"

namespace mopt::cli {

// The recipe: --recipe's file, then the flags over it; validated.
quant::Recipe recipe_from_options(const QuantizeOptions& o);
// The GGUF type --export gguf writes: --gguf-type, else the one that holds the format's codes.
std::string gguf_target_type(const QuantizeOptions& o, const quant::Recipe& recipe);
// For `mopt quantize --export gguf`, the weights quantized as the file stores them: every INT4 block or
// INT8 per-channel weight in the ggml blocks llama-quantize's mix of the integer type (q4_0, q4_k_m,
// q4_k, q6_k, q5_0, q8_0, ...) gives its tensor (Recipe::ggml_blocks), for the model of `config`. To
// Q4_0 with a group size (a multiple of 32) or a clip search (awq_clip, awq_full): the INT4 weights on
// Q4_0's grid in those groups (32 with a clip search and no size). Other exports and targets: the
// recipe unchanged.
quant::Recipe with_gguf_target_grid(const QuantizeOptions& o, quant::Recipe recipe, const io::ModelConfig& config);
// Refuses, before any work, an export format that does not exist or cannot hold the recipe.
void check_export_target(const QuantizeOptions& o, const quant::Recipe& recipe);
// The calibration set from --calib (empty when none is given); an error when the recipe needs one
// and none is given. `verb` names the command in the message ("quantize", "train --qat").
algo::CalibrationSet calibration_from_options(const QuantizeOptions& o, const io::Checkpoint& checkpoint, const quant::Recipe& recipe);
// Writes o.out_dir from the modelopt checkpoint at `modelopt_dir` for --export compressed-tensors or
// gguf (nothing for modelopt); returns the bytes of the output.
std::uint64_t convert_export(const std::string& modelopt_dir, const QuantizeOptions& o, const quant::Recipe& recipe, std::uint64_t modelopt_bytes);

}  // namespace mopt::cli
