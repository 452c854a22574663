// Post-training quantization, layer by layer (DESIGN.md's one data flow):
// embed the calibration tokens once, then for each decoder layer
//   1. run it with its original weights on the calibration activations,
//      observing the input of every Linear and the keys/values after RoPE;
//   2. calibrate and quantize its weights (real codes and scales);
//   3. run it again with the quantized weights and quantized activations to
//      measure its output error, and (when asked) to produce the next layer's
//      inputs from the quantized layer;
//   4. hand the result to the sink (the exporter) and free it.
// Peak memory is one layer in f32 plus twice the calibration activations,
// whatever the number of layers.
//
// By default the next layer's inputs are the unquantized layer's outputs, as
// the reference's calibration computes them (its quantizers are disabled while
// statistics are collected); `propagate_quantized` feeds the quantized outputs
// instead.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "io/checkpoint.h"
#include "io/tokenizer.h"
#include "quant/quantized_layer.h"
#include "quant/recipe.h"

namespace mopt::algo {

struct CalibrationSet {
  std::vector<std::vector<std::int32_t>> sequences;
  std::int64_t tokens() const;
};

// `n` samples of at most `seq_len` tokens: each document's tokens are cut
// into pieces of seq_len minus the tokenizer's prefix (BOS), each piece gets
// the prefix, and `n` pieces are drawn without replacement with a seeded
// shuffle (all of them when there are fewer, in their order).
CalibrationSet make_calibration_set(const std::vector<std::string>& documents, const io::Tokenizer& tokenizer, std::int64_t n,
                                    std::int64_t seq_len, std::uint64_t seed);

struct PtqOptions {
  bool propagate_quantized = false;
  std::int64_t batch_sequences = 1;  // sequences per forward call (the histogram grows per call)
  double gptq_damp = 0.01;           // GPTQ damping, a fraction of mean(diag H)
  bool gptq_act_order = false;       // GPTQ columns by decreasing H_ii (the reference: natural order)
  // What a target without pre_quant_scale tensors asks for (exporter::ExportTarget::stores_pre_quant_scale
  // false: compressed-tensors, GGUF): every smoothing scale is folded into the layer before it (norms;
  // v_proj/up_proj rows for o_proj/down_proj) or not applied.
  bool fold_pre_quant_scales = false;
  // Hand on each quantized Linear's f32 weight (QuantizedLinear::master_weight) beside its codes.
  bool keep_master_weights = false;
};

struct LayerReport {
  std::int64_t layer = 0;
  std::string formats;         // "nvfp4" or "fp8+int4_rtn(down)" for a mixed layer
  double weight_error = 0.0;   // mean over its quantized Linears of ||dW|| / ||W||
  double output_error = -1.0;  // ||y_q - y|| / ||y|| of the layer output on the calibration data; < 0: not measured
  double output_error_rtn = -1.0;  // the same with round-to-nearest (the "before" of an algorithm); < 0: not measured
  std::vector<std::pair<std::string, float>> alphas;  // AWQ-lite's alpha per Linear
  int gptq_retries = 0;    // Cholesky retries with more damping
  int gptq_fallbacks = 0;  // Linears whose Hessian stayed indefinite (plain rounding)
  int sparse_linears = 0;  // Linears pruned to 2:4
  double sparse_weight_error = 0.0;  // mean over them of ||W_pruned - W|| / ||W|| (before quantization)
  int sparse_retries = 0;    // SparseGPT's Cholesky retries with more damping
  int sparse_fallbacks = 0;  // SparseGPT Linears whose Hessian stayed indefinite (magnitude order)
  double seconds = 0.0;
};

struct PtqReport {
  std::string algorithm;
  std::vector<LayerReport> layers;
  // The lm_head when the recipe quantizes it (layer = -1; output_error: of the logits on up to 128
  // calibration rows; always round-to-nearest, with SmoothQuant's scale folded into the final norm for W8A8).
  std::optional<LayerReport> head;
  std::int64_t calib_sequences = 0;
  std::int64_t calib_tokens = 0;
  std::int64_t quantized_linears = 0;
  std::int64_t sparse_linears = 0;
  double seconds = 0.0;
};

// Receives each quantized layer as it is done; a second one receives the quantized lm_head (a
// QuantizedLayer with index -1: the one Linear "lm_head" and, when an input scale was folded, the
// final norm) after the last layer.
using QuantizedLayerSink = std::function<void(quant::QuantizedLayer&&)>;

// `calibration` may be empty only when nothing needs calibration (weight-only
// formats without a KV-cache format); output errors are then not measured.
PtqReport quantize_checkpoint(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const CalibrationSet& calibration,
                              const PtqOptions& options, const QuantizedLayerSink& sink, const QuantizedLayerSink& head_sink = {});

// True when quantizing a layer's Linears as `scheme` (its q_proj's) moves scales between Linears of
// different input groups: NVFP4_AWQ's export (and any folding export target) multiplies o_proj's and
// down_proj's pre-quantization scales into v_proj's and up_proj's output rows, so those Linears only
// go together.
bool folds_scales_across_linears(const quant::LinearScheme& scheme, const PtqOptions& options);

// True when `recipe` on this model needs calibration data.
bool needs_calibration(const io::ModelConfig& config, const quant::Recipe& recipe);

}  // namespace mopt::algo
