// Exports beyond the modelopt checkpoint: compressed-tensors (vLLM's INT4
// path) and GGUF from mopt's quantized checkpoints. Each carries the codes and
// scales of the export it comes from, so it computes what the fake-quantized
// model computes; each passes the engines' loading rules (export/conformance.h).
#include "export/compressed_tensors.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

#include "algo/ptq.h"
#include "algo/sparsity.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "eval/perplexity.h"
#include "export/conformance.h"
#include "export/gguf_export.h"
#include "export/hf_modelopt.h"
#include "export/targets.h"
#include "io/compressed_tensors_packing.h"
#include "load/load_model.h"
#include "load/modelopt.h"
#include "io/dataset.h"
#include "io/gguf.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "support/sha256.h"
#include "support/temp_dir.h"
#include "support/tiny_kjv.h"

namespace mopt::exporter {
namespace {

using load::load_model;
using load::QuantizedRun;
using io::is_sparse24;
using io::pack_int32_rows;
using io::Sparse24Bitmask;
using io::sparse24_bitmask_compress;
using io::sparse24_bitmask_decompress;
using io::unpack_int32_rows;

namespace fs = std::filesystem;
using nlohmann::json;
using testing::TempDir;
using testing::calibration;
using testing::heldout;
using testing::quantize;
using testing::tiny_kjv;
using testing::two_layer_tiny_kjv;

std::vector<float> logits_of(const std::string& dir) {
  model::Model m = load_model(dir);
  const std::vector<std::int32_t> tokens(heldout().begin(), heldout().begin() + 96);
  const model::SequenceSpan span{0, static_cast<std::int64_t>(tokens.size()), 0, 0};
  std::vector<float> logits;
  m.forward(tokens, std::span<const model::SequenceSpan>(&span, 1), nullptr, model::LogitsFor::all_rows, logits);
  return logits;
}

// The logits of a compressed-tensors export against those of the checkpoint it came from: the same
// numbers, except for NVFP4, whose global scales compressed-tensors stores as reciprocals. 1/(1/s) is
// not s for about one f32 in six, so an activation value that sits on an E2M1 rounding boundary may
// round the other way: a few logits move by a few hundredths (0.023 seen on one CPU), the mean by
// ~5e-5. A wrong scale or a misread code moves the mean by orders of magnitude more.
void expect_same_logits(const std::vector<float>& a, const std::vector<float>& b, const std::string& format) {
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  double worst = 0.0, sum = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - b[i]);
    worst = std::max(worst, d);
    sum += d;
  }
  if (format == "nvfp4") {
    EXPECT_LE(sum / static_cast<double>(a.size()), 5e-4);
    EXPECT_LE(worst, 0.1);
  } else {
    EXPECT_EQ(worst, 0.0);
  }
}

double ppl_of(const std::string& path) {
  model::Model m = load_model(path);
  return eval::perplexity(m, heldout(), 256, 256).perplexity;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& e : v) s += e + "\n";
  return s;
}

TEST(CompressedTensors, PacksLikePackToInt32) {
  // compressed-tensors' pack_to_int32: offset 8, the first value in the lowest nibble.
  const std::vector<std::int8_t> codes = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};
  const Tensor p = pack_int32_rows(codes, 1, 16, 4);
  ASSERT_EQ(p.shape(), (Shape{1, 2}));
  EXPECT_EQ(static_cast<std::uint32_t>(p.data<std::int32_t>()[0]), 0xFEDCBA98u);
  EXPECT_EQ(static_cast<std::uint32_t>(p.data<std::int32_t>()[1]), 0x76543210u);
  const Tensor p8 = pack_int32_rows({-128, 127, 0, -1, 5}, 1, 5, 8);  // padded with code 0
  ASSERT_EQ(p8.shape(), (Shape{1, 2}));
  EXPECT_EQ(static_cast<std::uint32_t>(p8.data<std::int32_t>()[0]), 0x7F80FF00u);
  EXPECT_EQ(static_cast<std::uint32_t>(p8.data<std::int32_t>()[1]), 0x80808085u);
  std::mt19937 rng(3);
  for (const int bits : {4, 8}) {
    std::uniform_int_distribution<int> d(-(1 << (bits - 1)), (1 << (bits - 1)) - 1);
    std::vector<std::int8_t> v(7 * 45);
    for (auto& x : v) x = static_cast<std::int8_t>(d(rng));
    EXPECT_EQ(unpack_int32_rows(pack_int32_rows(v, 7, 45, bits), 7, 45, bits), v) << bits;
  }
  EXPECT_THROW(unpack_int32_rows(pack_int32_rows(codes, 1, 16, 4), 1, 24, 4), Error);
  // modelopt's INT4 layout, the other side of the conversion: rows 2r and 2r+1 share a byte.
  const Tensor m = quant::pack_int4_rows({-8, 7, 1, -1}, 2, 2);
  ASSERT_EQ(m.shape(), (Shape{1, 2}));
  EXPECT_EQ(m.data<std::uint8_t>()[0], 0x18);
  EXPECT_EQ(m.data<std::uint8_t>()[1], 0xF7);
  std::uniform_int_distribution<int> d4(-8, 7);
  std::vector<std::int8_t> v(6 * 33);
  for (auto& x : v) x = static_cast<std::int8_t>(d4(rng));
  EXPECT_EQ(quant::unpack_int4_rows(quant::pack_int4_rows(v, 6, 33), 6, 33), v);
  EXPECT_THROW(quant::unpack_int4_rows(m, 2, 3), Error);
}

