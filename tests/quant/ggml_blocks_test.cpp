// Weights in a GGUF file's own blocks (IntGrid::ggml): fake quantization is
// llama.cpp's quantizer and dequantizer, the stored form is its blocks, a
// recipe gives them to the Linears it names, and what cannot run on them says so.
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "io/ggml_grid.h"
#include "io/gguf.h"
#include "io/gguf_writer.h"
#include "quant/fake_quant.h"
#include "quant/qtensor.h"
#include "quant/recipe.h"
#include "support/random_values.h"

namespace mopt::quant {
namespace {

using testing::random_values;

QuantizerSpec blocks_of(io::GgmlType type, Element element = Element::int4) {
  QuantizerSpec s{element, Scaling::block, 0, 0, false};
  s.grid = IntGrid::ggml;
  s.ggml_type = type;
  s.block = io::ggml_type_info(static_cast<std::uint32_t>(type))->block_elements;
  return s;
}

TEST(GgmlBlocks, FakeQuantizationIsLlamaCppsQuantizerRowByRow) {
  const std::int64_t rows = 6, cols = 512;
  const std::vector<float> w = random_values(static_cast<std::size_t>(rows * cols), 11, 0.05f);
  for (const io::GgmlType type : {io::GgmlType::Q4_K, io::GgmlType::Q6_K, io::GgmlType::Q5_0, io::GgmlType::Q8_0}) {
    const QuantizerSpec spec = blocks_of(type);
    SCOPED_TRACE(spec.describe());
    std::vector<float> y(w.size());
    fake_quantize(spec, w.data(), rows, cols, compute_amax(spec, w.data(), rows, cols), y.data());
    std::vector<float> want(static_cast<std::size_t>(cols));
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto b = io::ggml_quantize(type, w.data() + r * cols, static_cast<std::uint64_t>(cols));
      io::ggml_dequantize(type, b, want.data(), static_cast<std::uint64_t>(cols));
      ASSERT_EQ(std::vector<float>(y.begin() + r * cols, y.begin() + (r + 1) * cols), want) << r;
    }
    // The stored form is the same blocks; it dequantizes to the fake quantization.
    const QuantizedWeight q = quantize_weight(spec, w.data(), rows, cols, {});
    check_quantized_weight(spec, q, rows, cols, "w");
    EXPECT_EQ(q.weight.dtype(), DType::U8);
    EXPECT_EQ(dequantize_weight(spec, q, rows, cols), y);
  }
  EXPECT_EQ(blocks_of(io::GgmlType::Q4_K).describe(), "int4 in ggml Q4_K blocks");
}

TEST(GgmlBlocks, AnImportancePerColumnWeighsTheQuantizerAsAnImatrixDoes) {
  const std::int64_t rows = 3, cols = 512;
  const std::vector<float> w = random_values(static_cast<std::size_t>(rows * cols), 14, 0.05f);
  std::vector<float> importance = random_values(static_cast<std::size_t>(cols), 15, 1.0f);
  for (float& v : importance) v = v * v;
  for (const io::GgmlType type : {io::GgmlType::Q4_K, io::GgmlType::Q6_K, io::GgmlType::Q5_0, io::GgmlType::Q4_0}) {
    const QuantizerSpec spec = blocks_of(type);
    SCOPED_TRACE(spec.describe());
    const QuantizedWeight q = quantize_weight(spec, w.data(), rows, cols, {}, 0.0f, {}, {importance, {}});
    const QuantizedWeight plain = quantize_weight(spec, w.data(), rows, cols, {});
    const auto* got = q.weight.data<std::uint8_t>();
    std::vector<float> y(w.size());
    fake_quantize_ggml(spec, w.data(), rows, cols, importance, y.data());
    EXPECT_EQ(dequantize_weight(spec, q, rows, cols), y);
    const std::size_t row_bytes = q.weight.numel() / rows;
    for (std::int64_t r = 0; r < rows; ++r) {
      const auto want = io::ggml_quantize(type, w.data() + r * cols, cols, "row", importance);
      ASSERT_EQ(std::memcmp(got + r * row_bytes, want.data(), row_bytes), 0) << r;
    }
    EXPECT_NE(std::memcmp(got, plain.weight.data<std::uint8_t>(), q.weight.numel()), 0);
  }
  EXPECT_THROW(fake_quantize_ggml(blocks_of(io::GgmlType::Q4_K), w.data(), rows, cols, std::vector<float>(cols / 2, 1.0f), std::vector<float>(w.size()).data()),
               Error);
  EXPECT_THROW(fake_quantize_ggml(QuantizerSpec{Element::int4, Scaling::block, 32, 0, false}, w.data(), rows, cols, {}, std::vector<float>(w.size()).data()),
               Error);
}

TEST(GgmlBlocks, FixedBlocksKeepTheirScalesForAMovedWeight) {
  const std::int64_t rows = 4, cols = 256;
  const QuantizerSpec spec = blocks_of(io::GgmlType::Q4_K);
  const std::vector<float> w = random_values(static_cast<std::size_t>(rows * cols), 12, 0.05f);
  std::vector<float> moved = random_values(w.size(), 13, 0.01f);
  for (std::size_t i = 0; i < w.size(); ++i) moved[i] += w[i];
  const QuantizedWeight fixed = quantize_weight(spec, w.data(), rows, cols, {});
  const auto* bytes = reinterpret_cast<const std::byte*>(fixed.weight.data<std::uint8_t>());
  const std::span<const std::byte> grid(bytes, fixed.weight.numel());
  const QuantizedWeight q = quantize_weight(spec, moved.data(), rows, cols, {}, 0.0f, {}, {{}, grid});
  const std::vector<float> y = dequantize_weight(spec, q, rows, cols);
  const std::size_t row_bytes = fixed.weight.numel() / rows;
  for (std::int64_t r = 0; r < rows; ++r) {
    const io::GgmlGrid g = io::ggml_grid(spec.ggml_type, grid.subspan(r * row_bytes, row_bytes), cols);
    for (std::int64_t c = 0; c < cols; ++c) ASSERT_EQ(y[r * cols + c], g.round(static_cast<std::size_t>(c / g.sub_block), moved[r * cols + c]));
  }
  // Wrong sizes, non-ggml quantizers given blocks, rows that are not whole blocks.
  EXPECT_THROW(quantize_weight(spec, moved.data(), rows, cols, {}, 0.0f, {}, {{}, grid.subspan(1)}), Error);
  EXPECT_THROW(quantize_weight(QuantizerSpec{Element::int4, Scaling::block, 32, 0, false}, moved.data(), rows, cols,
                               std::vector<float>(rows * cols / 32, 1.0f), 0.0f, {}, {{}, grid}),
               Error);
  const std::vector<float> short_importance(cols - 1, 1.0f);
  EXPECT_THROW(quantize_weight(spec, moved.data(), rows, cols, {}, 0.0f, {}, {short_importance, {}}), Error);
  EXPECT_THROW(quantize_weight(spec, moved.data(), rows * 2, cols / 2, {}), Error);
  QuantizedWeight bad = q;
  bad.weight = Tensor::zeros(DType::U8, {rows, 100});
  EXPECT_THROW(check_quantized_weight(spec, bad, rows, cols, "w"), Error);
}

TEST(GgmlBlocks, TrainingAndClipSearchesRefuseThem) {
  const QuantizerSpec spec = blocks_of(io::GgmlType::Q4_K);
  EXPECT_FALSE(supports_learned_scales(spec));
  std::vector<float> x(256, 0.1f), g(256, 1.0f);
  EXPECT_THROW(zero_clipped_gradient(spec, x.data(), 1, 256, compute_amax(spec, x.data(), 1, 256), g.data()), Error);
  EXPECT_THROW(fake_quant_integer(spec, 0.1f, 1.0f), Error);
}

TEST(GgmlBlocks, ARecipeGivesThemToTheLinearsItNames) {
  Recipe r;
  r.format = "int4_awq";
  r.ggml_blocks["model.layers.0.self_attn.v_proj"] = io::GgmlType::Q6_K;
  r.ggml_blocks["model.layers.0.mlp.down_proj"] = io::GgmlType::Q4_K;
  const LinearScheme v = r.scheme_for("model.layers.0.self_attn.v_proj");
  ASSERT_TRUE(v.weight);
  EXPECT_EQ(v.weight->grid, IntGrid::ggml);
  EXPECT_EQ(v.weight->ggml_type, io::GgmlType::Q6_K);
  EXPECT_EQ(v.weight->block, 256);
  EXPECT_EQ(r.scheme_for("model.layers.0.self_attn.q_proj").weight->grid, IntGrid::symmetric);
  // INT8 per-channel weights too; W4A8's two stages and FP8 keep their own grids.
  r.format = "int8_wo";
  EXPECT_EQ(r.scheme_for("model.layers.0.mlp.down_proj").weight->grid, IntGrid::ggml);
  EXPECT_EQ(r.scheme_for("model.layers.0.mlp.down_proj").weight->scaling, Scaling::block);
  for (const char* format : {"w4a8_awq", "fp8", "nvfp4"}) {
    r.format = format;
    EXPECT_NE(r.scheme_for("model.layers.0.mlp.down_proj").weight->grid, IntGrid::ggml) << format;
  }
  r.format = "int4_awq";
  EXPECT_THROW(check_algorithm_supports("awq_clip", r.scheme_for("model.layers.0.mlp.down_proj")), Error);
  EXPECT_NO_THROW(check_algorithm_supports("awq_lite+gptq", r.scheme_for("model.layers.0.mlp.down_proj")));
}

}  // namespace
}  // namespace mopt::quant
