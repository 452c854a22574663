// Loading a quantized checkpoint into the model: every stored format (modelopt,
// compressed-tensors) is read through a `QuantizedReader` that hands each
// quantized Linear over in one layout, the modelopt one (quant/qtensor.h),
// whatever the file's own. `load_quantized` turns those into the model's
// Linears: the weights kept quantized for the kernels (or dequantized), the
// inputs and keys/values fake-quantized as the checkpoint's scales say.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "io/checkpoint.h"
#include "kernels/qlinear.h"
#include "model/llama.h"
#include "quant/qtensor.h"
#include "quant/recipe.h"

namespace mopt::load {

// One quantized Linear of a stored checkpoint, in the modelopt layout
// (quant/qtensor.h) whatever the file's own format.
struct StoredLinear {
  std::string name;  // "model.layers.3.self_attn.q_proj"
  quant::LinearScheme scheme;
  quant::QuantizedWeight weight;
  std::int64_t out = 0, in = 0;
  std::vector<float> pre_quant_scale;  // empty: none
  std::optional<float> input_scale;    // the static activation scale (amax / bound), when the scheme has one
};

// How a quantized checkpoint format is read: its tensor layout, its Linears (nothing for one
// stored plain) and its KV-cache scales.
struct QuantizedReader {
  io::TensorLayout layout;
  std::function<std::optional<StoredLinear>(const io::Checkpoint&, std::int64_t layer, model::LinearKind)> linear;
  // The lm_head when it is stored quantized (empty function or nothing: a 16-bit head).
  std::function<std::optional<StoredLinear>(const io::Checkpoint&)> head;
  std::string kv_algo;  // "", "FP8", "NVFP4"
  std::function<std::pair<float, float>(const io::Checkpoint&, std::int64_t layer)> kv_scales;  // k_scale, v_scale
  // An unquantized Linear's weight stored in another form (compressed-tensors' sparse-24-bitmask),
  // dense; nothing (or no function): module.weight as stored.
  std::function<std::optional<Tensor>(const io::Checkpoint&, const std::string& module)> dense_weight;
};

// config.json's quantization_config.quant_method in `dir` ("modelopt", "compressed-tensors"); empty
// when there is none, or no readable config.json (opening the checkpoint reports that one).
std::string config_quant_method(const std::string& dir);

// [out, in] of Linear `kind` under `config`.
std::pair<std::int64_t, std::int64_t> linear_shape(const io::ModelConfig& config, model::LinearKind kind);

// How a quantized checkpoint's Linears run.
enum class QuantizedRun {
  kernels,     // weights stay quantized and run by the quantized kernels (kernels/qlinear.h)
  fake_quant,  // weights dequantized to f32 (the definition the kernels are held to)
};

// The weight of a stored Linear in the kernels' terms (codes, scales, W8A8's input amax).
kernels::QuantizedWeightSource kernel_source(const StoredLinear& stored);

// A model whose quantized Linears fake-quantize their inputs (and keys/values) as the
// checkpoint's scales say, with weights run as `run` says (W8A8 with the kernels quantizes
// its input to int8 inside the kernel).
model::Model load_quantized(const std::string& dir, const QuantizedReader& reader, QuantizedRun run = QuantizedRun::kernels);

}  // namespace mopt::load