TEST(CompressedTensors, EveryFormatComputesExactlyWhatTheModeloptExportDoes) {
  struct Case {
    const char* format;
    const char* kv;
    bool vllm_modelopt, trtllm_ct;
  };
  const Case cases[] = {{"int4_rtn", nullptr, false, false}, {"int8_wo", nullptr, false, false}, {"int8", nullptr, false, false},
                        {"fp8", "fp8", true, true},         {"fp8_pc_pt", nullptr, true, true}, {"nvfp4", nullptr, true, false}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.format);
    TempDir tmp;
    quantize(c.format, "max", tmp.file("modelopt"), false, c.kv ? std::optional<std::string>(c.kv) : std::nullopt);
    const auto report = export_compressed_tensors(tmp.file("modelopt"), tmp.file("ct"));
    EXPECT_EQ(report.quantized_linears, 14);
    EXPECT_TRUE(report.requantized.empty());
    expect_same_logits(logits_of(tmp.file("modelopt")), logits_of(tmp.file("ct")), c.format);
    // The engines' loading rules.
    EXPECT_EQ(joined(check_engine_rules(tmp.file("ct"), Engine::vllm)), "");
    EXPECT_EQ(check_engine_rules(tmp.file("ct"), Engine::trtllm).empty(), c.trtllm_ct) << joined(check_engine_rules(tmp.file("ct"), Engine::trtllm));
    EXPECT_EQ(joined(check_engine_rules(tmp.file("modelopt"), Engine::trtllm)), "");
    const auto vllm = check_engine_rules(tmp.file("modelopt"), Engine::vllm);
    if (c.vllm_modelopt) {
      EXPECT_EQ(joined(vllm), "");
    } else {
      ASSERT_EQ(vllm.size(), 1u) << joined(vllm);
      EXPECT_NE(vllm[0].find("rejected by its modelopt loader"), std::string::npos) << vllm[0];
    }
    const json qc = io::parse_json_unique_keys(io::read_text_file(tmp.file("ct/config.json")), "config")["quantization_config"];
    EXPECT_EQ(qc["quant_method"], "compressed-tensors");
    EXPECT_EQ(qc["quantization_status"], "compressed");
    EXPECT_EQ(qc["ignore"], json::array({"lm_head"}));
    EXPECT_TRUE(fs::exists(tmp.file("ct/tokenizer.json")));
  }
}

// compressed-tensors 0.14's Sparse24BitMaskCompressor on bf16 and fp8 2:4 tensors, a width not a
// multiple of 8, groups with fewer than two non-zeros (tests/data/sparsity/sparse24_bitmask.*): the
// same bytes; its outputs decompress to the inputs' values; what is not 2:4 is refused, not pruned.
TEST(Sparse24Bitmask, MatchesCompressedTensors) {
  const auto gold = io::TensorStore::open_file(testing::data_path("sparsity/sparse24_bitmask.safetensors"));
  const auto raw = [](const Tensor& t) { return std::vector<std::byte>(t.bytes().begin(), t.bytes().end()); };
  for (const std::string c : {"bf16_24", "fp8_24", "bf16_cols20", "bf16_zeros", "fp8_zeros"}) {
    SCOPED_TRACE(c);
    const Tensor in = gold.tensor(c + ".input");
    EXPECT_TRUE(is_sparse24(in));
    const Sparse24Bitmask b = sparse24_bitmask_compress(in, c);
    for (const std::string part : {"compressed", "bitmask", "shape"}) {
      const Tensor want = gold.tensor(c + "." + part);
      const Tensor& got = part == "compressed" ? b.compressed : part == "bitmask" ? b.bitmask : b.shape;
      EXPECT_EQ(got.dtype(), want.dtype()) << part;
      EXPECT_EQ(got.shape(), want.shape()) << part;
      EXPECT_EQ(raw(got), raw(want)) << part;
    }
    const Tensor back = sparse24_bitmask_decompress(gold.tensor(c + ".compressed"), gold.tensor(c + ".bitmask"), gold.tensor(c + ".shape"), c);
    EXPECT_EQ(back.to_f32(), in.to_f32());
  }
  for (const std::string c : {"bf16_dense", "fp8_dense", "bf16_cols6"}) {
    EXPECT_FALSE(is_sparse24(gold.tensor(c + ".input"))) << c;
    EXPECT_THROW(sparse24_bitmask_compress(gold.tensor(c + ".input"), c), Error) << c;
  }
  // Damaged parts are named.
  const Tensor bm = gold.tensor("bf16_24.bitmask");
  try {
    sparse24_bitmask_decompress(gold.tensor("bf16_24.compressed"), gold.tensor("bf16_zeros.bitmask"), gold.tensor("bf16_24.shape"), "layer.x");
    ADD_FAILURE() << "a bitmask of the wrong size was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer.x.bitmask"), std::string::npos) << e.what();
  }
  Tensor more = bm.clone();
  more.mutable_data<std::uint8_t>()[0] = 0xFF;  // keeps more than half of a row
  EXPECT_THROW(sparse24_bitmask_decompress(gold.tensor("bf16_24.compressed"), more, gold.tensor("bf16_24.shape"), "layer.x"), Error);
}

