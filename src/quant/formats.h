// The formats mopt knows, one row each: everything a part needs to know about a preset — its
// name, the reference's quant_algo, its weight and input quantizers, whether a group size sets
// its blocks and the default one, its default calibration algorithm, and the GGUF type that holds
// its codes by default. Parts that used to compare preset names read the row instead; a format
// added to the table (or, in a test, with add_format) is known to the recipes, the modelopt
// reader and the CLI's defaults at once.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "quant/spec.h"

namespace mopt::quant {

struct FormatRow {
  std::string name;        // the preset ("int4_awq")
  std::string quant_algo;  // hf_quant_config.json's quant_algo ("W4A16_AWQ"); the reference's case kept
  // The row the modelopt reader rebuilds for `quant_algo` when several presets share it (int4_rtn for
  // W4A16_AWQ: what a file stores does not say which algorithm chose its codes).
  bool reader_row = false;
  QuantizerSpec weight;
  std::optional<QuantizerSpec> input;  // absent: weight-only
  bool group_size_option = false;      // --group-size sets the weight's blocks (INT4)
  std::string default_algorithm = "max";
  std::string gguf_type;  // the GGUF type that holds its codes ("q4_0", "q8_0", "nvfp4", "mxfp4")
  // As the reference's export: the Linears of a fused group (q/k/v, gate/up) share their input amax,
  // per-tensor weight amax and one pre-quantization scale (all but per-tensor FP8, which engines fuse
  // with separate scales).
  bool fused_groups_share_scales = true;
  // NVFP4_AWQ's export: o_proj's and down_proj's pre-quantization scales go into v_proj's and up_proj's
  // output rows.
  bool folds_scales_into_rows = false;
};

// The presets' rows, in the order `mopt quantize --help` lists them.
const std::vector<FormatRow>& format_table();
// The row named `name` (a preset's or an added one); nullptr when there is none.
const FormatRow* find_format(std::string_view name);
// The row the modelopt reader rebuilds for a quant_algo (compared without case, as the reference
// writes some in lower case); nullptr when none.
const FormatRow* format_for_quant_algo(std::string_view quant_algo);
// Adds a row (a name not yet known) for the rest of the process, found by name and quant_algo but not
// listed among the presets: for a test that carries a format of its own through quantize, export,
// load and eval. Throws Error for an empty name or quant_algo, a name already known, or a reader row
// whose quant_algo already reads back as another format.
void add_format(FormatRow row);

// The KV-cache formats (`--kv-cache`), one row each: the keys (after RoPE) and values are fake-
// quantized under one static amax per layer and tensor.
struct KvScheme {
  std::string name;        // "fp8", "nvfp4"
  std::string quant_algo;  // hf_quant_config.json's kv_cache_quant_algo ("FP8", "NVFP4")
  QuantizerSpec spec;
  bool compressed_tensors = false;  // compressed-tensors has a form for it (kv_cache_scheme)
  bool e4m3_cache = false;          // the runtime's cache holds it as E4M3 codes (model::KvCache)
};
const std::vector<KvScheme>& kv_scheme_table();
// The row named `name`; throws Error naming the known ones.
const KvScheme& kv_scheme(std::string_view name);
// The row a checkpoint's kv_cache_quant_algo names (exactly, as the reference writes it); nullptr when none.
const KvScheme* kv_scheme_for_quant_algo(std::string_view quant_algo);

}  // namespace mopt::quant
