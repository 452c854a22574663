// The layer-streaming pipeline and the checkpoint it writes: calibration
// statistics equal those of a whole-model forward pass, the exported tensors
// are the real quantization of the source weights, the checkpoint loads back
// and evaluates, and bad input fails cleanly with nothing left behind.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "algo/ptq.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "export/hf_modelopt.h"
#include "load/load_model.h"
#include "io/dataset.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "quant/fake_quant.h"
#include "support/temp_dir.h"

namespace mopt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using testing::TempDir;

std::string tiny_llama() { return testing::data_path("hf/llama"); }
std::string tiny_kjv() { return std::string(MOPT_MODELS_DIR) + "/tiny-kjv"; }

algo::CalibrationSet synthetic_calibration(std::int64_t n, std::int64_t len, std::int32_t vocab) {
  algo::CalibrationSet c;
  std::uint32_t state = 7;
  for (std::int64_t s = 0; s < n; ++s) {
    std::vector<std::int32_t> seq;
    for (std::int64_t t = 0; t < len; ++t) {
      state = state * 1664525u + 1013904223u;
      seq.push_back(static_cast<std::int32_t>((state >> 8) % static_cast<std::uint32_t>(vocab)));
    }
    c.sequences.push_back(std::move(seq));
  }
  return c;
}

quant::Recipe recipe(const std::string& format, std::optional<std::string> kv = std::nullopt) {
  quant::Recipe r;
  r.format = format;
  r.algorithm = "max";
  r.kv_cache = std::move(kv);
  return r;
}

void quantize_to(const std::string& model, const quant::Recipe& r, const algo::CalibrationSet& calib, const std::string& out,
                 algo::PtqReport* report = nullptr) {
  const io::Checkpoint ckpt = io::Checkpoint::open(model);
  exporter::HfModeloptWriter writer(ckpt, out, r, 64 << 10);  // small shards: exercise sharding
  const auto rep = algo::quantize_checkpoint(ckpt, r, calib, {}, [&](quant::QuantizedLayer&& l) { writer.add_layer(l); });
  writer.finish();
  if (report) *report = rep;
}

// Input amax per (layer, linear) and K/V amax seen by a whole-model forward pass, batch by batch.
struct WholeModelStats : model::LayerObserver {
  std::map<std::pair<std::int64_t, int>, float> input_max;
  std::map<std::int64_t, float> key_max, value_max;
  void linear_input(std::int64_t layer, model::LinearKind kind, const float* x, std::int64_t rows, std::int64_t cols) override {
    float& m = input_max[{layer, static_cast<int>(kind)}];
    for (std::int64_t i = 0; i < rows * cols; ++i) m = std::max(m, std::fabs(x[i]));
  }
  void key_value(std::int64_t layer, const float* k, const float* v, std::int64_t rows, std::int64_t kv_dim) override {
    for (std::int64_t i = 0; i < rows * kv_dim; ++i) {
      key_max[layer] = std::max(key_max[layer], std::fabs(k[i]));
      value_max[layer] = std::max(value_max[layer], std::fabs(v[i]));
    }
  }
};