// INT8 codes: -128 (0x80) is a value, not a signed zero — a group holding it with two other
// non-zeros is not 2:4, and a 2:4 one keeps it through compression.
TEST(Sparse24Bitmask, Int8MinusOneTwentyEightIsNotZero) {
  const std::vector<std::int8_t> dense = {-128, 5, 0, 0, 0, 0, -128, 7, 0, -128, 0, 0, 1, 0, 0, -2};
  Tensor t = Tensor::zeros(DType::I8, {2, 8});
  std::copy(dense.begin(), dense.end(), t.mutable_data<std::int8_t>());
  ASSERT_TRUE(is_sparse24(t));
  const Sparse24Bitmask b = sparse24_bitmask_compress(t, "int8");
  EXPECT_EQ(b.compressed.to_f32(), std::vector<float>({-128, 5, -128, 7, -128, 0, 1, -2}));
  EXPECT_EQ(sparse24_bitmask_decompress(b.compressed, b.bitmask, b.shape, "int8").to_f32(), t.to_f32());
  t.mutable_data<std::int8_t>()[2] = 9;  // -128, 5, 9, 0: three non-zeros
  EXPECT_FALSE(is_sparse24(t));
  EXPECT_THROW(sparse24_bitmask_compress(t, "int8"), Error);
}

