#include "io/gguf_convert.h"

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <numbers>
#include <optional>
#include <random>
#include <regex>
#include <set>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/checkpoint.h"
#include "io/json_util.h"
#include "io/safetensors.h"

namespace mopt::io {

using nlohmann::json;
namespace fs = std::filesystem;

const char* const kLlama3SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2SplitRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

struct ArchitectureNames {
  const char* gguf;
  const char* hf_architecture;
  const char* model_type;
  bool permuted_qk;  // llama.cpp permuted Q/K rows for adjacent-pair RoPE
};

constexpr ArchitectureNames kArchitectures[] = {
    {"llama", "LlamaForCausalLM", "llama", true},
    {"qwen2", "Qwen2ForCausalLM", "qwen2", false},
    {"qwen3", "Qwen3ForCausalLM", "qwen3", false},
};

const ArchitectureNames& architecture_of(const GgufFile& g) {
  const std::string arch = g.get_string("general.architecture");
  for (const auto& a : kArchitectures) {
    if (arch == a.gguf) return a;
  }
  fail("{}: general.architecture '{}' is not supported (llama, qwen2, qwen3)", g.path(), printable(arch));
}

// A float32 metadata value written as the shortest decimal that reads back as
// the same float (1e-05, not 9.999999747378752e-06).
double shortest_float(double v) { return std::stod(fmt::format("{}", static_cast<float>(v))); }

// Recovers HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor (the
// divisor of each frequency). Llama 3 uses low_freq_factor 1; with that, the
// interpolated entries give high_freq_factor and the original context. The
// result is checked to reproduce every divisor.
json llama3_scaling_from_freqs(const std::vector<float>& divisors, double theta, std::int64_t rotary_dim,
                               const std::string& label) {
  const double factor = *std::max_element(divisors.begin(), divisors.end());
  std::vector<std::pair<double, double>> interpolated;  // (wavelength, s)
  auto wavelength = [&](std::size_t i) {
    return 2 * std::numbers::pi / std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim));
  };
  for (std::size_t i = 0; i < divisors.size(); ++i) {
    const double v = divisors[i];
    if (std::fabs(v - 1.0) < 1e-6 || std::fabs(v - factor) < 1e-6 * factor) continue;
    interpolated.emplace_back(wavelength(i), (1.0 / v - 1.0 / factor) / (1.0 - 1.0 / factor));
  }
  const double low = 1.0;
  double high = 4.0;
  double original = 0;
  if (interpolated.size() >= 2) {
    // s = (orig/wl - low) / (high - low) = A/wl - B: fit A and B from two points.
    const auto [w1, s1] = interpolated.front();
    const auto [w2, s2] = interpolated.back();
    const double a = (s1 - s2) / (1.0 / w1 - 1.0 / w2);
    const double b = a / w1 - s1;
    high = low + 1.0 / b;
    original = a * (high - low);
  } else if (interpolated.size() == 1) {
    const auto [w, s] = interpolated.front();
    original = w * (s * (high - low) + low);
  } else {
    fail("{}: rope_freqs has no interpolated entries; cannot recover llama3 rope scaling", label);
  }
  original = std::round(original);
  high = std::round(high * 1e6) / 1e6;
  const double low_wl = original / low, high_wl = original / high;
  for (std::size_t i = 0; i < divisors.size(); ++i) {
    const double wl = wavelength(i);
    double expected;
    if (wl < high_wl) {
      expected = 1.0;
    } else if (wl > low_wl) {
      expected = factor;
    } else {
      const double s = (original / wl - low) / (high - low);
      expected = 1.0 / ((1 - s) / factor + s);
    }
    if (std::fabs(expected - divisors[i]) > 1e-4 * expected) {
      fail("{}: rope_freqs entry {} is {}, but the recovered llama3 scaling (factor {}, high_freq_factor {}, "
           "original context {}) gives {}",
           label, i, divisors[i], factor, high, original, expected);
    }
  }
  return {{"rope_type", "llama3"},
          {"factor", shortest_float(factor)},
          {"low_freq_factor", low},
          {"high_freq_factor", high},
          {"original_max_position_embeddings", static_cast<std::int64_t>(original)}};
}

