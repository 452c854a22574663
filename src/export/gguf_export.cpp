#include "export/gguf_export.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <optional>
#include <cmath>
#include <filesystem>
#include <map>

#include "core/convert.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/gguf_convert.h"
#include "io/gguf_writer.h"
#include "io/json_util.h"
#include "load/load_model.h"
#include "io/tokenizer.h"
#include "model/llama.h"

namespace mopt::exporter {

namespace {

using io::GgmlType;
using io::GgufValue;
using io::GgufValueType;
using nlohmann::json;
namespace fs = std::filesystem;

// llama.cpp's general.file_type for a whole-model type.
std::uint32_t file_type(const GgufExportOptions& o) {
  if (o.q4_k_m) return 15;  // LLAMA_FTYPE_MOSTLY_Q4_K_M (a pure type keeps its file type, as llama-quantize --pure writes it)
  switch (o.type) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1;
    case GgmlType::Q4_0: return 2;
    case GgmlType::Q8_0: return 7;
    case GgmlType::Q5_0: return 8;
    case GgmlType::Q4_K: return 14;  // all Q4_K: llama.cpp's "Q4_K_S" is the nearest name
    case GgmlType::Q6_K: return 18;
    case GgmlType::MXFP4: return 38;  // LLAMA_FTYPE_MOSTLY_MXFP4_MOE, the only MXFP4 file type llama.cpp names
    case GgmlType::NVFP4: return 39;
    case GgmlType::BF16: return 32;
    default: fail("no GGUF file type for ggml type {}", static_cast<std::uint32_t>(o.type));
  }
}

// llama.cpp's choice of layers that get more bits in its _M mixes.
bool more_bits_layer(std::int64_t layer, std::int64_t layers) {
  return layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2;
}

std::int64_t block_elements(GgmlType t) { return io::ggml_type_info(static_cast<std::uint32_t>(t))->block_elements; }

// The type llama.cpp's quantizer writes a matrix of rows of `cols` values in when `t` does not fit them
// (tensor_type_fallback): the 256-value K-quants fall back to a 32-value type, and a row that is not whole
// blocks of that either is written F16.
GgmlType fit_row(GgmlType t, std::int64_t cols) {
  if (cols % block_elements(t) == 0) return t;
  if (t == GgmlType::Q4_K) t = GgmlType::Q5_0;
  else if (t == GgmlType::Q6_K) t = GgmlType::Q8_0;
  return cols % block_elements(t) == 0 ? t : GgmlType::F16;
}

bool is_quantized(GgmlType t) { return t != GgmlType::F32 && t != GgmlType::F16 && t != GgmlType::BF16; }

bool is_byte_level(const json& j, bool use_regex) {
  return j.is_object() && j.value("type", "") == "ByteLevel" && j.value("use_regex", true) == use_regex;
}

bool is_split(const json& j, const char* regex) {
  return j.is_object() && j.value("type", "") == "Split" && j.contains("pattern") && j["pattern"].is_object() &&
         j["pattern"].value("Regex", "") == regex && j.value("behavior", "") == "Isolated" && !j.value("invert", false);
}

// True when applying merges to every vocabulary entry gives the entry back, i.e. a pre-token that is a
// whole token is encoded the same with and without ignore_merges.
bool merges_reproduce_vocab(const json& tokenizer, const std::string& label) {
  json ignoring = tokenizer;
  ignoring["model"]["ignore_merges"] = true;
  const io::Tokenizer a = io::Tokenizer::from_json(tokenizer.dump(), label);
  const io::Tokenizer b = io::Tokenizer::from_json(ignoring.dump(), label);
  for (std::int32_t id = 0; id < a.vocab_size(); ++id) {
    if (a.is_special(id)) continue;
    const std::string text = a.decode(std::span<const std::int32_t>(&id, 1));
    if (a.encode(text) != b.encode(text)) return false;
  }
  return true;
}

// A quantized Linear's own codes as GGUF blocks, when the type holds them exactly: INT4 groups of a
// multiple of 32 as Q4_0 (value (nibble - 8) * d, d the group's scale), INT8 rows as Q8_0 (codes * d).
// The scales are rounded to f16, as the blocks store them. Rows already permuted.
std::optional<std::vector<std::byte>> exact_blocks(GgmlType type, const std::vector<float>& codes, const std::vector<float>& scales,
                                                   std::int64_t out, std::int64_t in, std::int64_t group) {
  const std::int64_t blocks_per_row = in / 32;
  if (in % 32 != 0) return std::nullopt;
  const std::int64_t groups = scales.size() / static_cast<std::size_t>(out);
  std::vector<std::byte> bytes;
  if (type == GgmlType::Q4_0) {
    bytes.resize(static_cast<std::size_t>(out * blocks_per_row * 18));
    for (std::int64_t r = 0; r < out; ++r) {
      for (std::int64_t b = 0; b < blocks_per_row; ++b) {
        std::byte* blk = bytes.data() + (r * blocks_per_row + b) * 18;
        const std::uint16_t d = f32_to_f16(scales[static_cast<std::size_t>(r * groups + (b * 32) / group)]);
        std::memcpy(blk, &d, 2);
        const float* x = codes.data() + r * in + b * 32;
        for (int j = 0; j < 16; ++j) {
          const auto lo = static_cast<unsigned>(static_cast<int>(x[j]) + 8), hi = static_cast<unsigned>(static_cast<int>(x[j + 16]) + 8);
          blk[2 + j] = static_cast<std::byte>((lo & 0xF) | ((hi & 0xF) << 4));
        }
      }
    }
    return bytes;
  }
  if (type == GgmlType::Q8_0) {
    bytes.resize(static_cast<std::size_t>(out * blocks_per_row * 34));
    for (std::int64_t r = 0; r < out; ++r) {
      const std::uint16_t d = f32_to_f16(scales[static_cast<std::size_t>(r)]);
      for (std::int64_t b = 0; b < blocks_per_row; ++b) {
        std::byte* blk = bytes.data() + (r * blocks_per_row + b) * 34;
        std::memcpy(blk, &d, 2);
        for (int j = 0; j < 32; ++j) blk[2 + j] = static_cast<std::byte>(static_cast<std::int8_t>(codes[static_cast<std::size_t>(r * in + b * 32 + j)]));
      }
    }
    return bytes;
  }
  return std::nullopt;
}

// NVFP4 / MXFP4 weights in llama.cpp's blocks, code for code. `codes` [out, in] are E2M1 codes (as
// floats, rows already permuted), `scales` the E4M3 (per 16) or E8M0 (per 32) bytes [out, in/16|32].
std::vector<std::byte> fp4_blocks(GgmlType type, const std::vector<float>& codes, const std::vector<float>& scales, std::int64_t out,
                                  std::int64_t in) {
  const bool nv = type == GgmlType::NVFP4;
  const std::int64_t block = nv ? 64 : 32, block_bytes = nv ? 36 : 17, per_scale = nv ? 16 : 32;
  const std::int64_t scales_per_row = in / per_scale;
  std::vector<std::byte> bytes(static_cast<std::size_t>(out * (in / block) * block_bytes));
  std::byte* p = bytes.data();
  const auto code = [&](std::int64_t r, std::int64_t c) { return static_cast<unsigned>(codes[static_cast<std::size_t>(r * in + c)]) & 0xFu; };
  for (std::int64_t r = 0; r < out; ++r) {
    for (std::int64_t b = 0; b < in / block; ++b, p += block_bytes) {
      if (nv) {
        for (int s = 0; s < 4; ++s) {
          p[s] = static_cast<std::byte>(static_cast<std::uint8_t>(scales[static_cast<std::size_t>(r * scales_per_row + b * 4 + s)]));
          for (int j = 0; j < 8; ++j) {
            const std::int64_t c = b * 64 + s * 16 + j;
            p[4 + 8 * s + j] = static_cast<std::byte>(code(r, c) | (code(r, c + 8) << 4));
          }
        }
      } else {
        p[0] = static_cast<std::byte>(static_cast<std::uint8_t>(scales[static_cast<std::size_t>(r * scales_per_row + b)]));
        for (int j = 0; j < 16; ++j) p[1 + j] = static_cast<std::byte>(code(r, b * 32 + j) | (code(r, b * 32 + j + 16) << 4));
      }
    }
  }
  return bytes;
}

// The E2M1 codes [out, in] of a modelopt NVFP4/MXFP4 weight (even column in the low nibble), as floats.
std::vector<float> fp4_codes(const Tensor& w, std::int64_t out, std::int64_t in) {
  std::vector<float> codes(static_cast<std::size_t>(out * in));
  const auto* b = w.data<std::uint8_t>();
  for (std::int64_t i = 0; i < out * in / 2; ++i) {
    codes[static_cast<std::size_t>(2 * i)] = static_cast<float>(b[i] & 0xF);
    codes[static_cast<std::size_t>(2 * i + 1)] = static_cast<float>(b[i] >> 4);
  }
  return codes;
}

// The integer codes [out, in] of an INT4 (modelopt layout) or INT8 weight, as floats.
std::vector<float> integer_codes(const quant::QuantizerSpec& spec, const Tensor& w, std::int64_t out, std::int64_t in) {
  std::vector<float> codes(static_cast<std::size_t>(out * in));
  if (spec.element == quant::Element::int8) {
    const auto* p = w.data<std::int8_t>();
    for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = p[i];
    return codes;
  }
  const std::vector<std::int8_t> c = quant::unpack_int4_rows(w, out, in);
  std::copy(c.begin(), c.end(), codes.begin());
  return codes;
}

}  // namespace