// A 2:4 model in every format, exported to compressed-tensors: weights stored whole (16-bit, FP8,
// INT8) become sparse-24-bitmask, packed ones stay packed under a "dense" sparsity_config; every
// export loads and computes exactly what the dense-with-zeros checkpoint it came from computes.
TEST(CompressedTensors, SparseExportsComputeWhatTheDenseExportDoes) {
  struct Case {
    const char* format;
    const char* sparsity_format;
  } cases[] = {{"none", "sparse-24-bitmask"}, {"fp8", "sparse-24-bitmask"}, {"int8", "sparse-24-bitmask"}, {"int4_rtn", "dense"}, {"nvfp4", "dense"}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.format);
    TempDir tmp;
    quant::Recipe r;
    r.format = c.format;
    r.algorithm = "max";
    r.sparsity = "2:4";
    r.sparse_algo = "sparsegpt";
    if (r.format == "int4_rtn") r.group_size = 64;
    {
      const io::Checkpoint ckpt = io::Checkpoint::open(two_layer_tiny_kjv());
      HfModeloptWriter writer(ckpt, tmp.file("dense"), r);
      const auto report = algo::quantize_checkpoint(ckpt, r, calibration(), {}, [&](quant::QuantizedLayer&& l) { writer.add_layer(l); });
      EXPECT_EQ(report.sparse_linears, 14);
      writer.finish();
    }
    EXPECT_EQ(load::is_quantized_checkpoint(tmp.file("dense")), std::string(c.format) != "none");
    const auto report = export_compressed_tensors(tmp.file("dense"), tmp.file("ct"), 4ull << 30, true);
    EXPECT_EQ(report.sparse_linears, 14);
    EXPECT_EQ(report.sparsity_format, c.sparsity_format);
    const auto store = io::TensorStore::open_dir(tmp.file("ct"));
    EXPECT_EQ(store.contains("model.layers.1.mlp.down_proj.compressed"), std::string(c.sparsity_format) == "sparse-24-bitmask");
    EXPECT_FALSE(store.contains("model.layers.1.mlp.down_proj.weight") && std::string(c.format) == "none");
    const json qc = io::parse_json_unique_keys(io::read_text_file(tmp.file("ct/config.json")), "config")["quantization_config"];
    EXPECT_EQ(qc["sparsity_config"]["format"], c.sparsity_format);
    EXPECT_EQ(qc["sparsity_config"]["sparsity_structure"], "2:4");
    EXPECT_EQ(qc["sparsity_config"]["targets"], json::array({"Linear"}));
    EXPECT_EQ(qc.contains("config_groups"), std::string(c.format) != "none");
    expect_same_logits(logits_of(tmp.file("dense")), logits_of(tmp.file("ct")), c.format);
    // 16-bit and FP8 weights run on the 2:4 kernels; decoding token by token through them (the
    // GEMV) gives the logits of the prefill (weights decoded into tiles, the dense products).
    {
      model::Model k = load_model(tmp.file("ct"));
      const std::string kind = k.layer(0).linear(model::LinearKind::gate).describe();
      // (FP8 2:4 runs its own kernel only with AVX-512, where it beats the dense one; W8A8 and INT4 only
      // with AVX-512 VBMI and VNNI: inputs a multiple of 64 (INT4) or 32 (W8A8), gate's 256 and down's 704.)
      const std::string format = c.format;
      const CpuFeatures& f = cpu_features();
      const bool vbmi = f.avx512bw && f.avx512_vbmi && f.avx512_vnni;
      const bool sparse_kernel = format == "none" || (format == "fp8" && f.avx512f) || ((format == "int8" || format == "int4_rtn") && vbmi);
      EXPECT_EQ(kind.find("2:4") != std::string::npos, sparse_kernel) << kind;
      const std::string down = k.layer(0).linear(model::LinearKind::down).describe();
      if (format == "int8" || format == "int4_rtn") EXPECT_EQ(down.find("2:4") != std::string::npos, vbmi) << down;
      const std::vector<std::int32_t> tokens(heldout().begin(), heldout().begin() + 6);
      std::vector<float> prefill, step;
      const model::SequenceSpan all{0, 6, 0, 0};
      k.forward(tokens, std::span<const model::SequenceSpan>(&all, 1), nullptr, model::LogitsFor::last_row_of_each_sequence, prefill);
      model::KvCache cache = k.new_cache(1, 8);
      for (std::int64_t t = 0; t < 6; ++t) {
        const model::SequenceSpan one{0, 1, t, 0};
        k.forward(std::span<const std::int32_t>(tokens.data() + t, 1), std::span<const model::SequenceSpan>(&one, 1), &cache,
                  model::LogitsFor::last_row_of_each_sequence, step);
      }
      ASSERT_EQ(prefill.size(), step.size());
      double step_worst = 0.0, scale = 0.0;
      for (std::size_t i = 0; i < step.size(); ++i) {
        step_worst = std::max(step_worst, std::fabs(static_cast<double>(step[i]) - prefill[i]));
        scale = std::max(scale, std::fabs(static_cast<double>(prefill[i])));
      }
      // f32 sums in another order (FP8 inputs may round across a step); the INT4 GEMV rounds its input
      // to int8 by design, so only the 2:4 kernels are held to this.
      if (sparse_kernel && format != "int4_rtn") EXPECT_LT(step_worst, 2e-3 * scale);
    }
    // Every decoder Linear reads back 2:4.
    model::Model m = load_model(tmp.file("ct"), QuantizedRun::fake_quant);
    for (std::int64_t l = 0; l < m.num_layers(); ++l) {
      for (const auto kind : model::kAllLinears) {
        const model::Linear& lin = m.layer(l).linear(kind);
        const std::vector<float> v = lin.weight_f32();
        EXPECT_TRUE(algo::is_24_sparse(v.data(), lin.out_features(), lin.in_features())) << l << " " << model::linear_name(kind);
      }
    }
    // The GGUF export reads it too: plain Linears stored as .compressed/.bitmask/.shape go over dense,
    // weight for weight (bf16 holds the 16-bit weights exactly).
    if (std::string(c.format) == "none") {
      const auto g = export_gguf(tmp.file("ct"), tmp.file("m.gguf"), gguf_options_from_name("bf16"));
      EXPECT_EQ(g.exact_linears + g.requantized_linears, 0);
      model::Model from_gguf = load_model(tmp.file("m.gguf"));
      for (std::int64_t l = 0; l < m.num_layers(); ++l) {
        for (const auto kind : model::kAllLinears) {
          EXPECT_EQ(from_gguf.layer(l).linear(kind).weight_f32(), m.layer(l).linear(kind).weight_f32()) << l << " " << model::linear_name(kind);
        }
      }
      // One Linear's bitmask gone: an error naming it, and no GGUF file.
      fs::copy(tmp.file("ct"), tmp.file("ct-broken"), fs::copy_options::recursive);
      const auto broken = io::TensorStore::open_dir(tmp.file("ct"));
      ASSERT_EQ(broken.files().size(), 1u);
      std::vector<io::NamedTensor> kept;
      for (const auto& loc : broken.all()) {
        if (loc.entry->name != "model.layers.1.mlp.down_proj.bitmask") kept.push_back({loc.entry->name, broken.tensor(loc.entry->name)});
      }
      const std::string file = tmp.file("ct-broken") + "/" + fs::path(broken.files()[0].path()).filename().string();
      io::write_safetensors(file, kept);
      try {
        export_gguf(tmp.file("ct-broken"), tmp.file("broken.gguf"), gguf_options_from_name("bf16"));
        ADD_FAILURE() << "a 2:4 Linear without its bitmask was exported";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("model.layers.1.mlp.down_proj"), std::string::npos) << e.what();
      }
      EXPECT_FALSE(fs::exists(tmp.file("broken.gguf")));
    }
  }
  // A dense model has nothing for sparse-24-bitmask to hold.
  TempDir tmp;
  quantize("fp8", "max", tmp.file("dense"));
  EXPECT_THROW(export_compressed_tensors(tmp.file("dense"), tmp.file("ct"), 4ull << 30, true), Error);
  EXPECT_FALSE(fs::exists(tmp.file("ct")));
}

TEST(CompressedTensors, FormatsWithoutAFormAndKeptScalesAreRefusedByName) {
  TempDir tmp;
  auto error_of = [&](const std::string& dir) {
    try {
      export_compressed_tensors(dir, tmp.file("never"));
    } catch (const Error& e) {
      EXPECT_FALSE(fs::exists(tmp.file("never")));
      return std::string(e.what());
    }
    return std::string();
  };
  quantize("w4a8_awq", "max", tmp.file("w4a8"));
  EXPECT_NE(error_of(tmp.file("w4a8")).find("compressed-tensors has no form for W4A8_AWQ"), std::string::npos);
  quantize("mxfp8", "max", tmp.file("mx"));
  EXPECT_NE(error_of(tmp.file("mx")).find("no form for MXFP8"), std::string::npos);
  quantize("int8", "smoothquant", tmp.file("sq"));  // INT8 SmoothQuant keeps its scales on quantized inputs
  EXPECT_NE(error_of(tmp.file("sq")).find("model.layers.0.self_attn.q_proj keeps a pre_quant_scale on its quantized inputs"), std::string::npos);
  EXPECT_NE(error_of(tiny_kjv()).find("not a quantized checkpoint"), std::string::npos);
  // Weight-only AWQ: the kept scales are folded into the columns and those Linears re-quantized.
  quantize("int4_awq", "awq_lite", tmp.file("awq"));
  const auto r = export_compressed_tensors(tmp.file("awq"), tmp.file("awq-ct"));
  EXPECT_EQ(r.requantized.size(), 4u);  // o_proj and down_proj of 2 layers
  const double modelopt = ppl_of(tmp.file("awq")), ct = ppl_of(tmp.file("awq-ct"));
  EXPECT_NEAR(ct, modelopt, 0.01 * modelopt);
}

