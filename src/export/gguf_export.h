// `mopt export MODEL --to gguf OUT.gguf`: a Hugging Face Llama, Mistral (no
// sliding window), Qwen2 or Qwen3 checkpoint as a llama.cpp GGUF file:
// llama.cpp's tensor names, its Q/K row permutation for llama (FORMATS.md
// 7.6), norms and biases in F32, the other weights in the chosen
// type (F32, F16, BF16, or llama-quantize's Q8_0, Q5_0, Q4_0, Q6_K and
// Q4_K_M mixes, or every matrix in one of Q4_0, Q5_0, Q4_K; quantized as
// llama.cpp's reference quantizers do), in llama.cpp's tensor order, llama3
// RoPE scaling as rope_freqs, and the byte-level BPE tokenizer as
// tokenizer.ggml.* metadata with the pre-tokenizer llama.cpp names
// (llama-bpe, qwen2, smollm, gpt-2). `mopt convert` reads it back.
//
// A quantized mopt export (modelopt or compressed-tensors) is read as such:
// INT4 weights with groups of a multiple of 32 go to Q4_0 and INT8 rows to
// Q8_0 code for code (scales rounded to f16), so AWQ's and GPTQ's choices
// reach llama.cpp unchanged; other weights are dequantized (a kept
// pre_quant_scale multiplied into the columns) and quantized to the type;
// the 16-bit embedding and head take the mix's types (Q4_0: head Q6_K).
// llama.cpp does not quantize activations as W8A8/FP8 schemes do.
//
// MLP biases are written for llama (llama.cpp reads ffn_*.bias there).
// Not yet: Mistral's sliding window, SentencePiece vocabularies.
#pragma once

#include <nlohmann/json.hpp>
#include <cstdint>
#include <map>
#include <string>

#include "io/gguf.h"
#include "io/hf_config.h"

namespace mopt::exporter {

struct GgufExportOptions {
  io::GgmlType type = io::GgmlType::BF16;  // the file's type; norms, biases and other vectors stay F32
  // How each weight matrix's type follows from `type`. By default as llama-quantize chooses for the file
  // type of that name (llama_tensor_get_type in llama.cpp's src/llama-quant.cpp, without an importance
  // matrix): the output embedding (the token embedding when the head is tied) gets Q6_K unless the type is
  // Q8_0 (or Q8_0 itself when its rows are not whole blocks of the type), the rest `type`. `pure` is
  // llama-quantize's --pure: every matrix `type`. Either way a row that is not whole blocks falls back as
  // llama.cpp's does (Q4_K to Q5_0, Q6_K to Q8_0, then F16 when even 32 does not divide it).
  bool pure = false;
  // llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output (or tied) embedding and for attn_v and
  // ffn_down in the first and last eighth of the layers and every third layer between.
  bool q4_k_m = false;
  // A type per quantized Linear, for mixed-precision exports: the type that holds its codes as they are
  // (NVFP4, MXFP4, Q4_0 for INT4 in groups of a multiple of 32, Q8_0 for INT8 rows, the ggml type it was
  // quantized in the blocks of), else Q8_0 (FP8, other INT4 groups, a kept pre_quant_scale: the weight
  // it stands for quantized to 8 bits); everything else in `type` (BF16).
  bool native = false;
};

// The options a type name stands for: "bf16", "f16", "f32"; llama-quantize's mixes "q8_0", "q5_0", "q4_0",
// "q6_k", "q4_k_m"; "q4_0_pure", "q5_0_pure" (every matrix in that type, as llama-quantize --pure) and
// "q4_k" (every matrix Q4_K, llama-quantize --pure Q4_K_S); "nvfp4", "mxfp4" (from such a quantized export);
// "native" (a type per quantized Linear, the rest BF16: for mixed-precision exports).
GgufExportOptions gguf_options_from_name(const std::string& name);

// The ggml type of weight matrix `gguf_name` (llama.cpp's name, e.g. "blk.3.attn_v.weight"; `layer` its
// block of `layers`) with rows of `cols` values, in a model whose head is `tied` to the token embedding.
io::GgmlType gguf_matrix_type(const GgufExportOptions& options, const std::string& gguf_name, std::int64_t layer, std::int64_t layers,
                              std::int64_t cols, bool tied);

// The ggml type of every decoder Linear's weight ("model.layers.3.self_attn.v_proj" -> Q6_K) in a GGUF
// file of `options` for a model of config `c`: what gguf_matrix_type gives its llama.cpp name.
std::map<std::string, io::GgmlType> gguf_linear_types(const GgufExportOptions& options, const io::ModelConfig& c);

// llama.cpp's tokenizer.ggml.pre for a tokenizer.json, or an error naming `label` when llama.cpp has no
// pre-tokenizer that splits text the same way.
std::string gguf_pre_tokenizer_name(const nlohmann::json& tokenizer, const std::string& label);

// Writes `model_dir` as the GGUF file `out_path`, which must not exist (written under a temporary name and
// renamed when complete).
struct GgufExportReport {
  std::int64_t exact_linears = 0;        // quantized Linears whose codes went over unchanged
  std::int64_t requantized_linears = 0;  // quantized Linears dequantized and quantized to the type
  bool activation_quantization_dropped = false;
};
GgufExportReport export_gguf(const std::string& model_dir, const std::string& out_path, const GgufExportOptions& options);

}  // namespace mopt::exporter