// HF tensor name for a GGUF tensor name, or empty for rope_freqs.
std::string hf_name(const std::string& gguf_name, const std::string& label) {
  if (std::optional<std::string> hf = hf_tensor_name(gguf_name)) return *hf;
  fail("{}: tensor '{}' has no Hugging Face counterpart mopt knows", label, printable(gguf_name));
}

// Pre-tokenizer (and model options) for llama.cpp's tokenizer.ggml.pre names.
struct PreTokenizerChoice {
  json normalizer;
  json pre_tokenizer;
  bool ignore_merges;
};

const char* const kLlama3Split = kLlama3SplitRegex;
const char* const kQwen2Split = kQwen2SplitRegex;

PreTokenizerChoice pre_tokenizer_for(const std::string& pre, const std::string& label) {
  const json byte_level_after_split = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}};
  const json byte_level_gpt2 = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  auto split = [](const char* regex) {
    return json{{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
  };
  if (pre == "llama-bpe" || pre == "llama3") {
    return {nullptr, {{"type", "Sequence"}, {"pretokenizers", {split(kLlama3Split), byte_level_after_split}}}, true};
  }
  if (pre == "qwen2") {
    return {{{"type", "NFC"}}, {{"type", "Sequence"}, {"pretokenizers", {split(kQwen2Split), byte_level_after_split}}}, false};
  }
  if (pre == "smollm") {
    // SmolLM's own tokenizer.json: every digit alone, then GPT-2's regex.
    return {nullptr,
            {{"type", "Sequence"}, {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, byte_level_gpt2}}},
            false};
  }
  if (pre == "gpt-2" || pre == "gpt2") return {nullptr, byte_level_gpt2, false};
  fail("{}: tokenizer.ggml.pre '{}' is not supported (llama-bpe, qwen2, smollm, gpt-2)", label, printable(pre));
}

std::vector<std::string> string_array(const GgufFile& g, const char* key) {
  const GgufValue* v = g.find(key);
  if (v == nullptr) fail("{}: missing metadata '{}'", g.path(), key);
  if (v->type != GgufValueType::array || v->element_type != GgufValueType::string) fail("{}: metadata '{}' must be an array of strings", g.path(), key);
  return v->value.get<std::vector<std::string>>();
}

std::vector<std::int64_t> int_array(const GgufFile& g, const char* key) {
  const GgufValue* v = g.find(key);
  if (v == nullptr) return {};
  if (v->type != GgufValueType::array || !(v->value.empty() || v->value[0].is_number_integer())) {
    fail("{}: metadata '{}' must be an array of integers", g.path(), key);
  }
  return v->value.get<std::vector<std::int64_t>>();
}


}  // namespace

namespace {

// llama.cpp's Q/K permutation and its inverse: within each head of d rows, row j*(d/2) + i <-> row 2i + j.
void move_rope_rows(float* data, std::int64_t rows, std::int64_t cols, std::int64_t heads, bool to_gguf) {
  if (heads <= 0 || rows % heads != 0 || (rows / heads) % 2 != 0) {
    fail("cannot {} the RoPE permutation: {} rows do not split into {} heads of even size", to_gguf ? "apply" : "undo", rows, heads);
  }
  const std::int64_t d = rows / heads;
  std::vector<float> copy(data, data + rows * cols);
  for (std::int64_t h = 0; h < heads; ++h) {
    for (std::int64_t i = 0; i < d / 2; ++i) {
      for (std::int64_t j = 0; j < 2; ++j) {
        const std::int64_t halves = h * d + j * (d / 2) + i, pairs = h * d + 2 * i + j;
        const std::int64_t from = to_gguf ? halves : pairs, to = to_gguf ? pairs : halves;
        std::copy(copy.begin() + from * cols, copy.begin() + (from + 1) * cols, data + to * cols);
      }
    }
  }
}

}  // namespace