TEST(CompressedTensors, QuantizingForATargetWithoutPreQuantScalesExportsExactly) {
  // With every smoothing scale folded before quantization, compressed-tensors and GGUF Q4_0 carry the
  // export's own codes: the perplexity of each export equals the fake-quantized model's.
  for (const auto& [format, algorithm] : {std::pair{"int4_awq", "awq_lite"}, std::pair{"int8", "smoothquant"}}) {
    SCOPED_TRACE(format);
    TempDir tmp;
    quantize(format, algorithm, tmp.file("modelopt"), !export_target("compressed-tensors").stores_pre_quant_scale);
    const io::TensorStore store = io::TensorStore::open_dir(tmp.file("modelopt"));
    for (const auto& loc : store.all()) {
      if (loc.entry->name.find("pre_quant_scale") == std::string::npos) continue;
      const auto v = store.tensor(loc.entry->name).to_f32();
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float x) { return x == 1.0f; })) << loc.entry->name;
    }
    const auto r = export_compressed_tensors(tmp.file("modelopt"), tmp.file("ct"));
    EXPECT_TRUE(r.requantized.empty());
    EXPECT_EQ(logits_of(tmp.file("modelopt")), logits_of(tmp.file("ct")));
    EXPECT_EQ(joined(check_engine_rules(tmp.file("ct"), Engine::vllm)), "");
    const bool int4 = std::string(format) == "int4_awq";
    GgufExportOptions go;
    go.type = int4 ? io::GgmlType::Q4_0 : io::GgmlType::Q8_0;
    const auto g = export_gguf(tmp.file("modelopt"), tmp.file("m.gguf"), go);
    EXPECT_EQ(g.exact_linears, 14);
    EXPECT_EQ(g.requantized_linears, 0);
    EXPECT_EQ(g.activation_quantization_dropped, !int4);
    const double fake = ppl_of(tmp.file("modelopt")), ct = ppl_of(tmp.file("ct")), gguf = ppl_of(tmp.file("m.gguf"));
    EXPECT_EQ(ct, fake);
    // f16 block scales and llama-quantize's Q4_0 mix for the 16-bit embedding (Q4_0) and head (Q6_K).
    if (int4) EXPECT_NEAR(gguf, fake, 0.005 * fake);  // 0.09% here
  }
}

TEST(GgufFromQuantized, Int4CodesGoOverUnchanged) {
  // A Q4_0 block holds (nibble - 8) * d: an INT4 group of 64 is two blocks with the group's scale.
  TempDir tmp;
  quantize("int4_rtn", "max", tmp.file("q"));
  export_gguf(tmp.file("q"), tmp.file("m.gguf"), gguf_options_from_name("q4_0"));
  const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
  // The embedding and head, 16-bit in the export, get llama-quantize's Q4_0 mix: its own bytes for tiny-kjv's
  // (the same tensors; tests/data/gguf/llama_quantize_mixes.json).
  const json goldens = io::parse_json_unique_keys(io::read_text_file(testing::data_path("gguf/llama_quantize_mixes.json")), "goldens");
  int checked = 0;
  for (const json& golden : goldens.at("goldens")) {
    if (golden.at("model") != "tiny-kjv" || golden.at("mopt_type") != "q4_0") continue;
    for (const json& t : golden.at("tensors")) {
      if (t.at("name") != "token_embd.weight" && t.at("name") != "output.weight") continue;
      SCOPED_TRACE(t.at("name").get<std::string>());
      const io::GgufTensorInfo* info = g.find_tensor(t.at("name").get<std::string>());
      ASSERT_NE(info, nullptr);
      EXPECT_EQ(info->type.name, t.at("type"));  // Q4_0 and Q6_K
      EXPECT_EQ(testing::sha256_hex(g.raw(*info)), t.at("sha256"));
      ++checked;
    }
  }
  EXPECT_EQ(checked, 2);
  const auto reader = load::modelopt_reader(tmp.file("q"));
  const io::Checkpoint ckpt = io::Checkpoint::open(tmp.file("q"), reader.layout);
  const auto st = reader.linear(ckpt, 1, model::LinearKind::v);  // not permuted
  ASSERT_TRUE(st.has_value());
  const std::vector<float> want = quant::dequantize_weight(*st->scheme.weight, st->weight, st->out, st->in);
  const std::vector<float> got = g.dequantize(*g.find_tensor("blk.1.attn_v.weight")).to_f32();
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-3 * std::fabs(want[i]) + 1e-7) << i;
}