GgufExportOptions gguf_options_from_name(const std::string& name) {
  static const std::map<std::string, GgmlType> kTypes = {
      {"f32", GgmlType::F32},   {"f16", GgmlType::F16},   {"bf16", GgmlType::BF16},       {"q8_0", GgmlType::Q8_0},
      {"q5_0", GgmlType::Q5_0}, {"q4_0", GgmlType::Q4_0}, {"q5_0_pure", GgmlType::Q5_0},  {"q4_0_pure", GgmlType::Q4_0},
      {"q6_k", GgmlType::Q6_K}, {"q4_k", GgmlType::Q4_K}, {"q4_k_m", GgmlType::Q4_K},     {"nvfp4", GgmlType::NVFP4},
      {"mxfp4", GgmlType::MXFP4}, {"native", GgmlType::BF16}};
  const auto it = kTypes.find(name);
  if (it == kTypes.end()) {
    fail("unknown GGUF type '{}' (f32, f16, bf16, q8_0, q5_0, q4_0, q6_k, q4_k_m, q5_0_pure, q4_0_pure, q4_k, nvfp4, mxfp4, native)", name);
  }
  GgufExportOptions o;
  o.type = it->second;
  o.q4_k_m = name == "q4_k_m";
  // "q4_k" is every matrix Q4_K: llama-quantize's Q4_K_S mix would need Q5_K, which mopt does not write.
  o.pure = name.ends_with("_pure") || name == "q4_k";
  o.native = name == "native";
  return o;
}

