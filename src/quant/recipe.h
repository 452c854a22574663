// Named formats (presets named and defaulted like NVIDIA Model Optimizer's
// configs), and a recipe: which format each Linear of the model gets, the KV
// cache format, the calibrator and the algorithm.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "quant/calibrator.h"
#include "quant/formats.h"
#include "quant/spec.h"

namespace mopt::quant {

// What one Linear gets.
struct LinearScheme {
  std::string format;                  // preset name, "" when left unquantized
  std::string quant_algo;              // the export's name for it ("FP8", "W4A16_AWQ", "NVFP4", ...)
  std::optional<QuantizerSpec> weight;
  std::optional<QuantizerSpec> input;  // absent: weight-only
  std::string default_algorithm;       // the preset's algorithm: "max", "awq_lite", "smoothquant"
  bool quantized() const { return weight.has_value(); }
};

// The presets (quant/formats.h's table): fp8, fp8_pc_pt, fp8_block, int8, int8_sq, int8_wo,
// int4_rtn, int4_awq, w4a8_awq, nvfp4, nvfp4_awq, mxfp8, mxfp4; "none" (no quantization) is accepted
// by format_scheme and recipes but not listed.
const std::vector<std::string>& format_names();
// The calibration algorithms: max, smoothquant, awq_lite, awq_clip, awq_full, gptq, awq_lite+gptq.
const std::vector<std::string>& algorithm_names();
// Throws when `algorithm` cannot run on Linears quantized as `scheme` (SmoothQuant: W8A8 only;
// AWQ-clip: INT4 blocks; GPTQ: INT4/INT8/FP8 with static scales).
void check_algorithm_supports(const std::string& algorithm, const LinearScheme& scheme);
// True for the formats whose weight blocks a group size sets (their row says so: int4_rtn, int4_awq, w4a8_awq).
bool format_takes_group_size(const std::string& name);
// The scheme of a named format (its row); `group_size` > 0 replaces the INT4 block (128).
// Throws Error naming the known formats for an unknown name.
LinearScheme format_scheme(const std::string& name, std::int64_t group_size = 0);

// Glob match on module names: '*' any run of characters (dots included), '?' one character.
bool glob_match(std::string_view pattern, std::string_view name);

// The reference's modules that stay unquantized by default (lm_head, routers, ...).
const std::vector<std::string>& default_exclusions();

struct FormatOverride {
  std::string pattern;  // glob on the module name, e.g. "*.mlp.down_proj"
  std::string format;   // a format name, or "none"
};

struct Recipe {
  std::string format;                  // the default format of every Linear
  std::int64_t group_size = 0;         // 0: the format's own
  std::string algorithm;               // "" = the format's default
  std::optional<std::string> kv_cache; // "fp8" / "nvfp4"
  CalibMethod calibrator = CalibMethod::max;  // for static activation amax
  double percentile = 99.99;
  std::vector<std::string> exclude;    // globs on module names, after default_exclusions()
  std::vector<FormatOverride> overrides;  // applied in order, later ones win; exclusion wins over all
  // Quantize the lm_head too (module "lm_head"; the reference leaves it 16-bit by default): the
  // default format, or an override's for "lm_head". Round-to-nearest (SmoothQuant's scale for W8A8).
  bool quantize_lm_head = false;
  // 2:4 structured sparsity ("" = none, "2:4"): every decoder Linear but the output heads and
  // `sparse_exclude`'s globs, pruned by `sparse_algo` (magnitude, sparsegpt, sparsegpt-mask) before it
  // is quantized; `format` "none" prunes without quantizing.
  std::string sparsity;
  std::string sparse_algo = "magnitude";
  std::vector<std::string> sparse_exclude;
  // The grid of the INT4 weights (int4_rtn, int4_awq): the reference's, or Q4_0's for a GGUF Q4_0
  // target (the algorithms search and round on the grid the file stores). Not W4A8's FP8 stage.
  IntGrid int4_grid = IntGrid::symmetric;
  // Quantizing for a GGUF file of llama.cpp's k-quant or Q8_0 mixes: module name -> the ggml block type
  // its weight is stored in (Q4_K, Q6_K, Q5_0, Q8_0, ...). Such a module's INT4 block weight (not
  // W4A8's) or INT8 per-channel weight is quantized in those blocks (IntGrid::ggml): llama.cpp's
  // quantizer chooses the scales, AWQ searches and GPTQ rounds on them.
  std::map<std::string, io::GgmlType> ggml_blocks;
  // Calibration data defaults (the CLI can override them).
  std::int64_t calib_size = 128;
  std::int64_t seq_len = 512;
  std::uint64_t seed = 0;

  // The scheme of the module named `module` ("model.layers.3.mlp.down_proj").
  LinearScheme scheme_for(const std::string& module) const;
  // True when the module named `module` is pruned to 2:4 (the shape rules are the algorithm's: algo/sparsity.h).
  bool sparse_for(const std::string& module) const;
  // The algorithm that runs: `algorithm`, else the default format's.
  std::string effective_algorithm() const;
  // Throws Error when a format, KV scheme, calibrator/quantizer pairing or algorithm name is invalid.
  void validate() const;
};

// A recipe from a JSON file: {"format": "nvfp4", "group_size": 128, "algorithm": "max",
// "kv_cache": "fp8", "calibrator": "percentile", "percentile": 99.9, "exclude": [...],
// "overrides": [{"pattern": "*.down_proj", "format": "fp8"}], "calib_size": 64,
// "seq_len": 256, "seed": 0, "sparsity": "2:4", "sparse_algo": "sparsegpt", "sparse_exclude": [...]}.
// "format": "none" quantizes nothing. Unknown keys are an error.
Recipe load_recipe(const std::string& path);
Recipe parse_recipe(const std::string& json_text, const std::string& label);

}  // namespace mopt::quant
