// GGUF (llama.cpp's model file), versions 2 and 3: header, metadata of every
// value type, tensor infos, alignment. Everything is validated before use:
// counts and string lengths against the bytes left, tensor sizes against their
// type's block size, offsets against alignment, the file size and each other.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/mapped_file.h"
#include "core/tensor.h"

namespace mopt::io {

enum class GgufValueType : std::uint32_t {
  u8 = 0, i8 = 1, u16 = 2, i16 = 3, u32 = 4, i32 = 5, f32 = 6, boolean = 7,
  string = 8, array = 9, u64 = 10, i64 = 11, f64 = 12,
};
std::string_view gguf_value_type_name(GgufValueType t);

// ggml tensor types mopt knows the block layout of.
enum class GgmlType : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, BF16 = 30, MXFP4 = 39, NVFP4 = 40,
};

struct GgmlTypeInfo {
  GgmlType type;
  std::string_view name;
  std::uint32_t block_elements;  // elements per block
  std::uint32_t block_bytes;     // bytes per block
};
// The layout of ggml type `id`, or nullopt when mopt does not know it.
std::optional<GgmlTypeInfo> ggml_type_info(std::uint32_t id);

struct GgufValue {
  GgufValueType type;
  GgufValueType element_type = GgufValueType::u8;  // for arrays
  nlohmann::json value;  // number, bool, string, or an array of those
};

struct GgufTensorInfo {
  std::string name;
  std::vector<std::uint64_t> ne;  // GGUF order: ne[0] is the contiguous dimension
  GgmlTypeInfo type;
  std::uint64_t offset;  // from the start of the data section
  std::uint64_t bytes;
  // PyTorch order (ne reversed): [rows, ..., ne[0]].
  Shape shape() const;
  std::uint64_t elements() const;
};

struct GgufHeader {
  std::uint32_t version = 0;
  std::uint64_t alignment = 32;
  std::uint64_t data_offset = 0;  // where the data section starts in the file
  std::vector<std::pair<std::string, GgufValue>> metadata;  // in file order
  std::vector<GgufTensorInfo> tensors;                       // in file order
};

// Parses and validates the GGUF file whose full contents are `file`.
// `label` (the path) starts every error message.
GgufHeader parse_gguf(std::span<const std::byte> file, const std::string& label);

class GgufFile {
 public:
  static GgufFile open(const std::string& path);

  const std::string& path() const { return file_->path(); }
  const GgufHeader& header() const { return header_; }
  const GgufValue* find(std::string_view key) const;
  // Typed metadata access; each throws Error naming the key when it is
  // missing or of another type. Integer getters accept any integer type whose
  // value fits.
  std::string get_string(std::string_view key) const;
  std::uint64_t get_uint(std::string_view key) const;
  double get_float(std::string_view key) const;
  bool get_bool(std::string_view key) const;
  std::optional<std::uint64_t> find_uint(std::string_view key) const;
  std::optional<double> find_float(std::string_view key) const;
  std::optional<std::string> find_string(std::string_view key) const;

  const GgufTensorInfo* find_tensor(std::string_view name) const;
  // The tensor's raw bytes.
  std::span<const std::byte> raw(const GgufTensorInfo& info) const;
  // The tensor dequantized to f32, in PyTorch shape order; throws Error for
  // types mopt cannot dequantize, and for non-finite values.
  Tensor dequantize(const GgufTensorInfo& info) const;

 private:
  GgufFile(std::shared_ptr<const MappedFile> file, GgufHeader header);
  std::shared_ptr<const MappedFile> file_;
  GgufHeader header_;
  std::map<std::string, std::size_t, std::less<>> metadata_index_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

// Dequantizes `blocks` of ggml type `type` into `count` f32 values.
// Supported: F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q4_1, Q4_K, Q6_K, MXFP4, NVFP4 (llama.cpp's
// layouts: E2M1 codes with E8M0 per 32, or with E4M3 per 16 in blocks of 64).
void ggml_dequantize(GgmlType type, std::span<const std::byte> blocks, float* out, std::uint64_t count);

// llama.cpp's names of the Llama family's tensors against Hugging Face's, one table both ways:
// "model.layers.3.mlp.up_proj.weight" <-> "blk.3.ffn_up.weight", "model.embed_tokens.weight" <->
// "token_embd.weight", ... nullopt for a name without a counterpart; llama.cpp's own rope_freqs.weight
// has the empty Hugging Face name.
std::optional<std::string> gguf_tensor_name(std::string_view hf_name);
std::optional<std::string> hf_tensor_name(std::string_view gguf_name);

}  // namespace mopt::io
