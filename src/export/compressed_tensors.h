// compressed-tensors checkpoints (the format of llm-compressor, vLLM's own
// path for INT4 W4A16): written from a mopt (modelopt-format) export
// (load/compressed_tensors.h reads them back; io/compressed_tensors_packing.h
// holds the tensor encodings).
//
//   mopt format       compressed-tensors format   tensors per Linear
//   int4 (W4A16)      pack-quantized, 4 bits      weight_packed I32 [out, in/8], weight_scale [out, in/g], weight_shape
//   int8_wo (W8A16)   pack-quantized, 8 bits      weight_packed I32 [out, in/4], weight_scale [out, 1], weight_shape
//   int8 (W8A8)       int-quantized               weight I8, weight_scale [out, 1], input_scale [1] (static per tensor)
//   fp8               float-quantized             weight F8_E4M3, weight_scale [1], input_scale [1]
//   fp8_pc_pt         float-quantized             weight F8_E4M3, weight_scale [out, 1] (dynamic per-token inputs)
//   fp8_block         float-quantized             weight F8_E4M3, weight_scale [out/128, in/128]
//   nvfp4(_awq)       nvfp4-pack-quantized        weight_packed U8 [out, in/2], weight_scale F8_E4M3 [out, in/16],
//                                                 weight_global_scale [1] = 1/weight_scale_2, input_global_scale [1]
// FP8 KV cache: self_attn.k_scale / v_scale. The codes and scales are the
// export's own, so the checkpoint computes exactly what the export does.
// compressed-tensors has no pre-quantization scale: a weight-only Linear that
// keeps one (AWQ's o_proj/down_proj) has it folded into its columns and is
// re-quantized (reported); one with quantized inputs cannot and is refused.
// W4A8, MX formats and NVFP4 KV caches have no compressed-tensors form.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "quant/recipe.h"

namespace mopt::exporter {

struct CompressedTensorsReport {
  std::int64_t quantized_linears = 0;
  std::vector<std::string> requantized;  // Linears whose pre_quant_scale was folded in
  std::int64_t sparse_linears = 0;       // stored as 2:4 (sparse_24)
  std::string sparsity_format;           // "sparse-24-bitmask", "dense" or "" (none)
  std::uint64_t bytes = 0;
};

// Writes the compressed-tensors form of the mopt export `quantized_dir` at
// `out_dir` (built beside it and renamed when complete).
// With `sparse_24`, every decoder Linear whose weight is 2:4 sparse is stored as sparse-24-bitmask
// (unquantized, FP8 and INT8 W8A8 weights; packed INT4/INT8/NVFP4 weights stay packed and the
// sparsity_config says "dense"), and `quantized_dir` may be a plain (pruned, unquantized) checkpoint.
CompressedTensorsReport export_compressed_tensors(const std::string& quantized_dir, const std::string& out_dir,
                                                  std::uint64_t shard_bytes = 4ull << 30, bool sparse_24 = false);

// The quantization arguments compressed-tensors uses for a mopt scheme (weights
// and input_activations of a config group, and its format); throws Error for a
// scheme it has no form for.
nlohmann::json compressed_tensors_group(const quant::LinearScheme& scheme);

}  // namespace mopt::exporter
