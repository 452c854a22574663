// `mopt convert`: a llama.cpp GGUF model into a Hugging Face checkpoint
// directory (config.json, model.safetensors in bf16, tokenizer.json,
// tokenizer_config.json, generation_config.json).
//
// Architectures: llama (whose Q/K rows llama.cpp permuted for its adjacent-pair
// RoPE; we undo that, FORMATS.md 7.6), qwen2 and qwen3 (not permuted).
// Tokenizers: tokenizer.ggml.model "gpt2" (byte-level BPE) with the
// pre-tokenizer named by tokenizer.ggml.pre (llama-bpe, qwen2, smollm, gpt-2).
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "io/gguf.h"

namespace mopt::io {

// config.json for the model in `gguf`.
nlohmann::json gguf_to_hf_config(const GgufFile& gguf);

// tokenizer.json built from the tokenizer.ggml.* metadata.
nlohmann::json gguf_to_hf_tokenizer(const GgufFile& gguf);

// The pre-tokenizer regexes behind llama.cpp's tokenizer.ggml.pre names "llama-bpe" and "qwen2".
extern const char* const kLlama3SplitRegex;
extern const char* const kQwen2SplitRegex;

// The inverse of llama.cpp's Q/K permutation on the rows of a [rows, cols]
// f32 tensor with `heads` heads: row h*d + 2i + j of the GGUF tensor becomes
// row h*d + j*(d/2) + i.
void unpermute_rope_rows(float* data, std::int64_t rows, std::int64_t cols, std::int64_t heads);
// llama.cpp's Q/K permutation itself (what its converter applies): row h*d + j*(d/2) + i becomes row h*d + 2i + j.
void permute_rope_rows(float* data, std::int64_t rows, std::int64_t cols, std::int64_t heads);

// Converts `gguf_path` into the directory `out_dir`, which must not exist yet.
// The directory is built under a temporary name beside it and renamed when
// complete. `progress` (may be empty) is called after each tensor.
// `dtype` (BF16 or F32) is what the tensors are stored as: F32 keeps dequantized Q8_0/Q4_0/... values exactly.
void convert_gguf_to_hf(const std::string& gguf_path, const std::string& out_dir,
                        const std::function<void(std::size_t done, std::size_t total)>& progress = {}, DType dtype = DType::BF16);

}  // namespace mopt::io