GgmlType gguf_matrix_type(const GgufExportOptions& o, const std::string& gguf, std::int64_t layer, std::int64_t layers, std::int64_t cols,
                          bool tied) {
  GgmlType t = o.type;
  if (!is_quantized(t)) return t;  // llama-quantize chooses per tensor only for quantized file types
  if (t == GgmlType::NVFP4 || t == GgmlType::MXFP4) return fit_row(GgmlType::Q8_0, cols);  // FP4 types hold FP4 Linears only
  if (!o.pure) {
    const bool output = gguf == "output.weight" || (tied && gguf == "token_embd.weight");
    if (output) {
      if (cols % block_elements(t) != 0) t = GgmlType::Q8_0;
      else if (t != GgmlType::Q8_0) t = GgmlType::Q6_K;
    } else if (o.q4_k_m) {
      const bool more = gguf.find("attn_v.weight") != std::string::npos || gguf.find("ffn_down.weight") != std::string::npos;
      if (more && more_bits_layer(layer, layers)) t = GgmlType::Q6_K;
    }
  }
  return fit_row(t, cols);
}

namespace {

// llama.cpp's name of a tensor (io::gguf_tensor_name's table; every name asked for here is in it).
std::string gguf_name(const std::string& hf) {
  std::optional<std::string> g = io::gguf_tensor_name(hf);
  if (!g) fail("{}: no llama.cpp tensor name", hf);
  return *g;
}

// llama.cpp's name of a decoder Linear of layer `layer`.
std::string gguf_linear_name(std::int64_t layer, model::LinearKind kind) {
  return gguf_name(fmt::format("model.layers.{}.{}.weight", layer, model::linear_name(kind)));
}

}  // namespace

std::map<std::string, GgmlType> gguf_linear_types(const GgufExportOptions& options, const io::ModelConfig& c) {
  std::map<std::string, GgmlType> types;
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto kind : model::kAllLinears) {
      const std::int64_t cols = load::linear_shape(c, kind).second;
      types[fmt::format("model.layers.{}.{}", l, model::linear_name(kind))] =
          gguf_matrix_type(options, gguf_linear_name(l, kind), l, c.num_layers, cols, c.tie_word_embeddings);
    }
  }
  return types;
}

std::string gguf_pre_tokenizer_name(const json& t, const std::string& label) {
  if (!t.contains("model") || t["model"].value("type", "") != "BPE") fail("{}: only byte-level BPE tokenizers can be written to GGUF", label);
  const json& pre = t.contains("pre_tokenizer") ? t["pre_tokenizer"] : json(nullptr);
  const json& norm = t.contains("normalizer") ? t["normalizer"] : json(nullptr);
  const bool sequence = pre.is_object() && pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") &&
                        pre["pretokenizers"].is_array() && pre["pretokenizers"].size() == 2;
  const bool ignore_merges = t["model"].value("ignore_merges", false);
  if (sequence && norm.is_null() && is_split(pre["pretokenizers"][0], io::kLlama3SplitRegex) && is_byte_level(pre["pretokenizers"][1], false)) {
    // llama.cpp's llama-bpe ignores merges for whole-token pre-tokens; fine when that changes nothing.
    if (!ignore_merges && !merges_reproduce_vocab(t, label)) {
      fail("{}: Llama-3's pre-tokenizer without ignore_merges, and some token is not what its merges give: llama.cpp's "
           "llama-bpe would tokenize differently",
           label);
    }
    return "llama-bpe";
  }
  if (sequence && norm.is_object() && norm.value("type", "") == "NFC" && is_split(pre["pretokenizers"][0], io::kQwen2SplitRegex) &&
      is_byte_level(pre["pretokenizers"][1], false) && !ignore_merges) {
    return "qwen2";
  }
  if (sequence && norm.is_null() && pre["pretokenizers"][0].value("type", "") == "Digits" &&
      pre["pretokenizers"][0].value("individual_digits", false) && is_byte_level(pre["pretokenizers"][1], true) && !ignore_merges) {
    return "smollm";
  }
  if (is_byte_level(pre, true) && norm.is_null() && !ignore_merges) return "gpt-2";
  fail("{}: its pre-tokenizer matches none of llama.cpp's that mopt writes (llama-bpe, qwen2, smollm, gpt-2)", label);
}