TEST(GgufFromQuantized, Q4_0GridWeightsAreTheFilesBitForBit) {
  // Quantized for a Q4_0 target (the grid mopt quantize picks for --export gguf --gguf-type q4_0):
  // every Linear goes over code for code, the GGUF's weights are the export's exactly (the stored
  // scale is the f16 step itself), and each block's extreme sits on code -8 (nibble 0): 16 levels.
  for (const char* algorithm : {"max", "awq_lite", "gptq"}) {
    SCOPED_TRACE(algorithm);
    quant::Recipe r;
    r.format = "int4_awq";
    r.algorithm = algorithm;
    r.group_size = 32;
    r.int4_grid = quant::IntGrid::q4_0;
    TempDir tmp;
    testing::quantize_recipe(r, tmp.file("q"), true);
    const auto report = export_gguf(tmp.file("q"), tmp.file("m.gguf"), gguf_options_from_name("q4_0"));
    EXPECT_EQ(report.exact_linears, 14);
    EXPECT_EQ(report.requantized_linears, 0);
    const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
    const auto reader = load::modelopt_reader(tmp.file("q"));
    const io::Checkpoint ckpt = io::Checkpoint::open(tmp.file("q"), reader.layout);
    for (std::int64_t layer = 0; layer < 2; ++layer) {
      for (const auto& [kind, name] : {std::pair{model::LinearKind::v, "attn_v"}, std::pair{model::LinearKind::o, "attn_output"},
                                       std::pair{model::LinearKind::gate, "ffn_gate"}, std::pair{model::LinearKind::down, "ffn_down"}}) {
        SCOPED_TRACE(name);
        const auto st = reader.linear(ckpt, layer, kind);  // not RoPE-permuted
        ASSERT_TRUE(st.has_value());
        EXPECT_EQ(st->scheme.weight->block, 32);
        const std::vector<float> want = quant::dequantize_weight(*st->scheme.weight, st->weight, st->out, st->in);
        const io::GgufTensorInfo* info = g.find_tensor(fmt::format("blk.{}.{}.weight", layer, name));
        ASSERT_NE(info, nullptr);
        ASSERT_EQ(info->type.type, io::GgmlType::Q4_0);
        EXPECT_EQ(g.dequantize(*info).to_f32(), want);
        // Every block with a non-zero scale holds nibble 0 (code -8).
        const auto raw = g.raw(*info);
        std::int64_t blocks = 0, with_minus_8 = 0;
        for (std::size_t b = 0; b + 18 <= raw.size(); b += 18) {
          std::uint16_t d = 0;
          std::memcpy(&d, raw.data() + b, 2);
          if ((d & 0x7FFF) == 0) continue;
          ++blocks;
          bool minus_8 = false;
          for (std::size_t j = 2; j < 18; ++j) {
            const auto v = static_cast<unsigned>(raw[b + j]);
            minus_8 = minus_8 || (v & 0xF) == 0 || (v >> 4) == 0;
          }
          with_minus_8 += minus_8;
        }
        EXPECT_GT(blocks, 0);
        // GPTQ moves a block's later weights after the scales are set from the originals: nearly all.
        if (std::string(algorithm) == "gptq") EXPECT_GT(with_minus_8, blocks * 8 / 10);
        else EXPECT_EQ(with_minus_8, blocks);
      }
    }
  }
}

