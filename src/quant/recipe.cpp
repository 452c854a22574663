#include "quant/recipe.h"

#include <algorithm>
#include <cstdint>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/ggml_grid.h"
#include "io/gguf.h"
#include "io/json_util.h"
#include "quant/formats.h"

namespace mopt::quant {

const std::vector<std::string>& algorithm_names() {
  static const std::vector<std::string> names = {"max", "smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq", "awq_lite+gptq"};
  return names;
}

void check_algorithm_supports(const std::string& algorithm, const LinearScheme& s) {
  if (!s.weight) return;
  const QuantizerSpec& w = *s.weight;
  if (algorithm == "smoothquant" && !(w.element == Element::int8 && s.input && s.input->element == Element::int8)) {
    fail("smoothquant smooths INT8 weights and INT8 activations (int8, int8_sq); format {} is not W8A8", s.format);
  }
  if ((algorithm == "awq_clip" || algorithm == "awq_full") && w.grid == IntGrid::ggml) {
    fail("{} searches clip ratios of a symmetric grid; {} blocks take their scales from llama.cpp's own search (use awq_lite, gptq or "
         "awq_lite+gptq)", algorithm, w.describe());
  }
  if ((algorithm == "awq_clip" || algorithm == "awq_full") &&
      !(w.scaling == Scaling::block && w.block_rows == 0 && w.element == Element::int4 && !w.fp8_second_stage)) {
    fail("{} searches clip ratios per block of INT4 block-quantized weights (int4_rtn, int4_awq); format {} is not", algorithm, s.format);
  }
  if (algorithm == "gptq" || algorithm == "awq_lite+gptq") {
    const bool grid = w.element == Element::int8 || w.element == Element::int4 || w.element == Element::e4m3;
    const bool fixed = w.scaling == Scaling::per_tensor || w.scaling == Scaling::per_row || w.scaling == Scaling::block;
    const bool nvfp4 = w.element == Element::e2m1 && w.scaling == Scaling::nvfp4;
    if (!(grid && fixed) && !nvfp4) {
      fail("{} runs on INT4/INT8/FP8 weights with static scales and on NVFP4; format {} ({}) is not supported", algorithm, s.format, w.describe());
    }
    if (w.fp8_second_stage) fail("{} is not implemented for W4A8's two-stage weights (format {})", algorithm, s.format);
  }
}

const std::vector<std::string>& format_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& r : format_table()) n.push_back(r.name);
    return n;
  }();
  return names;
}

bool format_takes_group_size(const std::string& name) {
  const FormatRow* row = find_format(name);
  return row != nullptr && row->group_size_option;
}

LinearScheme format_scheme(const std::string& name, std::int64_t group_size) {
  LinearScheme s;
  s.default_algorithm = "max";
  if (name == "none") {  // left unquantized (sparsity alone)
    if (group_size > 0) fail("--group-size applies to the INT4 formats only; format none quantizes nothing");
    return s;
  }
  const FormatRow* row = find_format(name);
  if (row == nullptr) {
    std::string known;
    for (const auto& r : format_table()) known += (known.empty() ? "" : ", ") + r.name;
    fail("unknown format '{}' (known: {})", name, known);
  }
  if (group_size > 0 && !row->group_size_option) fail("--group-size applies to the INT4 formats only; {} has a fixed block", name);
  s.format = row->name;
  s.quant_algo = row->quant_algo;
  s.weight = row->weight;
  if (group_size > 0) s.weight->block = group_size;
  s.input = row->input;
  s.default_algorithm = row->default_algorithm;
  return s;
}

