// tiny-kjv cut to its first two layers, its calibration set and held-out
// tokens, and quantizing it into an export: what the export and kernel tests
// build their checkpoints from (the sanitizer build is slow, so two layers).
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "algo/ptq.h"
#include "export/hf_modelopt.h"
#include "io/dataset.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "support/temp_dir.h"

namespace mopt::testing {

inline std::string tiny_kjv() { return std::string(MOPT_MODELS_DIR) + "/tiny-kjv"; }

// tiny-kjv's first two layers (the tests quantize it many times; the sanitizer build is slow);
// `tied`: with its lm_head dropped and tie_word_embeddings set, as Llama-3.2-1B is.
inline std::string two_layer_tiny_kjv(bool tied = false) {
  static const TempDir dir;
  static std::map<bool, std::string> paths;
  if (paths.count(tied)) return paths[tied];
  const std::string path = [tied] {
    const std::string out = dir.file(tied ? "tiny-kjv-2-tied" : "tiny-kjv-2");
    std::filesystem::create_directories(out);
    nlohmann::json config = io::parse_json_unique_keys(io::read_text_file(tiny_kjv() + "/config.json"), "config.json");
    config["num_hidden_layers"] = 2;
    if (tied) config["tie_word_embeddings"] = true;
    std::ofstream(out + "/config.json") << config.dump(2);
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
      if (std::filesystem::exists(tiny_kjv() + "/" + f)) std::filesystem::copy_file(tiny_kjv() + "/" + f, out + "/" + f);
    }
    const auto store = io::TensorStore::open_dir(tiny_kjv());
    std::vector<io::NamedTensor> tensors;
    for (const auto& loc : store.all()) {
      const std::string& n = loc.entry->name;
      if (n.rfind("model.layers.", 0) == 0 && n.rfind("model.layers.0.", 0) != 0 && n.rfind("model.layers.1.", 0) != 0) continue;
      if (tied && n == "lm_head.weight") continue;
      tensors.push_back({n, store.tensor(n)});
    }
    io::write_safetensors(out + "/model.safetensors", tensors);
    return out;
  }();
  paths[tied] = path;
  return path;
}

inline const algo::CalibrationSet& calibration() {
  static const algo::CalibrationSet calib = [] {
    auto base = model::Model::load(tiny_kjv());
    const auto docs = io::read_documents(std::string(MOPT_SOURCE_DIR) + "/data/kjv-calib.txt");
    return algo::make_calibration_set(docs, base.require_tokenizer(), 4, 64, 0);
  }();
  return calib;
}

inline const std::vector<std::int32_t>& heldout() {
  static const std::vector<std::int32_t> ids = [] {
    auto base = model::Model::load(tiny_kjv());
    return base.require_tokenizer().encode(io::read_text_file(std::string(MOPT_SOURCE_DIR) + "/data/kjv-heldout.txt").substr(0, 4000), false);
  }();
  return ids;
}

// The two-layer tiny-kjv quantized by `r` on calibration() (none when `calibrate` is false), written
// as a modelopt checkpoint at `out`.
inline algo::PtqReport quantize_recipe(const quant::Recipe& r, const std::string& out, bool fold = false, bool tied = false,
                                       bool calibrate = true) {
  const io::Checkpoint ckpt = io::Checkpoint::open(two_layer_tiny_kjv(tied));
  exporter::HfModeloptWriter writer(ckpt, out, r);
  algo::PtqOptions o;
  o.fold_pre_quant_scales = fold;
  algo::PtqReport report = algo::quantize_checkpoint(ckpt, r, calibrate ? calibration() : algo::CalibrationSet{}, o, [&](quant::QuantizedLayer&& l) { writer.add_layer(l); },
                                                     [&](quant::QuantizedLayer&& h) { writer.add_head(h); });
  writer.finish();
  return report;
}

inline algo::PtqReport quantize(const std::string& format, const std::string& algorithm, const std::string& out, bool fold = false,
                                std::optional<std::string> kv = std::nullopt, bool quantize_lm_head = false, bool tied = false) {
  quant::Recipe r;
  r.quantize_lm_head = quantize_lm_head;
  r.format = format;
  r.algorithm = algorithm;
  r.kv_cache = std::move(kv);
  if (format.rfind("int4", 0) == 0 || format == "w4a8_awq") r.group_size = 64;
  return quantize_recipe(r, out, fold, tied);
}

}  // namespace mopt::testing