namespace {

// llama.cpp's architecture: Mistral without a sliding window is a Llama; Qwen2 and Qwen3 keep their names
// (their Q/K rows are not permuted: llama.cpp applies their RoPE on halves, as transformers does).
std::string gguf_architecture(const io::ModelConfig& c, const std::string& model_dir) {
  std::string arch;
  if (c.model_type == "llama" || c.model_type == "mistral") {
    arch = "llama";
  } else if (c.model_type == "qwen2" || c.model_type == "qwen3") {
    arch = c.model_type;
  } else {
    fail("{}: GGUF export of '{}' models is not supported (llama, mistral, qwen2, qwen3)", model_dir, c.model_type);
  }
  if (c.sliding_window) fail("{}: llama.cpp's {} architecture has no sliding window ({} tokens here)", model_dir, arch, *c.sliding_window);
  if (c.mlp_bias && arch != "llama") fail("{}: llama.cpp's {} architecture has no MLP biases", model_dir, arch);
  return arch;
}

void add_hyperparameters(io::GgufWriter& w, const io::ModelConfig& c, const std::string& arch, const std::string& model_dir) {
  w.add_string("general.architecture", arch);
  w.add_string("general.name", fs::path(model_dir).filename().string());
  w.add_u32(arch + ".vocab_size", static_cast<std::uint32_t>(c.vocab_size));
  w.add_u32(arch + ".context_length", static_cast<std::uint32_t>(c.max_position_embeddings));
  w.add_u32(arch + ".embedding_length", static_cast<std::uint32_t>(c.hidden_size));
  w.add_u32(arch + ".block_count", static_cast<std::uint32_t>(c.num_layers));
  w.add_u32(arch + ".feed_forward_length", static_cast<std::uint32_t>(c.intermediate_size));
  w.add_u32(arch + ".rope.dimension_count", static_cast<std::uint32_t>(c.head_dim));
  w.add_u32(arch + ".attention.head_count", static_cast<std::uint32_t>(c.num_heads));
  w.add_u32(arch + ".attention.head_count_kv", static_cast<std::uint32_t>(c.num_kv_heads));
  if (c.head_dim * c.num_heads != c.hidden_size) {
    w.add_u32(arch + ".attention.key_length", static_cast<std::uint32_t>(c.head_dim));
    w.add_u32(arch + ".attention.value_length", static_cast<std::uint32_t>(c.head_dim));
  }
  w.add_f32(arch + ".attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  w.add_f32(arch + ".rope.freq_base", static_cast<float>(c.rope_theta));
  if (c.rope_scaling.type == io::RopeScalingType::linear) {
    w.add_string(arch + ".rope.scaling.type", "linear");
    w.add_f32(arch + ".rope.scaling.factor", static_cast<float>(c.rope_scaling.factor));
  }
}

// The tokenizer: ids 0..n-1 from the BPE vocabulary and the added tokens, merges, special ids, the chat template.
void add_tokenizer(io::GgufWriter& w, const io::ModelConfig& c, const std::string& model_dir) {
  const std::string tok_path = model_dir + "/tokenizer.json";
  if (!fs::exists(tok_path)) fail("{}: missing tokenizer.json; a GGUF file carries its tokenizer", model_dir);
  const json tok = io::parse_json_unique_keys(io::read_text_file(tok_path), tok_path);
  const std::string pre = gguf_pre_tokenizer_name(tok, tok_path);
  std::map<std::int64_t, std::pair<std::string, std::int32_t>> by_id;  // id -> (token, ggml token type)
  const json& bpe = tok["model"];  // gguf_pre_tokenizer_name found a BPE model
  if (!bpe.contains("vocab") || !bpe["vocab"].is_object() || !bpe.contains("merges") || !bpe["merges"].is_array()) {
    fail("{}: its BPE model has no \"vocab\" object or no \"merges\" array", tok_path);
  }
  for (const auto& [token, id] : bpe["vocab"].items()) by_id[id.get<std::int64_t>()] = {token, 1};
  if (tok.contains("added_tokens")) {
    for (const auto& a : tok["added_tokens"]) by_id[a["id"].get<std::int64_t>()] = {a["content"].get<std::string>(), a.value("special", false) ? 3 : 4};
  }
  json tokens = json::array(), types = json::array(), merges = json::array();
  std::int64_t next = 0;
  for (const auto& [id, entry] : by_id) {
    if (id != next) fail("{}: token ids are not contiguous (no token {})", tok_path, next);
    tokens.push_back(entry.first);
    types.push_back(entry.second);
    ++next;
  }
  if (next > c.vocab_size) fail("{}: {} tokens for an embedding of {} rows", tok_path, next, c.vocab_size);
  for (; next < c.vocab_size; ++next) {  // embedding rows beyond the vocabulary, named as llama.cpp's converter names them
    tokens.push_back(fmt::format("[PAD{}]", next));
    types.push_back(5);  // unused
  }
  for (const auto& m : bpe["merges"]) {
    if (m.is_string()) {
      merges.push_back(m);
    } else if (m.is_array() && m.size() == 2) {
      merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    } else {
      fail("{}: a merge is neither \"a b\" nor [a, b]", tok_path);
    }
  }
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_string("tokenizer.ggml.pre", pre);
  w.add("tokenizer.ggml.tokens", {GgufValueType::array, GgufValueType::string, tokens});
  w.add("tokenizer.ggml.token_type", {GgufValueType::array, GgufValueType::i32, types});
  w.add("tokenizer.ggml.merges", {GgufValueType::array, GgufValueType::string, merges});
  if (!c.bos_token_ids.empty()) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<std::uint32_t>(c.bos_token_ids[0]));
  if (!c.eos_token_ids.empty()) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<std::uint32_t>(c.eos_token_ids[0]));
  bool add_bos = false;
  if (tok.contains("post_processor") && tok["post_processor"].is_object() && tok["post_processor"].value("type", "") == "TemplateProcessing") {
    const json& pp = tok["post_processor"];
    const json& single = pp.contains("single") ? pp["single"] : json(nullptr);
    add_bos = single.is_array() && !single.empty() && single[0].contains("SpecialToken");
  }
  w.add("tokenizer.ggml.add_bos_token", {GgufValueType::boolean, GgufValueType::u8, add_bos});
  const std::string tc_path = model_dir + "/tokenizer_config.json";
  if (fs::exists(tc_path)) {
    const json tc = io::parse_json_unique_keys(io::read_text_file(tc_path), tc_path);
    if (tc.contains("chat_template") && tc["chat_template"].is_string()) w.add_string("tokenizer.chat_template", tc["chat_template"].get<std::string>());
  }
}