TEST(Ptq, ExportHoldsTheRealQuantizationOfTheSourceAndTheCalibratedScales) {
  TempDir tmp;
  const auto calib = synthetic_calibration(3, 40, 256);
  const std::string out = tmp.file("q");
  quantize_to(tiny_llama(), recipe("fp8", "fp8"), calib, out);

  // Oracle for the activation statistics: the whole model, unquantized, on the same sequences.
  auto m = model::Model::load(tiny_llama());
  WholeModelStats stats;
  std::vector<float> logits;
  for (const auto& seq : calib.sequences) {
    const model::SequenceSpan span{0, static_cast<std::int64_t>(seq.size()), 0, 0};
    m.forward(seq, {&span, 1}, nullptr, model::LogitsFor::last_row_of_each_sequence, logits, &stats);
  }
  const auto store = io::TensorStore::open_dir(out);
  const auto src = io::TensorStore::open_dir(tiny_llama());
  for (std::int64_t l = 0; l < 2; ++l) {
    for (const auto kind : model::kAllLinears) {
      const std::string name = fmt::format("model.layers.{}.{}", l, model::linear_name(kind));
      SCOPED_TRACE(name);
      const float input_scale = store.tensor(name + ".input_scale").to_f32()[0];
      EXPECT_EQ(input_scale, (stats.input_max[std::make_pair(l, static_cast<int>(kind))] / 448.0f));
      const Tensor w = src.tensor(name + ".weight");
      const auto wf = w.to_f32();
      const auto spec = *quant::format_scheme("fp8").weight;
      const auto q = quant::quantize_weight(spec, wf.data(), w.dim(0), w.dim(1), quant::compute_amax(spec, wf.data(), w.dim(0), w.dim(1)));
      const Tensor stored = store.tensor(name + ".weight");
      ASSERT_EQ(stored.dtype(), DType::F8_E4M3);
      ASSERT_EQ(stored.nbytes(), q.weight.nbytes());
      EXPECT_EQ(0, std::memcmp(stored.bytes().data(), q.weight.bytes().data(), stored.nbytes()));
      EXPECT_EQ(store.tensor(name + ".weight_scale").to_f32()[0], q.weight_scale.data<float>()[0]);
    }
    EXPECT_EQ(store.tensor(fmt::format("model.layers.{}.self_attn.k_proj.k_scale", l)).to_f32()[0], stats.key_max[l] / 448.0f);
    EXPECT_EQ(store.tensor(fmt::format("model.layers.{}.self_attn.v_proj.v_scale", l)).to_f32()[0], stats.value_max[l] / 448.0f);
  }
  // Unquantized tensors are copied bit for bit.
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"}) {
    const Tensor a = store.tensor(name), b = src.tensor(name);
    ASSERT_EQ(a.nbytes(), b.nbytes());
    EXPECT_EQ(0, std::memcmp(a.bytes().data(), b.bytes().data(), a.nbytes())) << name;
  }
  const auto hf = io::parse_json_unique_keys(io::read_text_file(out + "/hf_quant_config.json"), "hf");
  EXPECT_EQ(hf["quantization"]["quant_algo"], "FP8");
  EXPECT_EQ(hf["quantization"]["kv_cache_quant_algo"], "FP8");
  const auto cfg = io::parse_json_unique_keys(io::read_text_file(out + "/config.json"), "cfg");
  EXPECT_EQ(cfg["quantization_config"]["quant_method"], "modelopt");
  EXPECT_TRUE(fs::exists(out + "/model.safetensors.index.json"));  // 64 KiB shards
}

TEST(Ptq, FusedGroupsShareScalesExceptForPerTensorFp8) {
  TempDir tmp;
  quantize_to(tiny_llama(), recipe("nvfp4"), synthetic_calibration(2, 32, 256), tmp.file("q"));
  const auto store = io::TensorStore::open_dir(tmp.file("q"));
  for (const char* t : {"input_scale", "weight_scale_2"}) {
    const float q = store.tensor(std::string("model.layers.0.self_attn.q_proj.") + t).to_f32()[0];
    EXPECT_EQ(store.tensor(std::string("model.layers.0.self_attn.k_proj.") + t).to_f32()[0], q) << t;
    EXPECT_EQ(store.tensor(std::string("model.layers.0.self_attn.v_proj.") + t).to_f32()[0], q) << t;
    EXPECT_EQ(store.tensor(std::string("model.layers.0.mlp.gate_proj.") + t).to_f32()[0],
              store.tensor(std::string("model.layers.0.mlp.up_proj.") + t).to_f32()[0]) << t;
  }
}

