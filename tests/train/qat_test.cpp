// Quantization-aware training and distillation against NVIDIA Model Optimizer (fixtures from
// tools/fixtures/make_qat_goldens.py, tests/data/qat): gradients through a fake-quantized Linear in
// both straight-through modes, one QAT step of a whole model, the distillation loss; and the export
// of a QAT model: its codes are the weights training saw.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "algo/ptq.h"
#include "algo/sparsity.h"
#include "core/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "kernels/backward.h"
#include "kernels/gemm.h"
#include "quant/act_quant.h"
#include "quant/fake_quant.h"
#include "quant/qtensor.h"
#include "quant/recipe.h"
#include "support/temp_dir.h"
#include "train/model.h"
#include "train/optimizer.h"
#include "train/qat.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

namespace mopt::train {
namespace {

const std::string kQat = std::string(MOPT_TEST_DATA_DIR) + "/qat";

// max |a - b| / max |b|
double scaled_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

std::vector<std::int32_t> ids(const Tensor& t) {
  std::vector<std::int32_t> out;
  for (std::int64_t i = 0; i < t.numel(); ++i) out.push_back(static_cast<std::int32_t>(t.data<std::int64_t>()[i]));
  return out;
}

struct LinearCase {
  std::string name, format;
  bool input;  // has an input quantizer
};

class FakeQuantLinear : public ::testing::TestWithParam<LinearCase> {};

// y = fq_in(x) · fq_w(W)ᵀ and its gradients, as mopt's QAT computes them (fake_quantize forward,
// ActivationQuantizer::backward and zero_clipped_gradient for the straight-through rule), against
// torch autograd through the reference's TensorQuantizer — in both of its backward modes.
TEST_P(FakeQuantLinear, GradientsMatchTheReference) {
  const LinearCase c = GetParam();
  const auto g = io::TensorStore::open_file(kQat + "/linear_grads.safetensors");
  const std::vector<float> x = g.tensor("x").to_f32(), w = g.tensor("W").to_f32(), dy = g.tensor("dy").to_f32();
  const std::int64_t rows = 16, in = 256, out = 48;
  const quant::LinearScheme scheme = quant::format_scheme(c.format);
  const std::vector<float> w_amax = g.tensor(c.name + ".w_amax").to_f32();
  ASSERT_EQ(static_cast<std::int64_t>(w_amax.size()), quant::amax_count(*scheme.weight, out, in));
  std::vector<float> wq(w.size());
  quant::fake_quantize(*scheme.weight, w.data(), out, in, w_amax, wq.data());

  quant::ActivationQuantizer input;
  if (c.input) input = quant::ActivationQuantizer{scheme.input, g.tensor(c.name + ".in_amax").to_f32(), {}};
  std::vector<float> xq(x.size());
  input.forward(x.data(), rows, in, xq.data());
  std::vector<float> y(static_cast<std::size_t>(rows * out));
  kernels::gemm_f32(xq.data(), rows, in, wq.data(), out, y.data());
  EXPECT_LT(scaled_error(y, g.tensor(c.name + ".y").to_f32()), 1e-5);

  for (const bool clip : {false, true}) {
    const std::string mode = c.name + (clip ? ".clip" : ".pass");
    std::vector<float> dxq(x.size()), dx(x.size()), dw(w.size(), 0.0f);
    kernels::matmul_f32(false, false, rows, in, out, dy.data(), out, wq.data(), in, dxq.data(), in, false);
    input.backward(x.data(), dxq.data(), rows, in, clip, dx.data(), false);
    kernels::matmul_f32(true, false, out, in, rows, dy.data(), out, xq.data(), in, dw.data(), in, true);
    if (clip) quant::zero_clipped_gradient(*scheme.weight, w.data(), out, in, w_amax, dw.data());
    const std::vector<float> want_dx = g.tensor(mode + ".dx").to_f32(), want_dw = g.tensor(mode + ".dW").to_f32();
    EXPECT_LT(scaled_error(dx, want_dx), 1e-5) << mode;
    EXPECT_LT(scaled_error(dw, want_dw), 1e-5) << mode;
    // The clipping is exercised: zeros where the reference has them.
    const auto zeros = [](const std::vector<float>& v) { return std::count(v.begin(), v.end(), 0.0f); };
    EXPECT_EQ(zeros(dw), zeros(want_dw)) << mode;
    EXPECT_EQ(zeros(dx), zeros(want_dx)) << mode;
    if (clip) EXPECT_GT(zeros(want_dw), 0) << mode;
    if (clip && c.input) EXPECT_GT(zeros(want_dx), 0) << mode;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, FakeQuantLinear,
                         ::testing::Values(LinearCase{"int4", "int4_awq", false}, LinearCase{"int8", "int8", true},
                                           LinearCase{"fp8", "fp8", true}, LinearCase{"nvfp4", "nvfp4", true}),
                         [](const auto& info) { return info.param.name; });

// Learned scales (the reference's `lsq` algorithm, tied amax) on an INT4 block-32 weight behind an
// INT8 per-tensor input: the MSE-calibrated starting amax, y, dx, dW and the amax gradient against
// torch autograd through modelopt's StaticBlockScaleQuantizer.
TEST(LearnedScales, MatchTheReference) {
  const auto g = io::TensorStore::open_file(kQat + "/lsq.safetensors");
  const std::vector<float> x = g.tensor("x").to_f32(), w = g.tensor("W").to_f32(), dy = g.tensor("dy").to_f32();
  const std::int64_t rows = 8, in = 64, out = 16;
  const quant::LinearScheme scheme = quant::format_scheme("int4_rtn", 32);
  ASSERT_TRUE(quant::supports_learned_scales(*scheme.weight));
  const std::vector<float> max_amax = quant::compute_amax(*scheme.weight, w.data(), out, in);
  EXPECT_EQ(max_amax, g.tensor("w_amax_max").to_f32());
  const std::vector<float> amax = quant::lsq_initial_amax(*scheme.weight, w.data(), out, in, max_amax);
  // The same candidate in every block (torch's linspace may round its steps apart in the last bit).
  EXPECT_LT(scaled_error(amax, g.tensor("w_amax_init").to_f32()), 1e-6);

  std::vector<float> wq(w.size()), xq(x.size()), y(static_cast<std::size_t>(rows * out));
  quant::lsq_forward(*scheme.weight, w.data(), out, in, amax, 0.0f, wq.data());
  const quant::ActivationQuantizer input{quant::format_scheme("int8").input, g.tensor("in_amax").to_f32(), {}};
  input.forward(x.data(), rows, in, xq.data());
  kernels::gemm_f32(xq.data(), rows, in, wq.data(), out, y.data());
  EXPECT_LT(scaled_error(y, g.tensor("tied.y").to_f32()), 1e-5);
  std::vector<float> dx(x.size()), gq(w.size(), 0.0f), dw(w.size(), 0.0f), damax(amax.size(), 0.0f);
  kernels::matmul_f32(false, false, rows, in, out, dy.data(), out, wq.data(), in, dx.data(), in, false);
  kernels::matmul_f32(true, false, out, in, rows, dy.data(), out, xq.data(), in, gq.data(), in, true);
  quant::lsq_backward(*scheme.weight, w.data(), out, in, amax, 0.0f, gq.data(), dw.data(), damax.data());
  EXPECT_LT(scaled_error(dx, g.tensor("tied.dx").to_f32()), 1e-5);
  const std::vector<float> want_dw = g.tensor("tied.dW").to_f32();
  EXPECT_LT(scaled_error(dw, want_dw), 1e-5);
  EXPECT_EQ(std::count(dw.begin(), dw.end(), 0.0f), std::count(want_dw.begin(), want_dw.end(), 0.0f));
  EXPECT_GT(std::count(want_dw.begin(), want_dw.end(), 0.0f), 0);  // some weights lie outside their range
  EXPECT_LT(scaled_error(damax, g.tensor("tied.d_amax_post").to_f32()), 1e-5);
  EXPECT_FALSE(quant::supports_learned_scales(*quant::format_scheme("fp8").weight));
}

// Learned NVFP4 block scales (the reference's nvfp4_lsq QAD recipe: static NVFP4 weight, one tied
// learnable amax per 16 values, MSE-initialized by the FP8 scale sweep) on one Linear whose blocks
// include a near-zero one (its scale at the floor), a small one and the outlier that sets the global
// amax: the sweep, the FP8-rounded scales, y, dx, dW and the amax gradient at the calibrated amax and at
// a perturbed one (scales between FP8 codes, one above the global amax, two at the floor), one AdamW
// step, and the export under the learned scales.
TEST(LearnedScales, Nvfp4MatchesTheReference) {
  const auto g = io::TensorStore::open_file(kQat + "/lsq_nvfp4.safetensors");
  const std::vector<float> x = g.tensor("x").to_f32(), w = g.tensor("W").to_f32(), dy = g.tensor("dy").to_f32();
  const std::int64_t rows = 8, in = 64, out = 16;
  const quant::LinearScheme scheme = quant::format_scheme("nvfp4");
  const quant::QuantizerSpec& spec = *scheme.weight;
  ASSERT_TRUE(quant::supports_learned_scales(spec));
  const std::vector<float> global = quant::compute_amax(spec, w.data(), out, in);
  ASSERT_EQ(global.size(), 1u);
  EXPECT_EQ(global[0], g.tensor("w_global_amax").to_f32()[0]);
  const std::vector<float> init = quant::lsq_initial_amax(spec, w.data(), out, in, global);
  EXPECT_EQ(init, g.tensor("w_amax_init").to_f32());

  for (const std::string c : {"tied", "perturbed"}) {
    SCOPED_TRACE(c);
    const std::vector<float> amax = g.tensor(c + ".amax").to_f32();
    if (c == "tied") EXPECT_EQ(amax, init);
    std::vector<float> scale(amax.size());
    for (std::size_t b = 0; b < amax.size(); ++b) scale[b] = quant::nvfp4_lsq_scale(amax[b], global[0]);
    EXPECT_EQ(scale, g.tensor(c + ".scale").to_f32());
    std::vector<float> wq(w.size()), y(static_cast<std::size_t>(rows * out));
    quant::lsq_forward(spec, w.data(), out, in, amax, global[0], wq.data());
    EXPECT_EQ(wq, g.tensor(c + ".Wq").to_f32());
    kernels::gemm_f32(x.data(), rows, in, wq.data(), out, y.data());
    EXPECT_LT(scaled_error(y, g.tensor(c + ".y").to_f32()), 1e-5);
    std::vector<float> dx(x.size()), gq(w.size(), 0.0f), dw(w.size(), 0.0f), damax(amax.size(), 0.0f);
    kernels::matmul_f32(false, false, rows, in, out, dy.data(), out, wq.data(), in, dx.data(), in, false);
    kernels::matmul_f32(true, false, out, in, rows, dy.data(), out, x.data(), in, gq.data(), in, true);
    quant::lsq_backward(spec, w.data(), out, in, amax, global[0], gq.data(), dw.data(), damax.data());
    EXPECT_LT(scaled_error(dx, g.tensor(c + ".dx").to_f32()), 1e-5);
    const std::vector<float> want_dw = g.tensor(c + ".dW").to_f32(), want_damax = g.tensor(c + ".d_amax").to_f32();
    EXPECT_LT(scaled_error(dw, want_dw), 1e-5);
    EXPECT_EQ(std::count(dw.begin(), dw.end(), 0.0f), std::count(want_dw.begin(), want_dw.end(), 0.0f));
    EXPECT_GT(std::count(want_dw.begin(), want_dw.end(), 0.0f), 0);  // some weights lie beyond 6 steps
    EXPECT_LT(scaled_error(damax, want_damax), 1e-5);
    for (std::size_t b = 0; b < damax.size(); ++b) EXPECT_EQ(damax[b] == 0.0f, want_damax[b] == 0.0f) << "block " << b;
  }
  // The clamp's and the FP8 rounding's zero gradients are there: blocks 5 and 22 at the floor, 38 above the global amax.
  const std::vector<float> perturbed_damax = g.tensor("perturbed.d_amax").to_f32();
  for (const std::size_t b : {5u, 22u, 38u}) EXPECT_EQ(perturbed_damax[b], 0.0f) << "block " << b;

  // One AdamW step from the calibrated state (weights at lr 1e-3, the amax at 1e-2, as its own group).
  {
    std::vector<float> wq(w.size()), gq(w.size(), 0.0f);
    quant::lsq_forward(spec, w.data(), out, in, init, global[0], wq.data());
    kernels::matmul_f32(true, false, out, in, rows, dy.data(), out, x.data(), in, gq.data(), in, true);
    std::vector<Parameter> params{{"W", {out, in}, w, std::vector<float>(w.size(), 0.0f), {}},
                                  {"amax", {static_cast<std::int64_t>(init.size())}, init, std::vector<float>(init.size(), 0.0f), {}}};
    quant::lsq_backward(spec, w.data(), out, in, init, global[0], gq.data(), params[0].grad.data(), params[1].grad.data());
    AdamW opt(params, AdamWSettings{0.9, 0.95, 1e-8, 0.0}, {false, false});
    opt.set_lr_scale(1, 10.0);
    opt.step(params, 1e-3);
    EXPECT_LT(scaled_error(params[0].value, g.tensor("step.W").to_f32()), 1e-5);
    EXPECT_LT(scaled_error(params[1].value, g.tensor("step.amax").to_f32()), 1e-5);
    std::vector<float> y(static_cast<std::size_t>(rows * out));
    quant::lsq_forward(spec, params[0].value.data(), out, in, params[1].value, global[0], wq.data());
    kernels::gemm_f32(x.data(), rows, in, wq.data(), out, y.data());
    EXPECT_LT(scaled_error(y, g.tensor("step.y").to_f32()), 1e-5);
  }

  // The export under the perturbed amax, as FakeQuantization writes it (6 x each learned scale as the
  // block's amax under the global amax): its scale codes are the learned scales' codes, and its weights
  // dequantize to the trained fake-quantized ones (the last bit aside: the export multiplies by
  // global / (6 · 448) where the forward multiplies by 1 / (448 / (global / 6))). The reference (0.47)
  // cannot export an LSQ quantizer; its static export of the same amax differs only in the two blocks at
  // the floor, which it lets go below LSQ's floor.
  const std::vector<float> amax = g.tensor("perturbed.amax").to_f32();
  std::vector<float> block_amax(amax.size());
  for (std::size_t b = 0; b < amax.size(); ++b) block_amax[b] = 6.0f * quant::nvfp4_lsq_scale(amax[b], global[0]);
  const quant::QuantizedWeight q = quant::quantize_weight(spec, w.data(), out, in, global, 0.0f, block_amax);
  const std::vector<float> codes = quant::dequantize_weight(spec, q, out, in), fake = g.tensor("perturbed.Wq").to_f32();
  for (std::size_t i = 0; i < codes.size(); ++i) EXPECT_NEAR(codes[i], fake[i], 1e-6f * std::fabs(fake[i])) << i;
  const Tensor& want_scales = g.tensor("export.weight_scale");
  const auto* ours = q.weight_scale.data<std::uint8_t>();
  const auto* theirs = want_scales.data<std::uint8_t>();
  int differing = 0;
  for (std::size_t b = 0; b < want_scales.numel(); ++b) differing += ours[b] != theirs[b];
  EXPECT_EQ(differing, 2);  // blocks 5 and 22
  EXPECT_NE(ours[5], theirs[5]);
  EXPECT_NE(ours[22], theirs[22]);
  EXPECT_EQ(q.weight_scale_2->to_f32(), g.tensor("export.weight_scale_2").to_f32());

  // Wrong shapes are named errors: NVFP4 starts from its one global amax, and needs one amax per block.
  EXPECT_THROW(quant::lsq_initial_amax(spec, w.data(), out, in, std::vector<float>{0.5f, 0.5f}), Error);
  std::vector<float> wq(w.size());
  EXPECT_THROW(quant::lsq_forward(spec, w.data(), out, in, std::vector<float>(amax.size() - 1, 0.1f), global[0], wq.data()), Error);
}

// tests/data/hf/llama as an f32 checkpoint (the reference ran the model in f32: its transformed
// weights are not rounded to bf16).
std::string f32_copy(const testing::TempDir& dir) {
  const io::Checkpoint src = io::Checkpoint::open(testing::data_path("hf/llama"));
  io::StreamingSafetensorsWriter w;
  for (const auto& e : io::expected_tensors(src.config())) w.add(e.name, Tensor::from_f32(src.tensor(e.name).to_f32(), e.shape));
  const std::string out = dir.file("llama-f32");
  std::filesystem::create_directories(out);
  w.write(out + "/model.safetensors", {});
  nlohmann::json config = src.config().raw;
  config["dtype"] = "float32";
  std::ofstream(out + "/config.json") << config.dump(2);
  return out;
}

Batch step_batch(const io::TensorStore& inputs) {
  Batch b;
  b.tokens = ids(inputs.tensor("tokens"));
  for (const std::int32_t t : ids(inputs.tensor("targets"))) b.targets.push_back(t < 0 ? -1 : t);
  b.bounds = {0, 32, 64};
  return b;
}

class QatStep : public ::testing::TestWithParam<std::string> {};

// The reference's mtq.quantize (calibration on fixed token ids) and one AdamW step of the
// fake-quantized model: the calibrated quantizers, the loss, and every parameter after the step.
TEST_P(QatStep, MatchesTheReference) {
  const std::string format = GetParam();
  const auto inputs = io::TensorStore::open_file(kQat + "/qat_step/inputs.safetensors");
  const auto golden = io::TensorStore::open_file(kQat + "/qat_step/" + format + ".safetensors");
  testing::TempDir dir;
  const io::Checkpoint ckpt = io::Checkpoint::open(f32_copy(dir));

  quant::Recipe recipe;
  recipe.format = format;
  recipe.validate();
  algo::CalibrationSet calib;
  const std::vector<std::int32_t> all = ids(inputs.tensor("calib_ids"));
  for (std::size_t s = 0; s < 4; ++s) calib.sequences.emplace_back(all.begin() + static_cast<std::ptrdiff_t>(s * 64), all.begin() + static_cast<std::ptrdiff_t>(s * 64 + 64));
  algo::PtqOptions options;
  options.keep_master_weights = true;
  std::vector<quant::QuantizedLayer> layers;
  algo::quantize_checkpoint(ckpt, recipe, calib, options, [&](quant::QuantizedLayer&& l) { layers.push_back(std::move(l)); });

  // The calibrated scales: weight and input amax, the smoothing scale.
  for (const auto& l : layers) {
    for (const auto& q : l.linears) {
      const std::string base = q.name;
      ASSERT_TRUE(q.scheme.quantized()) << base;
      EXPECT_LT(scaled_error(q.weight_amax, golden.tensor(base + ".weight_quantizer._amax").to_f32()), 1e-6) << base;
      if (golden.contains(base + ".input_quantizer._amax")) {
        EXPECT_LT(scaled_error(q.input_amax, golden.tensor(base + ".input_quantizer._amax").to_f32()), 1e-6) << base;
      }
      if (golden.contains(base + ".input_quantizer._pre_quant_scale")) {
        EXPECT_LT(scaled_error(q.pre_quant_scale, golden.tensor(base + ".input_quantizer._pre_quant_scale").to_f32()), 1e-6) << base;
        EXPECT_LT(scaled_error(q.master_weight, golden.tensor("before." + base + ".weight").to_f32()), 1e-6) << base;
      }
    }
  }

  TrainableModel model = TrainableModel::from_checkpoint(ckpt);
  auto fq = std::make_shared<FakeQuantization>(std::move(layers), std::nullopt, SteMode::pass_through, model);
  model.set_fake_quantization(fq);
  const Batch batch = step_batch(inputs);
  ASSERT_EQ(batch.target_count(), 52);
  const LossResult r = model.forward_backward(batch, 1.0f / 52.0f);
  EXPECT_NEAR(r.loss_sum / 52.0, golden.tensor("loss").to_f32()[0], 1e-5);
  AdamW opt(model.parameters(), AdamWSettings{0.9, 0.95, 1e-8, 0.0}, weight_decay_mask(model.parameters()));
  opt.step(model.parameters(), 1e-3);
  // Adam's first step moves every weight by about ±lr whatever the size of its gradient, so a
  // gradient at float32's noise (|g| < 1e-6: sums of ~1e-4 terms that cancel) may move its weight
  // either way here and in the reference; those are held to the step size alone. The rest must agree
  // within 1e-5, all but 1 in 10^4 (an activation rounded to the other side of an INT8 step because
  // its inputs differ from PyTorch's in the last bit).
  std::int64_t elements = 0, apart = 0;
  for (const auto& p : model.parameters()) {
    const std::vector<float> want = golden.tensor("after." + p.name).to_f32();
    ASSERT_EQ(want.size(), p.value.size()) << p.name;
    for (std::size_t i = 0; i < want.size(); ++i) {
      const double d = std::fabs(static_cast<double>(p.value[i]) - want[i]);
      EXPECT_LE(d, 2.0e-3 + 1e-6) << p.name << "[" << i << "]";
      if (std::fabs(p.grad[i]) >= 1e-6f && d > 1e-5) ++apart;
    }
    elements += p.numel();
  }
  EXPECT_LE(apart, elements / 10000) << apart << " of " << elements << " weights moved otherwise than the reference's";
  if (format == "fp8") EXPECT_EQ(apart, 0);
  EXPECT_NEAR(model.loss(batch).loss_sum / 52.0, golden.tensor("loss_after").to_f32()[0], 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Presets, QatStep, ::testing::Values("fp8", "int8_sq"));

// The reference's QAD loss (KDTrainer's masked mean over the tokens with a label of
// LogitsDistillationLoss(reduction="none"), T² x KL per token) and its gradient.
TEST(Distillation, LossAndGradientMatchTheReference) {
  const auto g = io::TensorStore::open_file(kQat + "/kd_loss.safetensors");
  const std::vector<float> student = g.tensor("student").to_f32(), teacher = g.tensor("teacher").to_f32();
  const std::vector<std::int32_t> labels = ids(g.tensor("labels"));
  const std::int64_t B = 2, S = 12, V = 50;
  for (const float T : {1.0f, 2.0f}) {
    const std::string key = T == 1.0f ? "T1" : "T2";
    // Position s predicts label s + 1 (the causal shift); masked labels drop out.
    std::vector<std::int64_t> rows;
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t s = 0; s + 1 < S; ++s) {
        if (labels[static_cast<std::size_t>(b * S + s + 1)] >= 0) rows.push_back(b * S + s);
      }
    }
    const auto n = static_cast<std::int64_t>(rows.size());
    std::vector<float> s_rows, t_rows;
    for (const std::int64_t r : rows) {
      s_rows.insert(s_rows.end(), student.begin() + r * V, student.begin() + (r + 1) * V);
      t_rows.insert(t_rows.end(), teacher.begin() + r * V, teacher.begin() + (r + 1) * V);
    }
    const double sum = kernels::distillation_backward(s_rows.data(), t_rows.data(), n, V, T, 1.0f / static_cast<float>(n));
    EXPECT_NEAR(sum / static_cast<double>(n), g.tensor(key + ".kd.loss").to_f32()[0], 1e-5) << key;
    const std::vector<float> want = g.tensor(key + ".kd.dstudent").to_f32();
    std::vector<float> got(want.size(), 0.0f);
    for (std::size_t i = 0; i < rows.size(); ++i) std::copy(s_rows.begin() + static_cast<std::ptrdiff_t>(i) * V, s_rows.begin() + static_cast<std::ptrdiff_t>(i + 1) * V, got.begin() + rows[i] * V);
    EXPECT_LT(scaled_error(got, want), 1e-5) << key;
    // Per token, T² KL (the reference's reduction="none").
    const std::vector<float> per_token = g.tensor(key + ".none.loss").to_f32();
    std::vector<float> one_s(student.begin(), student.begin() + V), one_t(teacher.begin(), teacher.begin() + V);
    EXPECT_NEAR(kernels::distillation_backward(one_s.data(), one_t.data(), 1, V, T, 1.0f), per_token[0], 1e-5) << key;
  }
}

// A QAT model exported: the codes written are the fake-quantized weights the last step trained
// (apart from the rare exact half step, where the export's division and the fake quantization's
// multiplication may round apart), for static (INT4 blocks), per-tensor (FP8) and two-level (NVFP4) scales.
// `recipe`'s calibration of `ckpt` on the first 64 of the QAT goldens' calibration tokens, each
// Linear's master weight kept (what FakeQuantization starts from).
std::vector<quant::QuantizedLayer> calibrated_layers(const io::Checkpoint& ckpt, const io::TensorStore& inputs, const quant::Recipe& recipe) {
  algo::CalibrationSet calib;
  const std::vector<std::int32_t> all = ids(inputs.tensor("calib_ids"));
  calib.sequences.emplace_back(all.begin(), all.begin() + 64);
  algo::PtqOptions options;
  options.keep_master_weights = true;
  std::vector<quant::QuantizedLayer> layers;
  algo::quantize_checkpoint(ckpt, recipe, calib, options, [&](quant::QuantizedLayer&& l) { layers.push_back(std::move(l)); });
  return layers;
}

TEST(Qat, ExportedCodesAreTheTrainedFakeQuantWeights) {
  const io::Checkpoint ckpt = io::Checkpoint::open(testing::data_path("hf/llama"));
  const auto inputs = io::TensorStore::open_file(kQat + "/qat_step/inputs.safetensors");
  for (const std::string format : {"int4_awq", "fp8", "nvfp4", "int4_rtn+lsq", "nvfp4+lsq"}) {
    const bool learn = format.ends_with("+lsq");
    quant::Recipe recipe;
    recipe.format = learn ? format.substr(0, format.size() - 4) : format;
    recipe.group_size = format.starts_with("int4") ? 32 : 0;
    recipe.validate();
    TrainableModel model = TrainableModel::from_checkpoint(ckpt);
    auto fq = std::make_shared<FakeQuantization>(calibrated_layers(ckpt, inputs, recipe), std::nullopt, SteMode::pass_through, model, learn);
    model.set_fake_quantization(fq);
    const Batch batch = step_batch(inputs);
    const std::vector<float> amax_before = learn ? model.parameter("model.layers.1.mlp.down_proj.weight_quantizer._amax").value : std::vector<float>{};
    AdamW opt(model.parameters(), AdamWSettings{0.9, 0.95, 1e-8, 0.0}, weight_decay_mask(model.parameters()));
    for (int step = 0; step < 3; ++step) {
      model.zero_grad();
      model.forward_backward(batch, 1.0f / 52.0f);
      opt.step(model.parameters(), 1e-3);
    }
    std::int64_t elements = 0, apart = 0;
    for (std::int64_t l = 0; l < fq->layers(); ++l) {
      const quant::QuantizedLayer ql = fq->quantized_layer(l, model);
      for (std::size_t k = 0; k < 7; ++k) {
        const auto& q = ql.linears[k];
        ASSERT_TRUE(q.weight.has_value()) << q.name;
        const Parameter& p = model.parameter(q.name + ".weight");
        const std::int64_t out = p.shape[0], in = p.shape[1];
        const std::vector<float> codes = quant::dequantize_weight(*q.scheme.weight, *q.weight, out, in);
        std::vector<float> fake(codes.size());
        const int a = fq->learned_scale(l, k);
        EXPECT_EQ(a >= 0, learn);
        const std::span<const float> amax = a >= 0 ? std::span<const float>(model.parameters()[static_cast<std::size_t>(a)].value) : std::span<const float>();
        // Integer blocks export the learned amax; NVFP4 keeps its global amax (the blocks' scales are the learned ones).
        if (a >= 0 && q.scheme.weight->scaling != quant::Scaling::nvfp4) EXPECT_EQ(q.weight_amax, model.parameters()[static_cast<std::size_t>(a)].value);
        fq->quantize_weight(l, k, p.value.data(), out, in, amax, fake.data());
        // The export multiplies codes by amax/bound where fake quantization divides by bound/amax: the
        // last bit may differ; a whole step only at an exact half step.
        for (std::size_t i = 0; i < codes.size(); ++i) {
          if (std::fabs(codes[i] - fake[i]) > 1e-6f * std::fabs(fake[i])) ++apart;
        }
        elements += out * in;
      }
    }
    EXPECT_LE(apart, elements / 1000) << format << ": " << apart << " of " << elements << " weights export differently";
    // Learned scales moved.
    if (learn) EXPECT_NE(model.parameter("model.layers.1.mlp.down_proj.weight_quantizer._amax").value, amax_before) << format;
  }
}

// Sparse fine-tuning: the pipeline's 2:4 masks go onto the weights as Parameter::mask; the gradient
// of a pruned weight is not zero before masking (so the masking is what holds it), it is zero after,
// the pruned weights stay exactly zero through AdamW steps (weight decay on) while the kept ones train,
// and an FP8 export of the result is still 2:4.
TEST(SparseTraining, MasksHoldThroughStepsAloneAndWithQat) {
  const io::Checkpoint ckpt = io::Checkpoint::open(testing::data_path("hf/llama"));
  const auto inputs = io::TensorStore::open_file(kQat + "/qat_step/inputs.safetensors");
  for (const std::string format : {"none", "fp8"}) {
    SCOPED_TRACE(format);
    quant::Recipe recipe;
    recipe.format = format;
    recipe.sparsity = "2:4";
    recipe.sparse_algo = format == "none" ? "sparsegpt" : "sparsegpt-mask";
    recipe.validate();
    TrainableModel model = TrainableModel::from_checkpoint(ckpt);
    auto fq = std::make_shared<FakeQuantization>(calibrated_layers(ckpt, inputs, recipe), std::nullopt, SteMode::pass_through, model);
    model.set_fake_quantization(fq);
    std::vector<std::vector<float>> start;
    std::int64_t masked = 0;
    for (const auto& p : model.parameters()) {
      start.push_back(p.value);
      if (p.mask.empty()) continue;
      ++masked;
      ASSERT_TRUE(algo::is_24_mask(p.mask.data(), p.shape[0], p.shape[1])) << p.name;
      for (std::size_t i = 0; i < p.value.size(); ++i) {
        if (!p.mask[i]) ASSERT_EQ(p.value[i], 0.0f) << p.name;
      }
    }
    EXPECT_EQ(masked, 2 * 7);  // every Linear of both layers
    const Batch batch = step_batch(inputs);
    AdamW opt(model.parameters(), AdamWSettings{0.9, 0.95, 1e-8, 0.1}, weight_decay_mask(model.parameters()));
    for (int step = 0; step < 3; ++step) {
      model.zero_grad();
      model.forward_backward(batch, 1.0f / 52.0f);
      if (step == 0) {
        double pruned_grad = 0.0;
        for (const auto& p : model.parameters()) {
          for (std::size_t i = 0; i < p.mask.size(); ++i) pruned_grad += p.mask[i] ? 0.0 : std::fabs(p.grad[i]);
        }
        EXPECT_GT(pruned_grad, 0.0);  // without the mask these weights would move
      }
      mask_gradients(model.parameters());
      for (const auto& p : model.parameters()) {
        for (std::size_t i = 0; i < p.mask.size(); ++i) {
          if (!p.mask[i]) ASSERT_EQ(p.grad[i], 0.0f) << p.name;
        }
      }
      opt.step(model.parameters(), 1e-3);
      mask_values(model.parameters());
    }
    for (std::size_t j = 0; j < model.parameters().size(); ++j) {
      const auto& p = model.parameters()[j];
      if (p.mask.empty()) continue;
      std::int64_t moved = 0, kept = 0;
      for (std::size_t i = 0; i < p.value.size(); ++i) {
        if (!p.mask[i]) {
          ASSERT_EQ(p.value[i], 0.0f) << p.name;
        } else {
          ++kept;
          moved += p.value[i] != start[j][i];
        }
      }
      EXPECT_GT(moved, kept * 9 / 10) << p.name;
    }
    if (format == "fp8") {
      for (std::int64_t l = 0; l < fq->layers(); ++l) {
        const quant::QuantizedLayer ql = fq->quantized_layer(l, model);
        for (const auto& q : ql.linears) {
          const Parameter& p = model.parameter(q.name + ".weight");
          const std::vector<float> w = quant::dequantize_weight(*q.scheme.weight, *q.weight, p.shape[0], p.shape[1]);
          EXPECT_TRUE(algo::is_24_sparse(w.data(), p.shape[0], p.shape[1])) << q.name;
        }
      }
    }
  }
}

// Distillation in the model: a student identical to its teacher has nothing to learn (loss and
// gradients zero); with kd_weight 0 it is plain cross-entropy training, the same gradients bit for bit.
TEST(Distillation, IdenticalTeacherAndTheCrossEntropyMix) {
  const io::Checkpoint ckpt = io::Checkpoint::open(testing::data_path("hf/llama"));
  const auto inputs = io::TensorStore::open_file(kQat + "/qat_step/inputs.safetensors");
  const Batch batch = step_batch(inputs);
  TrainableModel teacher = TrainableModel::from_checkpoint(ckpt, false);
  EXPECT_TRUE(teacher.parameters().front().grad.empty());
  EXPECT_THROW(teacher.forward_backward(batch, 1.0f), Error);

  TrainableModel student = TrainableModel::from_checkpoint(ckpt);
  student.set_distillation(Distillation{&teacher, 2.0f, 1.0f});
  const LossResult kd = student.forward_backward(batch, 1.0f / 52.0f);
  EXPECT_NEAR(kd.loss_sum, 0.0, 1e-5);
  EXPECT_GT(kd.cross_entropy_sum, 52.0);  // the cross-entropy is still measured
  for (const auto& p : student.parameters()) {
    for (const float g : p.grad) ASSERT_LT(std::fabs(g), 1e-5f) << p.name;
  }

  TrainableModel plain = TrainableModel::from_checkpoint(ckpt);
  const LossResult ce = plain.forward_backward(batch, 1.0f / 52.0f);
  student.zero_grad();
  student.set_distillation(Distillation{&teacher, 1.0f, 0.0f});
  const LossResult mixed = student.forward_backward(batch, 1.0f / 52.0f);
  EXPECT_DOUBLE_EQ(mixed.loss_sum, ce.loss_sum);
  for (std::size_t i = 0; i < plain.parameters().size(); ++i) {
    EXPECT_EQ(student.parameters()[i].grad, plain.parameters()[i].grad) << plain.parameters()[i].name;
  }
}

// A learned scale's own learning rate: AdamW with lr_scale 3 on one parameter moves it exactly as
// AdamW at 3 x lr would (weight decay scaled with it), the others unchanged.
TEST(Qat, ScaleLearningRateIsItsOwnParamGroup) {
  std::vector<Parameter> a = {{"w", {3}, {0.5f, -1.0f, 2.0f}, {0.1f, -0.2f, 0.3f}}, {"s", {2}, {1.0f, 2.0f}, {0.5f, -0.5f}}};
  std::vector<Parameter> b = a;
  AdamW scaled(a, AdamWSettings{0.9, 0.95, 1e-8, 0.1}, {true, true});
  scaled.set_lr_scale(1, 3.0);
  AdamW plain(b, AdamWSettings{0.9, 0.95, 1e-8, 0.1}, {true, true});
  std::vector<Parameter> c = {b[1]};
  AdamW tripled(c, AdamWSettings{0.9, 0.95, 1e-8, 0.1}, {true});
  for (int i = 0; i < 3; ++i) {
    scaled.step(a, 1e-2);
    plain.step(b, 1e-2);
    tripled.step(c, 3e-2);
  }
  EXPECT_EQ(a[0].value, b[0].value);
  EXPECT_EQ(a[1].value, c[0].value);
  EXPECT_NE(a[1].value, b[1].value);
}

TEST(Qat, SteModesAndBadSettingsAreNamed) {
  EXPECT_EQ(parse_ste_mode("pass"), SteMode::pass_through);
  EXPECT_EQ(parse_ste_mode("clip"), SteMode::clip);
  EXPECT_THROW(parse_ste_mode("straight"), Error);
  TrainableModel model = TrainableModel::from_checkpoint(io::Checkpoint::open(testing::data_path("hf/llama")));
  // A calibration of another model (one layer short) is refused.
  EXPECT_THROW(FakeQuantization({}, std::nullopt, SteMode::pass_through, model), Error);
  TrainableModel teacher = TrainableModel::from_checkpoint(io::Checkpoint::open(testing::data_path("hf/llama")));
  EXPECT_THROW(model.set_distillation(Distillation{&teacher, 0.0f, 1.0f}), Error);
  EXPECT_THROW(model.set_distillation(Distillation{&teacher, 1.0f, 1.5f}), Error);
  EXPECT_THROW(model.parameter("model.layers.9.mlp.up_proj.weight"), Error);
}

}  // namespace
}  // namespace mopt::train