// The model's tensors into a GGUF writer. Weight matrices are read, permuted and quantized only when the
// writer reaches them: one at a time in memory. The type of each matrix: llama-quantize's choice for the
// file type (or every matrix in it when pure).
class GgufTensors {
 public:
  GgufTensors(io::GgufWriter& w, const io::Checkpoint& ckpt, const std::optional<load::QuantizedReader>& reader, const GgufExportOptions& options,
              const std::string& model_dir, GgufExportReport& report)
      : w_(w), ckpt_(ckpt), reader_(reader), options_(options), model_dir_(model_dir), report_(report) {}

  GgmlType type_of(const std::string& gguf, std::int64_t layer, std::int64_t cols) const {
    const io::ModelConfig& c = ckpt_.config();
    return gguf_matrix_type(options_, gguf, layer, c.num_layers, cols, c.tie_word_embeddings);
  }

  void matrix(const std::string& hf, const std::string& gguf, std::int64_t permute_heads = 0, std::int64_t layer = 0) {
    const GgmlType type = type_of(gguf, layer, ckpt_.tensor(hf).shape().back());
    w_.add_tensor(gguf, ckpt_.tensor(hf).shape(), type, [&ckpt = ckpt_, hf, permute_heads, type] { return encode(ckpt.tensor(hf), hf, permute_heads, type); });
  }

  // A plain Linear the checkpoint's format stores its own way (compressed-tensors' 2:4
  // .compressed/.bitmask/.shape), made dense by its reader when the writer reaches it.
  void stored_dense_matrix(const std::string& hf, const std::string& gguf, std::int64_t permute_heads, std::int64_t layer) {
    const io::ModelConfig& c = ckpt_.config();
    const auto expected = io::expected_tensors(c);
    const auto it = std::find_if(expected.begin(), expected.end(), [&](const io::ExpectedTensor& t) { return t.name == hf; });
    if (it == expected.end()) fail("{}: {} is not a tensor of this model", model_dir_, hf);
    const GgmlType type = type_of(gguf, layer, it->shape.back());
    const std::string module = hf.substr(0, hf.size() - std::string_view(".weight").size());
    w_.add_tensor(gguf, it->shape, type, [&ckpt = ckpt_, &reader = *reader_, dir = model_dir_, module, hf, shape = it->shape, permute_heads, type] {
      std::optional<Tensor> t = reader.dense_weight(ckpt, module);
      if (!t) fail("{}: {} holds no weight for {}", dir, module, hf);
      if (t->shape() != shape) fail("{}: {} is {}, the config asks for {}", dir, hf, shape_string(t->shape()), shape_string(shape));
      return encode(*t, hf, permute_heads, type);
    });
  }