void unpermute_rope_rows(float* data, std::int64_t rows, std::int64_t cols, std::int64_t heads) {
  move_rope_rows(data, rows, cols, heads, false);
}

void permute_rope_rows(float* data, std::int64_t rows, std::int64_t cols, std::int64_t heads) {
  move_rope_rows(data, rows, cols, heads, true);
}

json gguf_to_hf_config(const GgufFile& g) {
  const ArchitectureNames& arch = architecture_of(g);
  const std::string p = std::string(arch.gguf) + ".";
  const auto hidden = static_cast<std::int64_t>(g.get_uint(p + "embedding_length"));
  const auto heads = static_cast<std::int64_t>(g.get_uint(p + "attention.head_count"));
  const auto kv_heads = static_cast<std::int64_t>(g.find_uint(p + "attention.head_count_kv").value_or(static_cast<std::uint64_t>(heads)));
  const auto head_dim = static_cast<std::int64_t>(g.find_uint(p + "attention.key_length").value_or(static_cast<std::uint64_t>(heads > 0 ? hidden / heads : 0)));
  std::int64_t vocab = 0;
  if (const auto v = g.find_uint(p + "vocab_size")) {
    vocab = static_cast<std::int64_t>(*v);
  } else {
    vocab = static_cast<std::int64_t>(string_array(g, "tokenizer.ggml.tokens").size());
  }
  const double theta = g.find_float(p + "rope.freq_base").value_or(10000.0);
  json c = {
      {"architectures", {arch.hf_architecture}},
      {"model_type", arch.model_type},
      {"vocab_size", vocab},
      {"hidden_size", hidden},
      {"intermediate_size", static_cast<std::int64_t>(g.get_uint(p + "feed_forward_length"))},
      {"num_hidden_layers", static_cast<std::int64_t>(g.get_uint(p + "block_count"))},
      {"num_attention_heads", heads},
      {"num_key_value_heads", kv_heads},
      {"head_dim", head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", static_cast<std::int64_t>(g.get_uint(p + "context_length"))},
      {"rms_norm_eps", shortest_float(g.get_float(p + "attention.layer_norm_rms_epsilon"))},
      {"rope_theta", shortest_float(theta)},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", g.find_tensor("output.weight") == nullptr},
      {"torch_dtype", "bfloat16"},
  };
  if (const auto type = g.find_string(p + "rope.scaling.type"); type && *type != "none") {
    if (*type != "linear") fail("{}: rope scaling '{}' is not supported", g.path(), printable(*type));
    c["rope_scaling"] = {{"rope_type", "linear"}, {"factor", shortest_float(g.get_float(p + "rope.scaling.factor"))}};
  }
  if (const GgufTensorInfo* freqs = g.find_tensor("rope_freqs.weight")) {
    const auto divisors = g.dequantize(*freqs).to_f32();
    const auto rotary_dim = static_cast<std::int64_t>(g.find_uint(p + "rope.dimension_count").value_or(static_cast<std::uint64_t>(head_dim)));
    c["rope_scaling"] = llama3_scaling_from_freqs(divisors, theta, rotary_dim, g.path());
  }
  if (arch.model_type == std::string("llama") || arch.model_type == std::string("qwen3")) {
    c["attention_bias"] = g.find_tensor("blk.0.attn_q.bias") != nullptr;
  }
  if (arch.model_type == std::string("llama") && g.find_tensor("blk.0.ffn_gate.bias") != nullptr) c["mlp_bias"] = true;
  if (const auto bos = g.find_uint("tokenizer.ggml.bos_token_id")) c["bos_token_id"] = *bos;
  if (const auto eos = g.find_uint("tokenizer.ggml.eos_token_id")) c["eos_token_id"] = *eos;
  return c;
}

json gguf_to_hf_tokenizer(const GgufFile& g) {
  const std::string model = g.get_string("tokenizer.ggml.model");
  if (model != "gpt2") fail("{}: tokenizer.ggml.model '{}' is not supported (gpt2)", g.path(), printable(model));
  const std::string pre = g.find_string("tokenizer.ggml.pre").value_or("gpt-2");
  const PreTokenizerChoice choice = pre_tokenizer_for(pre, g.path());
  const auto tokens = string_array(g, "tokenizer.ggml.tokens");
  const auto merges = string_array(g, "tokenizer.ggml.merges");
  const auto types = int_array(g, "tokenizer.ggml.token_type");
  if (!types.empty() && types.size() != tokens.size()) {
    fail("{}: {} token types for {} tokens", g.path(), types.size(), tokens.size());
  }
  json vocab = json::object();
  json added = json::array();
  for (std::size_t id = 0; id < tokens.size(); ++id) {
    const std::int64_t type = types.empty() ? 1 : types[id];
    if (!vocab.emplace(tokens[id], id).second) fail("{}: token '{}' appears twice", g.path(), printable(tokens[id]));
    if (type == 3 || type == 4) {  // control (special) and user-defined added tokens
      added.push_back({{"id", id}, {"content", tokens[id]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", type == 3}});
    }
  }
  json merge_pairs = json::array();
  for (std::size_t i = 0; i < merges.size(); ++i) {
    const auto space = merges[i].find(' ');
    if (space == std::string::npos) fail("{}: merge {} '{}' is not two tokens", g.path(), i, printable(merges[i]));
    merge_pairs.push_back({merges[i].substr(0, space), merges[i].substr(space + 1)});
  }
  json single = json::array();
  json special_tokens = json::object();
  bool add_bos = false;
  if (const GgufValue* v = g.find("tokenizer.ggml.add_bos_token")) add_bos = v->value.is_boolean() && v->value.get<bool>();
  if (add_bos) {
    const auto bos = g.get_uint("tokenizer.ggml.bos_token_id");
    if (bos >= tokens.size()) fail("{}: bos_token_id {} is not a token", g.path(), bos);
    const std::string& name = tokens[static_cast<std::size_t>(bos)];
    single.push_back({{"SpecialToken", {{"id", name}, {"type_id", 0}}}});
    special_tokens[name] = {{"id", name}, {"ids", {bos}}, {"tokens", {name}}};
  }
  single.push_back({{"Sequence", {{"id", "A"}, {"type_id", 0}}}});
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", choice.normalizer},
      {"pre_tokenizer", choice.pre_tokenizer},
      {"post_processor", {{"type", "TemplateProcessing"}, {"single", single}, {"pair", json::array()}, {"special_tokens", special_tokens}}},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
        {"ignore_merges", choice.ignore_merges}, {"vocab", vocab}, {"merges", merge_pairs}}},
  };
}

void convert_gguf_to_hf(const std::string& gguf_path, const std::string& out_dir,
                        const std::function<void(std::size_t, std::size_t)>& progress, DType dtype) {
  if (dtype != DType::BF16 && dtype != DType::F32) fail("GGUF conversion stores bf16 or f32, not {}", dtype_name(dtype));
  if (fs::exists(out_dir)) fail("{}: already exists; choose a new directory", out_dir);
  const GgufFile g = GgufFile::open(gguf_path);
  const ArchitectureNames& arch = architecture_of(g);
  json config = gguf_to_hf_config(g);
  if (dtype == DType::F32) config["torch_dtype"] = "float32";
  const ModelConfig model_config = parse_model_config(config.dump(), out_dir + "/config.json");
  const json tokenizer = gguf_to_hf_tokenizer(g);

  // Dequantize, undo the permutation, and store every tensor as bf16.
  std::vector<NamedTensor> tensors;
  const auto& infos = g.header().tensors;
  for (std::size_t i = 0; i < infos.size(); ++i) {
    const GgufTensorInfo& info = infos[i];
    // A weight's per-tensor ".scale" (NVFP4's second-level scale) multiplies it; it has no tensor of its own.
    constexpr std::string_view kScale = ".scale";
    if (info.name.size() > kScale.size() && info.name.substr(info.name.size() - kScale.size()) == kScale) {
      const std::string weight = info.name.substr(0, info.name.size() - kScale.size()) + ".weight";
      if (g.find_tensor(weight) == nullptr) fail("{}: {} scales no tensor ({} is missing)", g.path(), info.name, weight);
      continue;
    }
    const std::string name = hf_name(info.name, g.path());
    if (name.empty()) continue;
    Tensor t = g.dequantize(info);
    const bool weight = info.name.size() > 7 && info.name.substr(info.name.size() - 7) == ".weight";
    if (const std::string base = info.name.substr(0, info.name.rfind('.')); weight && g.find_tensor(base + ".scale") != nullptr) {
      const GgufTensorInfo* scale = g.find_tensor(base + ".scale");
      const std::vector<float> sv = g.dequantize(*scale).to_f32();
      if (sv.size() != 1 || !std::isfinite(sv[0])) fail("{}: {}.scale must be one finite value", g.path(), base);
      float* v = t.mutable_data<float>();
      for (std::uint64_t k = 0; k < t.numel(); ++k) v[k] *= sv[0];
    }
    if (arch.permuted_qk && (name.find(".self_attn.q_proj.") != std::string::npos || name.find(".self_attn.k_proj.") != std::string::npos)) {
      const bool is_q = name.find(".q_proj.") != std::string::npos;
      const std::int64_t rows = t.dim(0);
      const std::int64_t cols = t.rank() > 1 ? t.dim(1) : 1;
      unpermute_rope_rows(t.mutable_data<float>(), rows, cols, is_q ? model_config.num_heads : model_config.num_kv_heads);
    }
    tensors.push_back({name, dtype == DType::F32 ? std::move(t) : t.to(DType::BF16)});
    if (progress) progress(i + 1, infos.size());
  }
  // The checkpoint must be exactly what config.json calls for.
  std::sort(tensors.begin(), tensors.end(), [](const NamedTensor& a, const NamedTensor& b) { return a.name < b.name; });

  const std::string tmp = make_temp_dir_beside(out_dir);
  try {
    write_safetensors((fs::path(tmp) / "model.safetensors").string(), tensors);
    write_file_atomically((fs::path(tmp) / "config.json").string(), config.dump(2) + "\n");
    write_file_atomically((fs::path(tmp) / "tokenizer.json").string(),
                          tokenizer.dump(-1, ' ', false, json::error_handler_t::replace) + "\n");
    json tokenizer_config = {{"tokenizer_class", "PreTrainedTokenizerFast"}};
    if (const auto tmpl = g.find_string("tokenizer.chat_template")) tokenizer_config["chat_template"] = *tmpl;
    const auto names = string_array(g, "tokenizer.ggml.tokens");
    auto token_name = [&](const char* key) -> json {
      const auto id = g.find_uint(key);
      if (!id || *id >= names.size()) return nullptr;
      return names[static_cast<std::size_t>(*id)];
    };
    tokenizer_config["bos_token"] = token_name("tokenizer.ggml.bos_token_id");
    tokenizer_config["eos_token"] = token_name("tokenizer.ggml.eos_token_id");
    tokenizer_config["unk_token"] = token_name("tokenizer.ggml.unknown_token_id");
    tokenizer_config["pad_token"] = token_name("tokenizer.ggml.padding_token_id");
    write_file_atomically((fs::path(tmp) / "tokenizer_config.json").string(),
                          tokenizer_config.dump(2, ' ', false, json::error_handler_t::replace) + "\n");
    json generation = json::object();
    if (config.contains("bos_token_id")) generation["bos_token_id"] = config["bos_token_id"];
    if (config.contains("eos_token_id")) generation["eos_token_id"] = config["eos_token_id"];
    write_file_atomically((fs::path(tmp) / "generation_config.json").string(), generation.dump(2) + "\n");
    // Read the result back as any checkpoint is read: it must validate.
    Checkpoint::open(tmp);
    fs::rename(tmp, out_dir);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
}

}  // namespace mopt::io