TEST(Ptq, EveryFormatLoadsBackAndStaysCloseToTheModel) {
  // tiny-kjv on real text: each format's perplexity is finite and within a format-dependent margin.
  auto base = model::Model::load(tiny_kjv());
  const auto docs = io::read_documents(std::string(MOPT_SOURCE_DIR) + "/data/kjv-calib.txt");
  const auto calib = algo::make_calibration_set(docs, base.require_tokenizer(), 4, 64, 0);
  std::vector<std::int32_t> text = base.require_tokenizer().encode(io::read_text_file(std::string(MOPT_SOURCE_DIR) + "/data/kjv-heldout.txt").substr(0, 3000), false);
  const double base_ppl = eval::perplexity(base, text, 256, 256).perplexity;
  const std::map<std::string, double> margin = {{"fp8", 1.02},     {"fp8_pc_pt", 1.02}, {"fp8_block", 1.02}, {"int8", 1.03},
                                                {"int8_wo", 1.01}, {"int4_rtn", 1.25}, {"w4a8_awq", 1.3},   {"nvfp4", 1.15},
                                                {"mxfp8", 1.03},   {"mxfp4", 1.5}};
  for (const auto& [format, factor] : margin) {
    SCOPED_TRACE(format);
    TempDir tmp;
    auto r = recipe(format);
    if (format == "int4_rtn" || format == "w4a8_awq") r.group_size = 64;  // tiny-kjv's 704 inputs: 11 groups of 64
    quantize_to(tiny_kjv(), r, calib, tmp.file("q"));
    auto m = load::load_model(tmp.file("q"));
    EXPECT_LT(m.weight_bytes(), base.weight_bytes());
    const double ppl = eval::perplexity(m, text, 256, 256).perplexity;
    EXPECT_TRUE(std::isfinite(ppl));
    EXPECT_NE(ppl, base_ppl);  // the quantization is really applied
    EXPECT_LT(ppl, base_ppl * factor) << "base " << base_ppl;
  }
}

TEST(Ptq, MixedPrecisionRecipesExportPerLayerAlgorithms) {
  TempDir tmp;
  auto r = recipe("int4_rtn");
  r.group_size = 32;  // the tiny model's Linears have 64 and 160 inputs
  r.overrides = {{"*.mlp.down_proj", "int8_wo"}, {"*.layers.1.self_attn.*", "none"}};
  quantize_to(tiny_llama(), r, {}, tmp.file("q"));
  const auto hf = io::parse_json_unique_keys(io::read_text_file(tmp.file("q") + "/hf_quant_config.json"), "hf");
  EXPECT_EQ(hf["quantization"]["quant_algo"], "MIXED_PRECISION");
  EXPECT_EQ(hf["quantization"]["quantized_layers"]["model.layers.0.mlp.down_proj"]["quant_algo"], "W8A16");
  EXPECT_EQ(hf["quantization"]["quantized_layers"]["model.layers.0.mlp.up_proj"]["quant_algo"], "W4A16_AWQ");
  EXPECT_EQ(hf["quantization"]["quantized_layers"]["model.layers.0.mlp.up_proj"]["group_size"], 32);
  const auto cfg = io::parse_json_unique_keys(io::read_text_file(tmp.file("q") + "/config.json"), "cfg");
  EXPECT_EQ(cfg["quantization_config"]["config_groups"].size(), 2u);
  EXPECT_FALSE(hf["quantization"]["quantized_layers"].contains("model.layers.1.self_attn.q_proj"));
  const auto store = io::TensorStore::open_dir(tmp.file("q"));
  EXPECT_EQ(store.tensor("model.layers.1.self_attn.q_proj.weight").dtype(), DType::BF16);
  EXPECT_EQ(store.tensor("model.layers.0.mlp.down_proj.weight").dtype(), DType::I8);
  auto m = load::load_model(tmp.file("q"));
  EXPECT_EQ(m.num_layers(), 2);
}

TEST(Ptq, StaticActivationFormatsNeedCalibrationText) {
  TempDir tmp;
  const io::Checkpoint ckpt = io::Checkpoint::open(tiny_llama());
  EXPECT_TRUE(algo::needs_calibration(ckpt.config(), recipe("fp8")));
  EXPECT_FALSE(algo::needs_calibration(ckpt.config(), recipe("int4_rtn")));
  EXPECT_TRUE(algo::needs_calibration(ckpt.config(), recipe("int4_rtn", "fp8")));
  EXPECT_THROW(algo::quantize_checkpoint(ckpt, recipe("fp8"), {}, {}, [](quant::QuantizedLayer&&) {}), Error);
}