  void vector(const std::string& hf) {
    const Tensor t = ckpt_.tensor(hf);
    const std::vector<float> v = t.to_f32();
    w_.add_tensor(gguf_name(hf), t.shape(), GgmlType::F32, io::ggml_quantize(GgmlType::F32, v.data(), v.size(), hf));
  }

  void bias(const std::string& hf, std::int64_t permute_heads) {
    const Tensor t = ckpt_.tensor(hf);
    std::vector<float> v = t.to_f32();
    if (permute_heads > 0) io::permute_rope_rows(v.data(), t.dim(0), 1, permute_heads);
    w_.add_tensor(gguf_name(hf), t.shape(), GgmlType::F32, io::ggml_quantize(GgmlType::F32, v.data(), v.size(), hf));
  }

  // A decoder Linear: from the quantized checkpoint when it is one. Its codes go over exactly when the
  // type holds them; otherwise the weight it stands for (any pre_quant_scale multiplied into its columns,
  // as llama.cpp has no input scale) is quantized to the type.
  void linear(std::int64_t layer, model::LinearKind kind, std::int64_t permute_heads) {
    const std::string hf = fmt::format("model.layers.{}.{}.weight", layer, model::linear_name(kind));
    const std::string gguf = gguf_name(hf);
    std::optional<load::StoredLinear> st = reader_ ? reader_->linear(ckpt_, layer, kind) : std::nullopt;
    if (!st) {
      if (reader_ && reader_->dense_weight && !ckpt_.tensors().contains(hf)) stored_dense_matrix(hf, gguf, permute_heads, layer);
      else matrix(hf, gguf, permute_heads, layer);
      return;
    }
    const GgmlType own = native_type(*st);
    if (own == GgmlType::NVFP4 || own == GgmlType::MXFP4) {
      fp4_linear(std::move(*st), gguf, own, permute_heads);
      return;
    }
    const GgmlType type = options_.native ? own : type_of(gguf, layer, st->in);
    const auto& spec = *st->scheme.weight;
    if (spec.grid == quant::IntGrid::ggml && spec.ggml_type == type && st->pre_quant_scale.empty()) {
      ggml_block_linear(std::move(*st), gguf, type, permute_heads);
      return;
    }
    integer_linear(std::move(*st), hf, gguf, type, permute_heads);
  }

 private:
  // A weight's values (its Q/K rows permuted as llama.cpp's RoPE wants) in `type`.
  static std::vector<std::byte> encode(const Tensor& t, const std::string& hf, std::int64_t permute_heads, GgmlType type) {
    std::vector<float> v = t.to_f32();
    if (permute_heads > 0) io::permute_rope_rows(v.data(), t.dim(0), t.dim(1), permute_heads);
    std::vector<std::byte> out = io::ggml_quantize(type, v.data(), v.size(), hf);
    t.release_pages();
    return out;
  }

  bool fp4_fits(const load::StoredLinear& st, GgmlType t) const {
    const auto& spec = *st.scheme.weight;
    const bool nv = t == GgmlType::NVFP4;
    return spec.element == quant::Element::e2m1 && spec.scaling == (nv ? quant::Scaling::nvfp4 : quant::Scaling::mx) && st.pre_quant_scale.empty() &&
           st.in % (nv ? 64 : 32) == 0;
  }

  // A type per Linear (native): the one that holds its codes, else Q8_0; the file's type otherwise.
  GgmlType native_type(const load::StoredLinear& st) const {
    if (!options_.native) return options_.type;
    const auto& spec = *st.scheme.weight;
    if (fp4_fits(st, GgmlType::NVFP4)) return GgmlType::NVFP4;
    if (fp4_fits(st, GgmlType::MXFP4)) return GgmlType::MXFP4;
    if (spec.grid == quant::IntGrid::ggml && st.pre_quant_scale.empty()) return spec.ggml_type;
    if (spec.element == quant::Element::int4 && spec.scaling == quant::Scaling::block && !spec.fp8_second_stage && spec.block % 32 == 0 &&
        st.pre_quant_scale.empty() && st.in % 32 == 0) {
      return GgmlType::Q4_0;
    }
    return fit_row(GgmlType::Q8_0, st.in);
  }