TEST(GgufFromQuantized, GgmlBlocksAreTheFilesBitForBit) {
  // Quantized in a Q4_K_M file's own blocks (what mopt quantize --export gguf --gguf-type q4_k_m does):
  // each Linear in its tensor's type of llama-quantize's mix (Q4_K; Q6_K for attn_v; ffn_down's 704
  // columns fall back to Q8_0), written byte for byte. Round-to-nearest without calibration is
  // llama-quantize's own file; with calibration the quantizer weighs each value by its input
  // channel's mean square (as llama-quantize --imatrix), which Q8_0 ignores.
  const std::string model = testing::two_layer_tiny_kjv();
  const auto options = gguf_options_from_name("q4_k_m");
  const auto types = gguf_linear_types(options, io::Checkpoint::open(model).config());
  EXPECT_EQ(types.at("model.layers.0.self_attn.q_proj"), io::GgmlType::Q4_K);
  EXPECT_EQ(types.at("model.layers.1.self_attn.v_proj"), io::GgmlType::Q6_K);
  EXPECT_EQ(types.at("model.layers.1.mlp.down_proj"), io::GgmlType::Q8_0);
  EXPECT_EQ(types.at("model.layers.0.mlp.down_proj"), io::GgmlType::Q5_0);
  TempDir tmp;
  export_gguf(model, tmp.file("plain.gguf"), options);
  const io::GgufFile plain = io::GgufFile::open(tmp.file("plain.gguf"));
  for (const std::string algorithm : {"max", "max+calibration", "awq_lite", "gptq"}) {
    SCOPED_TRACE(algorithm);
    quant::Recipe r;
    r.format = "int4_awq";
    r.algorithm = algorithm == "max+calibration" ? "max" : algorithm;
    r.ggml_blocks = types;
    testing::quantize_recipe(r, tmp.file(algorithm), true, false, algorithm != "max");
    const std::string file = tmp.file(algorithm + ".gguf");
    const auto report = export_gguf(tmp.file(algorithm), file, options);
    EXPECT_EQ(report.exact_linears, 14);
    EXPECT_EQ(report.requantized_linears, 0);
    const io::GgufFile g = io::GgufFile::open(file);
    // The same tensors, types and bytes (the files differ only in general.name, the directory's).
    const auto tensor_bytes = [](const io::GgufFile& f) {
      std::uint64_t n = 0;
      for (const auto& t : f.header().tensors) n += t.bytes;
      return std::pair{f.header().tensors.size(), n};
    };
    EXPECT_EQ(tensor_bytes(g), tensor_bytes(plain));
    const auto reader = load::modelopt_reader(tmp.file(algorithm));
    const io::Checkpoint ckpt = io::Checkpoint::open(tmp.file(algorithm), reader.layout);
    std::size_t moved = 0;
    for (std::int64_t layer = 0; layer < 2; ++layer) {
      for (const auto& [kind, name] : {std::pair{model::LinearKind::q, "attn_q"}, std::pair{model::LinearKind::k, "attn_k"},
                                       std::pair{model::LinearKind::v, "attn_v"}, std::pair{model::LinearKind::o, "attn_output"},
                                       std::pair{model::LinearKind::gate, "ffn_gate"}, std::pair{model::LinearKind::up, "ffn_up"},
                                       std::pair{model::LinearKind::down, "ffn_down"}}) {
        SCOPED_TRACE(name);
        const std::string gguf_name = fmt::format("blk.{}.{}.weight", layer, name);
        const io::GgufTensorInfo* info = g.find_tensor(gguf_name);
        ASSERT_NE(info, nullptr);
        EXPECT_EQ(info->type.type, types.at(fmt::format("model.layers.{}.{}", layer, model::linear_name(kind))));
        const auto st = reader.linear(ckpt, layer, kind);
        ASSERT_TRUE(st.has_value());
        EXPECT_EQ(st->scheme.weight->grid, quant::IntGrid::ggml);
        if (kind != model::LinearKind::q && kind != model::LinearKind::k) {  // not RoPE-permuted
          EXPECT_EQ(g.dequantize(*info).to_f32(), quant::dequantize_weight(*st->scheme.weight, st->weight, st->out, st->in));
        }
        const auto raw = g.raw(*info), want = plain.raw(*plain.find_tensor(gguf_name));
        ASSERT_EQ(raw.size(), want.size());
        const bool same = std::equal(raw.begin(), raw.end(), want.begin());
        if (algorithm == "max") EXPECT_TRUE(same);
        moved += !same;
      }
    }
    // The importance moves every Linear but layer 1's Q8_0 ffn_down (layer 0's is Q5_0); AWQ and GPTQ move all.
    if (algorithm == "max+calibration") EXPECT_EQ(moved, 13u);
    if (algorithm == "awq_lite" || algorithm == "gptq") EXPECT_EQ(moved, 14u);
  }
}

