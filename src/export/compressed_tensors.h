// compressed-tensors checkpoints (the format of llm-compressor, vLLM's own
// path for INT4 W4A16): written from a mopt (modelopt-format) export, read
// back as a model.
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

#include "export/hf_modelopt.h"

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

// Whether a config group's target (or an ignore entry) names `module`: "Linear", the exact module
// name, or "re:REGEX" matched from the start, as compressed-tensors matches them.
bool compressed_tensors_target_matches(const std::string& target, const std::string& module);

// True when config.json has quantization_config.quant_method "compressed-tensors".
bool is_compressed_tensors_checkpoint(const std::string& dir);
QuantizedReader compressed_tensors_reader(const std::string& dir);

// compressed-tensors' sparse-24-bitmask form of a 2:4 sparse [rows, cols] tensor (cols % 4 == 0; any
// dtype of 1, 2 or 4 bytes per element, stored codes included): `compressed` [rows, cols/2] the kept
// values in row order (same dtype), `bitmask` U8 [rows, ceil(cols/8)] (bit j % 8 of byte j / 8 set
// where column j is kept), `shape` I64 [2, 1]. A group with fewer than two non-zeros keeps zeros as
// compressed-tensors 0.14 does (all zero: columns 2, 3; one non-zero at 0: 0, 2; at 1: 1, 3; at 2 or
// 3: 2, 3). Throws Error naming `label` when a group holds more than two non-zeros.
struct Sparse24Bitmask {
  Tensor compressed, bitmask, shape;
};
Sparse24Bitmask sparse24_bitmask_compress(const Tensor& dense, const std::string& label);
// The dense tensor back (pruned positions +0); throws Error naming `label` on inconsistent parts.
Tensor sparse24_bitmask_decompress(const Tensor& compressed, const Tensor& bitmask, const Tensor& shape, const std::string& label);
// True when `dense` [rows, cols] is 2:4 sparse (every group of 4 values with at most 2 non-zeros;
// -0 counts as zero).
bool is_sparse24(const Tensor& dense);

// pack-quantized's packing of signed `bits`-bit codes [rows, cols] into int32
// words along cols (offset 2^(bits-1), the first value in the lowest bits), and back.
Tensor pack_int32_rows(const std::vector<std::int8_t>& codes, std::int64_t rows, std::int64_t cols, int bits);
std::vector<std::int8_t> unpack_int32_rows(const Tensor& packed, std::int64_t rows, std::int64_t cols, int bits);

}  // namespace mopt::exporter