  // NVFP4 / MXFP4 Linears go over code for code (NVFP4's second-level scale as llama.cpp's ".scale").
  void fp4_linear(load::StoredLinear st, const std::string& gguf, GgmlType type, std::int64_t permute_heads) {
    const bool nv = type == GgmlType::NVFP4;
    if (!fp4_fits(st, type)) {
      fail("{}: {} is {}{}: a {} GGUF holds {} weights code for code only (use another --type)", model_dir_, st.name, st.scheme.quant_algo,
           st.pre_quant_scale.empty() ? "" : " with a pre_quant_scale", nv ? "nvfp4" : "mxfp4", nv ? "NVFP4 (blocks of 64)" : "MXFP4");
    }
    ++report_.exact_linears;
    if (st.scheme.input) report_.activation_quantization_dropped = true;
    if (nv) {
      const std::string scale_name = gguf.substr(0, gguf.size() - 7) + ".scale";
      const float s2 = st.weight.weight_scale_2->to_f32().at(0);
      w_.add_tensor(scale_name, {1}, GgmlType::F32, io::ggml_quantize(GgmlType::F32, &s2, 1, scale_name));
    }
    const Shape shape{st.out, st.in};
    w_.add_tensor(gguf, shape, type, [st = std::move(st), permute_heads, type] {
      std::vector<float> codes = fp4_codes(st.weight.weight, st.out, st.in);
      std::vector<float> scales;
      const Tensor& sc = st.weight.weight_scale;
      const auto* sb = sc.data<std::uint8_t>();
      for (std::uint64_t i = 0; i < sc.numel(); ++i) scales.push_back(static_cast<float>(sb[i]));
      if (permute_heads > 0) {
        io::permute_rope_rows(codes.data(), st.out, st.in, permute_heads);
        io::permute_rope_rows(scales.data(), st.out, static_cast<std::int64_t>(scales.size()) / st.out, permute_heads);
      }
      return fp4_blocks(type, codes, scales, st.out, st.in);
    });
  }

  // Quantized in this file's own blocks: the bytes go over as they are (rows permuted as the file wants them).
  void ggml_block_linear(load::StoredLinear st, const std::string& gguf, GgmlType type, std::int64_t permute_heads) {
    ++report_.exact_linears;
    if (st.scheme.input) report_.activation_quantization_dropped = true;
    const Shape shape{st.out, st.in};
    w_.add_tensor(gguf, shape, type, [st = std::move(st), permute_heads] {
      const Tensor& t = st.weight.weight;
      const auto* bytes = reinterpret_cast<const std::byte*>(t.data<std::uint8_t>());
      const auto row_bytes = static_cast<std::size_t>(t.dim(1));
      std::vector<float> source_row(static_cast<std::size_t>(st.out));
      for (std::size_t r = 0; r < source_row.size(); ++r) source_row[r] = static_cast<float>(r);
      if (permute_heads > 0) io::permute_rope_rows(source_row.data(), st.out, 1, permute_heads);
      std::vector<std::byte> out(bytes, bytes + t.numel());
      for (std::size_t r = 0; r < source_row.size(); ++r) {
        std::copy_n(bytes + static_cast<std::size_t>(source_row[r]) * row_bytes, row_bytes, out.begin() + static_cast<std::ptrdiff_t>(r * row_bytes));
      }
      return out;
    });
  }

  // INT4 codes into Q4_0 and INT8 codes into Q8_0 as they are; anything else dequantized and quantized to the type.
  void integer_linear(load::StoredLinear st, const std::string& hf, const std::string& gguf, GgmlType type, std::int64_t permute_heads) {
    const auto& spec = *st.scheme.weight;
    const bool int4 = spec.element == quant::Element::int4 && spec.scaling == quant::Scaling::block && !spec.fp8_second_stage &&
                      spec.block % 32 == 0 && type == GgmlType::Q4_0;
    const bool int8 = spec.element == quant::Element::int8 && spec.scaling == quant::Scaling::per_row && type == GgmlType::Q8_0;
    const bool exact = (int4 || int8) && st.pre_quant_scale.empty() && st.in % 32 == 0;
    if (exact) ++report_.exact_linears;
    else ++report_.requantized_linears;
    if (st.scheme.input) report_.activation_quantization_dropped = true;
    const Shape shape{st.out, st.in};
    w_.add_tensor(gguf, shape, type, [st = std::move(st), permute_heads, type, exact, hf] {
      const std::int64_t out = st.out, in = st.in;
      const auto& sp = *st.scheme.weight;
      if (exact) {
        std::vector<float> codes = integer_codes(sp, st.weight.weight, out, in);
        std::vector<float> scales = st.weight.weight_scale.to_f32();
        const auto groups = static_cast<std::int64_t>(scales.size()) / out;
        if (permute_heads > 0) {
          io::permute_rope_rows(codes.data(), out, in, permute_heads);
          io::permute_rope_rows(scales.data(), out, groups, permute_heads);
        }
        return *exact_blocks(type, codes, scales, out, in, sp.element == quant::Element::int4 ? sp.block : in);
      }
      std::vector<float> v = quant::dequantize_weight(sp, st.weight, out, in);
      if (!st.pre_quant_scale.empty()) {
        for (std::int64_t r = 0; r < out; ++r) {
          for (std::int64_t j = 0; j < in; ++j) v[static_cast<std::size_t>(r * in + j)] *= st.pre_quant_scale[static_cast<std::size_t>(j)];
        }
      }
      if (permute_heads > 0) io::permute_rope_rows(v.data(), out, in, permute_heads);
      return io::ggml_quantize(type, v.data(), v.size(), hf);
    });
  }