TEST(GgufFromQuantized, Fp4CodesGoOverUnchanged) {
  // NVFP4 and MXFP4 exports as llama.cpp's NVFP4/MXFP4 blocks (NVFP4's weight_scale_2 as the ".scale"
  // tensor): the GGUF model's weights are the export's, Q/K permutation and all.
  for (const char* format : {"nvfp4", "mxfp4"}) {
    SCOPED_TRACE(format);
    TempDir tmp;
    quantize(format, "max", tmp.file("q"));
    const auto r = export_gguf(tmp.file("q"), tmp.file("m.gguf"), gguf_options_from_name(format));
    EXPECT_EQ(r.exact_linears, 14);
    EXPECT_TRUE(r.activation_quantization_dropped);
    const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
    const bool nv = std::string(format) == "nvfp4";
    EXPECT_EQ(g.find_tensor("blk.0.attn_q.weight")->type.type, nv ? io::GgmlType::NVFP4 : io::GgmlType::MXFP4);
    EXPECT_EQ(g.find_tensor("blk.0.attn_q.scale") != nullptr, nv);
    EXPECT_EQ(g.find_tensor("token_embd.weight")->type.type, io::GgmlType::Q8_0);
    model::Model a = load_model(tmp.file("q"), QuantizedRun::fake_quant), b = load_model(tmp.file("m.gguf"));
    for (std::int64_t l = 0; l < 2; ++l) {
      for (const auto kind : model::kAllLinears) {
        const std::vector<float> wa = a.layer(l).linear(kind).weight.to_f32(), wb = b.layer(l).linear(kind).weight.to_f32();
        ASSERT_EQ(wa.size(), wb.size());
        for (std::size_t i = 0; i < wa.size(); ++i) ASSERT_NEAR(wb[i], wa[i], 1e-6f * std::fabs(wa[i])) << l << " " << model::linear_name(kind) << " " << i;
      }
    }
  }
  TempDir tmp;
  quantize("int4_rtn", "max", tmp.file("int4"));
  try {
    export_gguf(tmp.file("int4"), tmp.file("never.gguf"), gguf_options_from_name("nvfp4"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("is W4A16_AWQ: a nvfp4 GGUF holds NVFP4"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(tmp.file("never.gguf")));
}

TEST(GgufFromQuantized, NativeTypeGivesEachLinearTheTypeThatHoldsIt) {
  // A mixed export (as --auto-bits writes one): NVFP4 Linears go over as NVFP4 blocks, INT8 rows as
  // Q8_0, both code for code; FP8 is quantized to Q8_0; unquantized Linears stay BF16.
  TempDir tmp;
  quant::Recipe r;
  r.format = "nvfp4";
  r.overrides = {{"*.mlp.down_proj", "fp8"}, {"*.self_attn.o_proj", "int8_wo"}, {"model.layers.1.mlp.gate_proj", "none"}, {"model.layers.1.mlp.up_proj", "none"}};
  testing::quantize_recipe(r, tmp.file("mixed"));
  const auto report = export_gguf(tmp.file("mixed"), tmp.file("m.gguf"), gguf_options_from_name("native"));
  EXPECT_EQ(report.exact_linears, 10);       // 8 NVFP4 + 2 INT8
  EXPECT_EQ(report.requantized_linears, 2);  // the FP8 down_proj
  const io::GgufFile g = io::GgufFile::open(tmp.file("m.gguf"));
  const auto type = [&](const char* name) { return g.find_tensor(name)->type.type; };
  EXPECT_EQ(type("blk.0.attn_q.weight"), io::GgmlType::NVFP4);
  EXPECT_EQ(type("blk.1.attn_v.weight"), io::GgmlType::NVFP4);
  EXPECT_EQ(type("blk.0.ffn_up.weight"), io::GgmlType::NVFP4);
  EXPECT_EQ(type("blk.0.attn_output.weight"), io::GgmlType::Q8_0);
  EXPECT_EQ(type("blk.1.ffn_down.weight"), io::GgmlType::Q8_0);
  EXPECT_EQ(type("blk.1.ffn_gate.weight"), io::GgmlType::BF16);
  EXPECT_EQ(type("token_embd.weight"), io::GgmlType::BF16);
  EXPECT_EQ(type("output.weight"), io::GgmlType::BF16);
  model::Model a = load_model(tmp.file("mixed"), QuantizedRun::fake_quant), b = load_model(tmp.file("m.gguf"));
  for (std::int64_t l = 0; l < 2; ++l) {
    for (const auto kind : model::kAllLinears) {
      const std::vector<float> wa = a.layer(l).linear(kind).weight_f32(), wb = b.layer(l).linear(kind).weight_f32();
      ASSERT_EQ(wa.size(), wb.size());
      const bool requantized = kind == model::LinearKind::down;
      float row_max = 0.0f;
      for (const float v : wa) row_max = std::max(row_max, std::fabs(v));
      for (std::size_t i = 0; i < wa.size(); ++i) {
        // Q8_0 of the FP8 weight: within half a step of its 32-block's scale (at most the tensor's max / 127 / 2);
        // INT8's codes with their row scale rounded to Q8_0's f16 (2^-11 relative); NVFP4 exact.
        const float tolerance = requantized ? row_max / 254.0f * 1.01f
                                : kind == model::LinearKind::o ? std::ldexp(std::fabs(wa[i]), -11) * 1.01f
                                                               : 1e-6f * std::fabs(wa[i]);
        ASSERT_NEAR(wb[i], wa[i], tolerance) << l << " " << model::linear_name(kind) << " " << i;
      }
    }
  }
  EXPECT_THROW(gguf_options_from_name("natve"), Error);
}

TEST(CompressedTensors, DamagedCheckpointsAreRefusedByName) {
  TempDir tmp;
  quantize("int4_rtn", "max", tmp.file("q"));
  export_compressed_tensors(tmp.file("q"), tmp.file("ct"));
  json config = io::parse_json_unique_keys(io::read_text_file(tmp.file("ct/config.json")), "config");
  config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = false;
  std::ofstream(tmp.file("ct/config.json")) << config.dump();
  try {
    load_model(tmp.file("ct"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("asymmetric (zero-point) weights are not supported"), std::string::npos) << e.what();
  }
  config["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = true;
  config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 32;
  std::ofstream(tmp.file("ct/config.json")) << config.dump();
  try {
    load_model(tmp.file("ct"));
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model.layers.0.self_attn.q_proj.weight_scale has"), std::string::npos) << e.what();
  }
  EXPECT_NE(joined(check_engine_rules(tmp.file("ct"), Engine::vllm)).find("weight_scale has shape"), std::string::npos);
}

TEST(Conformance, MissingScalesAndMismatchedFusedGroupsAreFound) {
  TempDir tmp;
  quantize("fp8", "max", tmp.file("q"));
  // Rewrite the checkpoint without one input_scale.
  const io::TensorStore store = io::TensorStore::open_dir(tmp.file("q"));
  std::vector<io::NamedTensor> kept;
  for (const auto& loc : store.all()) {
    if (loc.entry->name == "model.layers.1.self_attn.k_proj.input_scale") continue;
    kept.push_back({loc.entry->name, store.tensor(loc.entry->name)});
  }
  fs::create_directories(tmp.file("damaged"));
  io::write_safetensors(tmp.file("damaged/model.safetensors"), kept);
  for (const char* f : {"config.json", "hf_quant_config.json"}) fs::copy_file(tmp.file(std::string("q/") + f), tmp.file(std::string("damaged/") + f));
  const std::string errors = joined(check_engine_rules(tmp.file("damaged"), Engine::vllm));
  EXPECT_NE(errors.find("model.layers.1.self_attn.k_proj.input_scale is missing"), std::string::npos) << errors;
  EXPECT_NE(errors.find("layer 1: self_attn.k_proj and self_attn.q_proj do not have the same scale tensors"), std::string::npos) << errors;
  EXPECT_EQ(joined(check_engine_rules(tmp.file("q"), Engine::vllm)), "");
}

}  // namespace
}  // namespace mopt::exporter