bool glob_match(std::string_view pattern, std::string_view name) {
  std::size_t p = 0, n = 0, star = std::string_view::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == name[n])) {
      ++p;
      ++n;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

const std::vector<std::string>& default_exclusions() {
  static const std::vector<std::string> globs = {
      "*lm_head*",     "*proj_out.*",       "*block_sparse_moe.gate*", "*router*", "*mlp.gate.*",
      "*mlp.shared_expert_gate.*", "*output_layer*", "output.*", "*linear_attn.conv1d*", "*mixer.conv1d*"};
  return globs;
}

LinearScheme Recipe::scheme_for(const std::string& module) const {
  const bool head = quantize_lm_head && module == "lm_head";
  for (const auto& g : default_exclusions()) {
    if (!head && glob_match(g, module)) return {};
  }
  for (const auto& g : exclude) {
    if (glob_match(g, module)) return {};
  }
  LinearScheme s = format_scheme(format, format_takes_group_size(format) ? group_size : 0);
  for (const auto& o : overrides) {
    if (!glob_match(o.pattern, module)) continue;
    s = o.format == "none" ? LinearScheme{} : format_scheme(o.format, format_takes_group_size(o.format) ? group_size : 0);
  }
  if (s.weight && s.weight->element == Element::int4 && s.weight->scaling == Scaling::block && !s.weight->fp8_second_stage) {
    s.weight->grid = int4_grid;
  }
  const auto blocks = ggml_blocks.find(module);
  if (blocks != ggml_blocks.end() && s.weight && !s.weight->fp8_second_stage &&
      ((s.weight->element == Element::int4 && s.weight->scaling == Scaling::block) ||
       (s.weight->element == Element::int8 && s.weight->scaling == Scaling::per_row))) {
    const auto info = io::ggml_type_info(static_cast<std::uint32_t>(blocks->second));
    if (!info || !io::ggml_has_grid(blocks->second)) fail("{}: ggml type {} has no integer grid to quantize onto", module, static_cast<std::uint32_t>(blocks->second));
    s.weight->grid = IntGrid::ggml;
    s.weight->ggml_type = blocks->second;
    s.weight->scaling = Scaling::block;
    s.weight->block = info->block_elements;
    s.weight->block_rows = 0;
  }
  return s;
}

std::string Recipe::effective_algorithm() const {
  return algorithm.empty() ? format_scheme(format, format_takes_group_size(format) ? group_size : 0).default_algorithm
                           : algorithm;
}

bool Recipe::sparse_for(const std::string& module) const {
  if (sparsity.empty()) return false;
  for (const auto& g : {std::string("*lm_head*"), std::string("*proj_out.*"), std::string("*output_layer*"), std::string("output.*")}) {
    if (glob_match(g, module)) return false;
  }
  for (const auto& g : sparse_exclude) {
    if (glob_match(g, module)) return false;
  }
  return true;
}

void Recipe::validate() const {
  if (!sparsity.empty() && sparsity != "2:4") fail("sparsity '{}': only 2:4 is supported", sparsity);
  if (!sparsity.empty() && sparse_algo != "magnitude" && sparse_algo != "sparsegpt" && sparse_algo != "sparsegpt-mask") {
    fail("unknown sparsity algorithm '{}' (known: magnitude, sparsegpt, sparsegpt-mask)", sparse_algo);
  }
  if (format == "none" && sparsity.empty() && !kv_cache && overrides.empty()) {
    fail("format none quantizes nothing: give a format, a KV-cache format, overrides or --sparsity 2:4");
  }
  const LinearScheme base = format_scheme(format, group_size);
  for (const auto& o : overrides) {
    if (o.format != "none") format_scheme(o.format, format_takes_group_size(o.format) ? group_size : 0);
  }
  if (kv_cache) kv_scheme(*kv_cache);
  const std::string algo = effective_algorithm();
  const auto& names = algorithm_names();
  if (std::find(names.begin(), names.end(), algo) == names.end()) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    fail("unknown algorithm '{}' (known: {})", algo, list);
  }
  check_algorithm_supports(algo, base);
  for (const auto& o : overrides) {
    // The algorithm runs on every quantized Linear, the lm_head included.
    if (o.format == "none") continue;
    with_context("override " + o.pattern, [&] {
      check_algorithm_supports(algo, format_scheme(o.format, format_takes_group_size(o.format) ? group_size : 0));
    });
  }
  if (calibrator == CalibMethod::entropy && base.input && base.input->element != Element::int8) {
    fail("entropy calibration is defined for integer activations; {} quantizes activations to {}", format, element_name(base.input->element));
  }
  if (!(percentile > 0.0 && percentile <= 100.0)) fail("percentile {} is outside (0, 100]", percentile);
  if (calib_size <= 0 || seq_len <= 1) fail("calibration needs at least one sample of at least 2 tokens");
}

namespace {

// An integer field; a fraction or a number outside int64 is refused (not converted).
std::int64_t integer_field(const nlohmann::json& value, const std::string& key) {
  if (value.is_number_unsigned()) {
    const auto v = value.get<std::uint64_t>();
    if (v > static_cast<std::uint64_t>(INT64_MAX)) fail("\"{}\" is too large", key);
    return static_cast<std::int64_t>(v);
  }
  if (!value.is_number_integer()) fail("\"{}\" must be an integer", key);
  return value.get<std::int64_t>();
}

}  // namespace

Recipe parse_recipe(const std::string& json_text, const std::string& label) {
  const nlohmann::json j = io::parse_json_unique_keys(json_text, label);
  if (!j.is_object()) fail("{}: a recipe is a JSON object", label);
  Recipe r;
  try {
    for (const auto& [key, value] : j.items()) {
      if (key == "format") r.format = value.get<std::string>();
      else if (key == "group_size") r.group_size = integer_field(value, key);
      else if (key == "algorithm") r.algorithm = value.get<std::string>();
      else if (key == "kv_cache") {
        if (!value.is_null()) r.kv_cache = value.get<std::string>();
      } else if (key == "calibrator") r.calibrator = parse_calib_method(value.get<std::string>());
      else if (key == "percentile") {
        if (!value.is_number()) fail("\"percentile\" must be a number");
        r.percentile = value.get<double>();
      }
      else if (key == "quantize_lm_head") {
        if (!value.is_boolean()) fail("\"quantize_lm_head\" must be true or false");
        r.quantize_lm_head = value.get<bool>();
      } else if (key == "exclude") r.exclude = value.get<std::vector<std::string>>();
      else if (key == "overrides") {
        for (const auto& o : value) r.overrides.push_back({o.at("pattern").get<std::string>(), o.at("format").get<std::string>()});
      } else if (key == "calib_size") r.calib_size = integer_field(value, key);
      else if (key == "seq_len") r.seq_len = integer_field(value, key);
      else if (key == "sparsity") r.sparsity = value.is_null() ? std::string() : value.get<std::string>();
      else if (key == "sparse_algo") r.sparse_algo = value.get<std::string>();
      else if (key == "sparse_exclude") r.sparse_exclude = value.get<std::vector<std::string>>();
      else if (key == "seed") {
        const std::int64_t seed = integer_field(value, key);
        if (seed < 0) fail("\"seed\" must not be negative");
        r.seed = static_cast<std::uint64_t>(seed);
      }
      else fail("unknown key '{}'", key);
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: malformed recipe: {}", label, e.what());
  } catch (const Error& e) {
    fail("{}: {}", label, e.what());
  }
  if (r.format.empty()) fail("{}: the recipe names no \"format\"", label);
  with_context(label, [&] { r.validate(); });
  return r;
}

Recipe load_recipe(const std::string& path) { return parse_recipe(io::read_text_file(path), path); }

}  // namespace mopt::quant