  io::GgufWriter& w_;
  const io::Checkpoint& ckpt_;
  const std::optional<load::QuantizedReader>& reader_;
  const GgufExportOptions& options_;
  const std::string& model_dir_;
  GgufExportReport& report_;
};

// llama.cpp's rope_freqs for llama3 RoPE scaling: the divisor of each frequency.
void add_rope_freqs(io::GgufWriter& w, const io::ModelConfig& c) {
  io::ModelConfig plain = c;
  plain.rope_scaling = {};
  const std::vector<float> base = model::rope_inv_freq(plain), scaled = model::rope_inv_freq(c);
  std::vector<float> divisors(base.size());
  for (std::size_t i = 0; i < base.size(); ++i) divisors[i] = base[i] / scaled[i];
  w.add_tensor("rope_freqs.weight", {static_cast<std::int64_t>(divisors.size())}, GgmlType::F32,
               io::ggml_quantize(GgmlType::F32, divisors.data(), divisors.size()));
}

void add_layer(GgufTensors& t, const io::Checkpoint& ckpt, std::int64_t l, bool permute) {
  const io::ModelConfig& c = ckpt.config();
  const std::string hf = fmt::format("model.layers.{}.", l);
  t.vector(hf + "input_layernorm.weight");
  t.vector(hf + "post_attention_layernorm.weight");
  t.linear(l, model::LinearKind::q, permute ? c.num_heads : 0);
  t.linear(l, model::LinearKind::k, permute ? c.num_kv_heads : 0);
  if (c.qkv_bias) {
    t.bias(hf + "self_attn.q_proj.bias", permute ? c.num_heads : 0);
    t.bias(hf + "self_attn.k_proj.bias", permute ? c.num_kv_heads : 0);
    t.bias(hf + "self_attn.v_proj.bias", 0);
  }
  if (c.o_bias) t.bias(hf + "self_attn.o_proj.bias", 0);
  if (ckpt.tensors().contains(hf + "self_attn.q_norm.weight")) {  // Qwen3
    t.vector(hf + "self_attn.q_norm.weight");
    t.vector(hf + "self_attn.k_norm.weight");
  }
  for (const auto kind : {model::LinearKind::v, model::LinearKind::o, model::LinearKind::gate, model::LinearKind::up, model::LinearKind::down}) {
    t.linear(l, kind, 0);
  }
  if (c.mlp_bias) {
    for (const char* name : {"mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias"}) t.bias(hf + name, 0);
  }
}

}  // namespace

GgufExportReport export_gguf(const std::string& model_dir, const std::string& out_path, const GgufExportOptions& options) {
  if (fs::exists(out_path)) fail("{}: already exists; choose a new file", out_path);
  // A quantized checkpoint (mopt's modelopt or compressed-tensors export) gives its quantized weights.
  const std::optional<load::QuantizedReader> reader = load::quantized_reader(model_dir);
  const io::Checkpoint ckpt = io::Checkpoint::open(model_dir, reader ? reader->layout : io::TensorLayout{});
  if (reader && ckpt.tensors().contains("lm_head.weight_scale")) {
    fail("{}: its lm_head is quantized (--quantize-lm-head); the GGUF export reads a 16-bit lm_head", model_dir);
  }
  GgufExportReport report;
  const io::ModelConfig& c = ckpt.config();
  const std::string arch = gguf_architecture(c, model_dir);
  io::GgufWriter w;
  add_hyperparameters(w, c, arch, model_dir);
  add_tokenizer(w, c, model_dir);
  // Last and in this order, as llama-quantize sets them: a file it quantizes from mopt's bf16 export is then
  // byte for byte the file mopt writes in that type.
  w.add_u32("general.quantization_version", 2);
  w.add_u32("general.file_type", file_type(options));

  GgufTensors tensors(w, ckpt, reader, options, model_dir, report);
  tensors.matrix("model.embed_tokens.weight", gguf_name("model.embed_tokens.weight"));
  tensors.vector("model.norm.weight");
  if (!c.tie_word_embeddings) tensors.matrix("lm_head.weight", gguf_name("lm_head.weight"));
  if (c.rope_scaling.type == io::RopeScalingType::llama3) add_rope_freqs(w, c);
  for (std::int64_t l = 0; l < c.num_layers; ++l) add_layer(tensors, ckpt, l, arch == "llama");
  // llama.cpp's order (its loader's weights map, which llama-quantize writes in): tensors outside the blocks,
  // then block by block, by name within each.
  const auto block_of = [](const std::string& name) {
    long long n = -1;
    return std::sscanf(name.c_str(), "blk.%lld.", &n) == 1 ? n : -1LL;
  };
  w.sort_tensors([&](const std::string& a, const std::string& b) {
    const long long la = block_of(a), lb = block_of(b);
    return la != lb ? la < lb : a < b;
  });
  w.write(out_path);
  return report;
}

}  // namespace mopt::exporter