TEST(Ptq, ANanWeightIsReportedByNameAndNothingIsWritten) {
  TempDir tmp;
  // A copy of the tiny model with one NaN in layer 1's up_proj.
  const std::string bad = tmp.file("bad");
  fs::create_directories(bad);
  fs::copy_file(tiny_llama() + "/config.json", bad + "/config.json");
  const auto src = io::TensorStore::open_dir(tiny_llama());
  std::vector<io::NamedTensor> tensors;
  for (const auto& loc : src.all()) {
    Tensor t = src.tensor(loc.entry->name).clone();
    if (loc.entry->name == "model.layers.1.mlp.up_proj.weight") t.mutable_data<std::uint16_t>()[5] = 0x7FC0;
    tensors.push_back({loc.entry->name, t});
  }
  io::write_safetensors(bad + "/model.safetensors", tensors);
  const std::string out = tmp.file("out");
  try {
    quantize_to(bad, recipe("int8_wo"), {}, out);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.up_proj.weight: non-finite value"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  for (const auto& entry : fs::directory_iterator(tmp.path())) EXPECT_EQ(entry.path().filename().string().find("out.tmp"), std::string::npos);
}

TEST(Ptq, PartialInt4GroupsAreRefusedAsTheReferenceDoes) {
  TempDir tmp;
  try {
    quantize_to(tiny_kjv(), recipe("int4_rtn"), {}, tmp.file("q"));  // down_proj has 704 inputs
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.down_proj: INT4 export needs the input dimension (704)"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(tmp.file("q")));
}

TEST(Ptq, DamagedQuantizedCheckpointsAreRefusedByName) {
  TempDir tmp;
  const std::string good = tmp.file("good");
  quantize_to(tiny_llama(), recipe("fp8"), synthetic_calibration(2, 16, 256), good);
  // Rewrites `good` into `dir` with one tensor changed (or dropped) and/or a different hf_quant_config.json.
  auto damaged = [&](const std::string& dir, const std::string& tensor, std::optional<Tensor> replacement, const std::string& quant_json) {
    fs::create_directories(dir);
    for (const char* f : {"config.json", "hf_quant_config.json"}) fs::copy_file(good + "/" + f, dir + "/" + f);
    if (!quant_json.empty()) std::ofstream(dir + "/hf_quant_config.json", std::ios::trunc) << quant_json;
    const auto store = io::TensorStore::open_dir(good);
    std::vector<io::NamedTensor> tensors;
    for (const auto& loc : store.all()) {
      if (loc.entry->name == tensor) {
        if (replacement) tensors.push_back({tensor, *replacement});
        continue;
      }
      tensors.push_back({loc.entry->name, store.tensor(loc.entry->name)});
    }
    io::write_safetensors(dir + "/model.safetensors", tensors);
    return dir;
  };
  auto expect_error = [](const std::string& dir, const std::string& needle) {
    try {
      load::load_model(dir);
      ADD_FAILURE() << "no error for " << dir;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const std::string scale = "model.layers.1.mlp.up_proj.weight_scale";
  expect_error(damaged(tmp.file("d1"), scale, Tensor::zeros(DType::BF16, {}), ""), scale.substr(0, scale.size() - 13) + ": weight_scale is bf16");
  expect_error(damaged(tmp.file("d2"), scale, Tensor::zeros(DType::F32, {}), ""), "a weight scale is 0");
  expect_error(damaged(tmp.file("d3"), "model.layers.0.self_attn.o_proj.input_scale", std::nullopt, ""), "o_proj.input_scale is missing");
  expect_error(damaged(tmp.file("d4"), "", std::nullopt, R"({"quantization": {"quant_algo": "INT3"}})"), "quant_algo 'INT3' is not one mopt reads");
  expect_error(damaged(tmp.file("d5"), "", std::nullopt, R"({"quantization": 7})"), "no \"quantization\" object");
  expect_error(damaged(tmp.file("d6"), "model.layers.0.mlp.down_proj.weight", Tensor::zeros(DType::F8_E4M3, {64, 64}), ""),
               "down_proj: weight is f8_e4m3 [64, 64], expected f8_e4m3 [64, 160]");
  // mopt's Q4_0-grid key: only "q4_0", and only on INT4 block weights.
  expect_error(damaged(tmp.file("d7"), "", std::nullopt, R"({"quantization": {"quant_algo": "FP8", "int4_grid": "q5_0"}})"),
               "int4_grid \"q5_0\" is not one mopt reads");
  expect_error(damaged(tmp.file("d8"), "", std::nullopt, R"({"quantization": {"quant_algo": "FP8", "int4_grid": "q4_0"}})"),
               "is FP8, which has no Q4_0 grid");
  // ... and its key for weights stored as a GGUF file's blocks: the five types, INT4/INT8 weights only.
  expect_error(damaged(tmp.file("d9"), "", std::nullopt, R"({"quantization": {"quant_algo": "FP8", "gguf_blocks": "q2_k"}})"),
               "gguf_blocks \"q2_k\" is not one mopt reads");
  expect_error(damaged(tmp.file("d10"), "", std::nullopt, R"({"quantization": {"quant_algo": "FP8", "gguf_blocks": "q4_k"}})"),
               "is FP8, which is not stored in GGUF blocks");
  EXPECT_NO_THROW(load::load_model(good));
}

TEST(Ptq, AShapeTheLayoutCannotHoldIsRefusedBeforeAnyCalibrationWork) {
  // tiny-kjv's down_proj has 704 inputs: not whole groups of 128. The error names it before the
  // calibration tokens are even embedded (this calibration set's out-of-range token id never shows).
  const io::Checkpoint ckpt = io::Checkpoint::open(tiny_kjv());
  quant::Recipe r;
  r.format = "int4_awq";
  r.group_size = 128;
  algo::CalibrationSet calib;
  calib.sequences = {{0, 1, 1 << 30}};
  try {
    algo::quantize_checkpoint(ckpt, r, calib, {}, [](quant::QuantizedLayer&&) {}, [](quant::QuantizedLayer&&) {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.mlp.down_proj: INT4 export needs the input dimension (704) to be a multiple of the group size (128)"),
              std::string::npos)
        << e.what();
  }
}

TEST(Ptq, AnExistingOutputDirectoryIsRefused) {
  TempDir tmp;
  const io::Checkpoint ckpt = io::Checkpoint::open(tiny_llama());
  EXPECT_THROW(exporter::HfModeloptWriter(ckpt, tmp.path().string(), recipe("int8_wo")), Error);
}

// Layer 0 of `weights` on the embeddings of `calib` (one forward call per sequence): ||y - y_fp|| / ||y_fp||.
double layer0_error(model::Model& fp, const model::LayerWeights& weights, const algo::CalibrationSet& calib,
                    const std::string& model_dir = tiny_kjv()) {
  const auto& c = fp.config();
  const std::vector<float> inv_freq = model::rope_inv_freq(c);
  const Tensor embed = io::Checkpoint::open(model_dir).tensor("model.embed_tokens.weight");
  const std::vector<float> table = embed.to_f32();
  model::Workspace ws;
  double num = 0.0, den = 0.0;
  for (const auto& seq : calib.sequences) {
    const auto rows = static_cast<std::int64_t>(seq.size());
    std::vector<float> x(static_cast<std::size_t>(rows * c.hidden_size));
    for (std::int64_t t = 0; t < rows; ++t) {
      std::copy_n(table.begin() + seq[t] * c.hidden_size, c.hidden_size, x.begin() + t * c.hidden_size);
    }
    std::vector<float> y = x;
    const std::vector<model::SequenceSpan> spans = {{0, rows, 0, 0}};
    model::decoder_layer_forward(c, inv_freq, 0, fp.layer(0), x.data(), rows, spans, nullptr, ws, nullptr);
    model::decoder_layer_forward(c, inv_freq, 0, weights, y.data(), rows, spans, nullptr, ws, nullptr);
    for (std::size_t i = 0; i < x.size(); ++i) {
      num += (static_cast<double>(y[i]) - x[i]) * (static_cast<double>(y[i]) - x[i]);
      den += static_cast<double>(x[i]) * x[i];
    }
  }
  return std::sqrt(num / den);
}

TEST(Ptq, AlgorithmsExportWhatTheyEvaluatedAndBeatRoundToNearest) {
  // The export (scales folded into norms or into v_proj/up_proj rows, pre_quant_scale kept on o_proj and
  // down_proj, smoothed weights) loaded back gives layer 0 exactly the output error the pipeline measured;
  // and every algorithm lowers the layers' output error below round-to-nearest's on this data.
  auto base = model::Model::load(tiny_kjv());
  const auto docs = io::read_documents(std::string(MOPT_SOURCE_DIR) + "/data/kjv-calib.txt");
  const auto calib = algo::make_calibration_set(docs, base.require_tokenizer(), 4, 64, 0);
  struct Case {
    const char* format;
    const char* algorithm;
  } cases[] = {{"int8_sq", "smoothquant"}, {"int4_awq", "awq_lite"},  {"int4_awq", "awq_full"},     {"int4_awq", "gptq"},
               {"w4a8_awq", "awq_lite"},   {"nvfp4_awq", "awq_lite"}, {"int4_awq", "awq_lite+gptq"}, {"nvfp4", "gptq"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.format) + " " + c.algorithm);
    TempDir tmp;
    quant::Recipe r;
    r.format = c.format;
    r.algorithm = c.algorithm;
    if (std::string(c.format) == "int4_awq" || std::string(c.format) == "w4a8_awq") r.group_size = 64;  // 704 = 11 x 64
    algo::PtqReport report;
    quantize_to(tiny_kjv(), r, calib, tmp.file("q"), &report);
    EXPECT_EQ(report.algorithm, c.algorithm);
    // The definition (fake quantization): the kernels' own roundings are checked in tests/load/quantized_run_test.cpp.
    auto m = load::load_model(tmp.file("q"), load::QuantizedRun::fake_quant);
    EXPECT_NEAR(layer0_error(base, m.layer(0), calib), report.layers[0].output_error, 1e-6 + 1e-4 * report.layers[0].output_error);
    double before = 0.0, after = 0.0;
    for (const auto& l : report.layers) {
      ASSERT_GE(l.output_error_rtn, 0.0);
      before += l.output_error_rtn;
      after += l.output_error;
      EXPECT_LT(l.weight_error, 0.5);  // measured on the weight the export stands for, scales multiplied back
    }
    EXPECT_LT(after, before);
    if (std::string(c.algorithm).find("awq_lite") != std::string::npos) {
      EXPECT_EQ(report.layers[0].alphas.size(), 7u);
    }
  }
}

// tiny-kjv cut to 2 layers with as many KV heads as query heads (k/v weights made from q's), so that
// NVFP4_AWQ's export can fold o_proj's scale into v_proj's rows.
std::string mha_tiny_kjv(const TempDir& tmp) {
  const std::string dir = tmp.file("mha");
  fs::create_directories(dir);
  json config = io::parse_json_unique_keys(io::read_text_file(tiny_kjv() + "/config.json"), "config.json");
  config["num_hidden_layers"] = 2;
  config["num_key_value_heads"] = config["num_attention_heads"];
  std::ofstream(dir + "/config.json") << config.dump(2);
  fs::copy_file(tiny_kjv() + "/tokenizer.json", dir + "/tokenizer.json");
  const auto store = io::TensorStore::open_dir(tiny_kjv());
  std::vector<io::NamedTensor> tensors;
  for (const auto& loc : store.all()) {
    const std::string& n = loc.entry->name;
    if (n.rfind("model.layers.", 0) == 0 && n.rfind("model.layers.0.", 0) != 0 && n.rfind("model.layers.1.", 0) != 0) continue;
    const bool kv = n.find("k_proj.weight") != std::string::npos || n.find("v_proj.weight") != std::string::npos;
    if (!kv) {
      tensors.push_back({n, store.tensor(n)});
      continue;
    }
    // [hidden, hidden] from q_proj, rows permuted so k and v differ from q.
    const std::string q = n.substr(0, n.find("self_attn.")) + "self_attn.q_proj.weight";
    std::vector<float> w = store.tensor(q).to_f32();
    const std::int64_t rows = store.tensor(q).dim(0), cols = store.tensor(q).dim(1);
    std::vector<float> p(w.size());
    const std::int64_t shift = n.find("k_proj") != std::string::npos ? 1 : 2;
    for (std::int64_t r = 0; r < rows; ++r) std::copy_n(w.begin() + ((r * 7 + shift) % rows) * cols, cols, p.begin() + r * cols);
    tensors.push_back({n, Tensor::from_f32(p, {rows, cols}).to(DType::BF16)});
  }
  io::write_safetensors(dir + "/model.safetensors", tensors);
  return dir;
}

TEST(Ptq, Nvfp4AwqFoldsOprojScaleIntoVprojRowsWithoutGqa) {
  TempDir tmp;
  const std::string mha = mha_tiny_kjv(tmp);
  auto base = model::Model::load(mha);
  const auto docs = io::read_documents(std::string(MOPT_SOURCE_DIR) + "/data/kjv-calib.txt");
  const auto calib = algo::make_calibration_set(docs, base.require_tokenizer(), 4, 64, 0);
  quant::Recipe r;
  r.format = "nvfp4_awq";
  algo::PtqReport report;
  quantize_to(mha, r, calib, tmp.file("q"), &report);
  const auto out = io::TensorStore::open_dir(tmp.file("q"));
  // Folded: o_proj and down_proj keep no pre_quant_scale (down_proj's went into up_proj's rows), q/k/v's and
  // gate/up's went into the norms.
  for (const char* n : {"self_attn.o_proj", "mlp.down_proj", "self_attn.q_proj", "mlp.up_proj"}) {
    EXPECT_FALSE(out.contains(std::string("model.layers.0.") + n + ".pre_quant_scale")) << n;
  }
  auto m = load::load_model(tmp.file("q"));
  EXPECT_NEAR(layer0_error(base, m.layer(0), calib, mha), report.layers[0].output_error, 1e-6 + 1e-4 * report.layers[0].output_error);
  // With GQA (tiny-kjv itself) o_proj's scale cannot be folded and stays.
  TempDir tmp2;
  quantize_to(tiny_kjv(), r, calib, tmp2.file("q"));
  const auto gqa = io::TensorStore::open_dir(tmp2.file("q"));
  EXPECT_TRUE(gqa.contains("model.layers.0.self_attn.o_proj.pre_quant_scale"));
  EXPECT_FALSE(gqa.contains("model.layers.0.mlp.down_proj.pre_quant_scale"));
}

TEST(Ptq, PropagatingQuantizedOutputsChangesLaterLayersOnly) {
  TempDir tmp;
  const auto calib = synthetic_calibration(2, 32, 256);
  const io::Checkpoint ckpt = io::Checkpoint::open(tiny_llama());
  std::vector<float> fp_amax, q_amax;
  for (bool propagate : {false, true}) {
    algo::PtqOptions o;
    o.propagate_quantized = propagate;
    algo::quantize_checkpoint(ckpt, recipe("int8"), calib, o, [&](quant::QuantizedLayer&& l) {
      (propagate ? q_amax : fp_amax).push_back(l.linears[0].input_amax.at(0));
    });
  }
  EXPECT_EQ(fp_amax[0], q_amax[0]);
  EXPECT_NE(fp_amax[1], q_amax[1]);
}

TEST(Calibration, SamplesAreDeterministicAndPrefixed) {
  const auto tok = io::Tokenizer::load(tiny_kjv());
  const auto docs = io::read_documents(std::string(MOPT_SOURCE_DIR) + "/data/kjv-calib.txt");
  const auto a = algo::make_calibration_set(docs, tok, 8, 32, 1);
  const auto b = algo::make_calibration_set(docs, tok, 8, 32, 1);
  const auto c = algo::make_calibration_set(docs, tok, 8, 32, 2);
  ASSERT_EQ(a.sequences.size(), 8u);
  EXPECT_EQ(a.sequences, b.sequences);
  EXPECT_NE(a.sequences, c.sequences);
  for (const auto& s : a.sequences) {
    EXPECT_LE(s.size(), 32u);
    EXPECT_EQ(s.front(), tok.prefix_special_ids().empty() ? s.front() : tok.prefix_special_ids()[0]);
  }
}

TEST(Dataset, JsonlRecordsAndTheirErrors) {
  TempDir tmp;
  std::ofstream(tmp.file("ok.jsonl")) << "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"id\": 3}\n";
  EXPECT_EQ(io::read_documents(tmp.file("ok.jsonl")), (std::vector<std::string>{"one", "two"}));
  std::ofstream(tmp.file("bad.jsonl")) << "{\"text\": \"one\"}\n{\"txt\": 1}\n";
  try {
    io::read_documents(tmp.file("bad.jsonl"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl:2"), std::string::npos) << e.what();
  }
  std::ofstream(tmp.file("broken.jsonl")) << "{\"text\": \"on\n";
  EXPECT_THROW(io::read_documents(tmp.file("broken.jsonl")), Error);
  std::ofstream(tmp.file("empty.txt")) << "  \n";
  EXPECT_THROW(io::read_documents(tmp.file("empty.txt")), Error);
  EXPECT_THROW(io::read_documents(tmp.file("missing.txt")), Error);
}

}  // namespace
}  // namespace mopt
