// `mopt export MODEL --to gguf OUT.gguf`: a Hugging Face Llama, Mistral (no
// sliding window), Qwen2 or Qwen3 checkpoint as a llama.cpp GGUF file:
// llama.cpp's tensor names, its Q/K row permutation for llama (FORMATS.md
// 7.6), norms and biases in F32, the other weights in the chosen
// type (F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q6_K, Q4_K, or the Q4_K_M mix, quantized
// as llama.cpp's reference quantizers do), llama3 RoPE scaling as rope_freqs, and the byte-level BPE
// tokenizer as tokenizer.ggml.* metadata with the pre-tokenizer llama.cpp
// names (llama-bpe, qwen2, smollm, gpt-2). `mopt convert` reads it back.
//
// A quantized mopt export (modelopt or compressed-tensors) is read as such:
// INT4 weights with groups of a multiple of 32 go to Q4_0 and INT8 rows to
// Q8_0 code for code (scales rounded to f16), so AWQ's and GPTQ's choices
// reach llama.cpp unchanged; other weights are dequantized (a kept
// pre_quant_scale multiplied into the columns) and quantized to the type.
// llama.cpp does not quantize activations as W8A8/FP8 schemes do.
//
// MLP biases are written for llama (llama.cpp reads ffn_*.bias there).
// Not yet: Mistral's sliding window, SentencePiece vocabularies.
#pragma once

#include <nlohmann/json.hpp>
#include <cstdint>
#include <string>

#include "io/gguf.h"

namespace mopt::exporter {

struct GgufExportOptions {
  io::GgmlType type = io::GgmlType::BF16;  // for every weight matrix (norms stay F32)
  // llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output (or tied) embedding and for attn_v and
  // ffn_down in the first and last eighth of the layers and every third layer between.
  bool q4_k_m = false;
};

// The options a type name stands for: "bf16", "f16", "f32", "q8_0", "q5_0", "q4_0", "q6_k", "q4_k",
// "q4_k_m". K-quant rows whose length is not a multiple of 256 fall back as llama.cpp's quantizer
// does (Q4_K to Q5_0, Q6_K to Q8_0).
GgufExportOptions gguf_options_from_name(const std::string& name);

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
