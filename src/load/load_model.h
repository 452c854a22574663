// Loading any checkpoint mopt reads as a model: a plain Hugging Face
// directory, a modelopt or compressed-tensors quantized one, or a llama.cpp
// .gguf file. The one place that tells the formats apart.
#pragma once

#include <optional>
#include <string>

#include "io/checkpoint.h"
#include "load/quantized.h"
#include "model/llama.h"

namespace mopt::load {

enum class CheckpointFormat { plain, modelopt, compressed_tensors, gguf };

// What `path` holds: a .gguf file, or a directory whose config says modelopt or compressed-tensors;
// plain otherwise (a path that holds nothing included: opening it reports that).
CheckpointFormat checkpoint_format(const std::string& path);

// True for a modelopt or compressed-tensors directory.
bool is_quantized_checkpoint(const std::string& path);

// The reader of a quantized directory's format; nothing for a plain one.
std::optional<QuantizedReader> quantized_reader(const std::string& dir);

// Opens a checkpoint directory of any format, validated against config.json under its format's layout.
io::Checkpoint open_checkpoint(const std::string& dir);

// Loads a checkpoint of any format (a .gguf file dequantized to f32).
model::Model load_model(const std::string& path, QuantizedRun run = QuantizedRun::kernels);

}  // namespace mopt::load
