#include "algo/ptq.h"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>

#include "core/convert.h"
#include "core/error.h"
#include "core/random.h"
#include "core/progress.h"
#include "kernels/gemm.h"
#include "kernels/ops.h"
#include "model/llama.h"
#include "quant/act_quant.h"
#include "quant/calibrator.h"
#include "quant/fake_quant.h"
#include "algo/gptq.h"
#include "algo/smoothing.h"
#include "algo/sparsity.h"
#include <memory>

namespace mopt::algo {

namespace {

using model::LinearKind;

std::size_t kind_index(LinearKind kind) { return static_cast<std::size_t>(kind); }

struct Batch {
  std::int64_t row0 = 0, rows = 0;
  std::vector<model::SequenceSpan> spans;
};

std::vector<Batch> make_batches(const CalibrationSet& calib, std::int64_t per_batch) {
  std::vector<Batch> batches;
  std::int64_t row = 0;
  for (std::size_t s = 0; s < calib.sequences.size(); s += static_cast<std::size_t>(per_batch)) {
    Batch b;
    b.row0 = row;
    for (std::size_t i = s; i < std::min(calib.sequences.size(), s + static_cast<std::size_t>(per_batch)); ++i) {
      const auto len = static_cast<std::int64_t>(calib.sequences[i].size());
      b.spans.push_back({b.rows, len, 0, 0});
      b.rows += len;
    }
    row += b.rows;
    batches.push_back(std::move(b));
  }
  return batches;
}

bool static_input(const quant::LinearScheme& s) { return s.input && s.input->needs_amax(); }

std::string layer_formats(const std::vector<quant::QuantizedLinear>& linears) {
  std::vector<std::string> seen;
  for (const auto& l : linears) {
    const std::string f = l.scheme.quantized() ? l.scheme.format : "none";
    if (std::find(seen.begin(), seen.end(), f) == seen.end()) seen.push_back(f);
  }
  std::string s;
  for (const auto& f : seen) s += (s.empty() ? "" : "+") + f;
  return s;
}

// The Linears that share an input: q/k/v (the attention norm's output) and gate/up (the MLP norm's).
const std::array<std::vector<LinearKind>, 2> kInputGroups = {std::vector<LinearKind>{LinearKind::q, LinearKind::k, LinearKind::v},
                                                             std::vector<LinearKind>{LinearKind::gate, LinearKind::up}};

// The Linear whose input statistics stand for `kind`'s (they see the same tensor).
LinearKind input_leader(LinearKind kind) {
  switch (kind) {
    case LinearKind::k:
    case LinearKind::v: return LinearKind::q;
    case LinearKind::up: return LinearKind::gate;
    default: return kind;
  }
}

struct Algorithm {
  bool smoothquant = false, awq_lite = false, awq_clip = false, gptq = false;
  bool any() const { return smoothquant || awq_lite || awq_clip || gptq; }
};

Algorithm parse_algorithm(const std::string& name) {
  Algorithm a;
  if (name == "max") return a;
  if (name == "smoothquant") a.smoothquant = true;
  else if (name == "awq_lite") a.awq_lite = true;
  else if (name == "awq_clip") a.awq_clip = true;
  else if (name == "awq_full") a.awq_lite = a.awq_clip = true;
  else if (name == "gptq") a.gptq = true;
  else if (name == "awq_lite+gptq") a.awq_lite = a.gptq = true;
  else fail("unknown algorithm '{}'", name);
  return a;
}

struct StatsNeeds {
  bool channel_max = false, mean_abs = false, clip_samples = false, hessian = false;
  bool mean_square = false;  // weights in ggml blocks: their quantizer's importance
};

// What one layer's calibration run saw.
class LayerStats : public model::LayerObserver {
 public:
  LayerStats(std::array<bool, 7> want_histogram, StatsNeeds needs) : want_histogram_(want_histogram), needs_(needs) {}

  void linear_input(std::int64_t layer, LinearKind kind, const float* x, std::int64_t rows, std::int64_t cols) override {
    const std::size_t k = kind_index(kind);
    float m = 0.0f;
    const std::int64_t n = rows * cols;
    for (std::int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(x[i])) {
        fail("layer {}: non-finite activation {} at the input of {} (row {}, column {})", layer, x[i], model::linear_name(kind),
             i / cols, i % cols);
      }
      m = std::max(m, std::fabs(x[i]));
    }
    input_max[k] = std::max(input_max[k], m);
    if (want_histogram_[k]) histograms[k].collect(x, n);
    if (input_leader(kind) != kind) return;  // the algorithms' statistics once per distinct input
    if (needs_.channel_max) {
      auto& cm = channel_max[k];
      if (cm.empty()) cm.assign(static_cast<std::size_t>(cols), 0.0f);
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t j = 0; j < cols; ++j) cm[j] = std::max(cm[j], std::fabs(x[r * cols + j]));
      }
    }
    if (needs_.mean_abs) mean_abs[k].add(x, rows, cols);
    if (needs_.clip_samples) clip[k].add(x, rows, cols);
    if (needs_.hessian) hessian[k].add(x, rows, cols);
    if (needs_.mean_abs) batch_gram[k].add(x, rows, cols, 1.0 / static_cast<double>(rows));
    if (needs_.mean_square) {
      auto& sq = square_sum[k];
      if (sq.empty()) sq.assign(static_cast<std::size_t>(cols), 0.0);
      for (std::int64_t r = 0; r < rows; ++r) {
        for (std::int64_t j = 0; j < cols; ++j) sq[j] += static_cast<double>(x[r * cols + j]) * x[r * cols + j];
      }
      square_rows[k] += rows;
    }
  }

  // The mean square of each channel of input k over every token seen (llama-imatrix's statistic); empty
  // when none was collected.
  std::vector<float> mean_square(std::size_t k) const {
    std::vector<float> m;
    if (square_rows[k] == 0) return m;
    for (const double v : square_sum[k]) m.push_back(static_cast<float>(v / static_cast<double>(square_rows[k])));
    return m;
  }

  void key_value(std::int64_t layer, const float* k, const float* v, std::int64_t rows, std::int64_t kv_dim) override {
    for (std::int64_t i = 0; i < rows * kv_dim; ++i) {
      if (!std::isfinite(k[i]) || !std::isfinite(v[i])) fail("layer {}: non-finite key or value after RoPE (row {})", layer, i / kv_dim);
      key_max = std::max(key_max, std::fabs(k[i]));
      value_max = std::max(value_max, std::fabs(v[i]));
    }
  }

  std::array<float, 7> input_max{};
  std::array<quant::HistogramCalibrator, 7> histograms;
  float key_max = 0.0f, value_max = 0.0f;
  std::array<std::vector<float>, 7> channel_max;
  std::array<MeanAbsAccumulator, 7> mean_abs;
  std::array<ClipSampler, 7> clip;
  std::array<GramAccumulator, 7> hessian;  // unit weights (GPTQ)
  std::array<GramAccumulator, 7> batch_gram;  // batches weighted 1/rows (AWQ-lite)
  std::array<std::vector<double>, 7> square_sum;  // per channel, sum of x^2
  std::array<std::int64_t, 7> square_rows{};

 private:
  std::array<bool, 7> want_histogram_;
  StatsNeeds needs_;
};

// One Linear while the algorithms work on it.
struct LinearWork {
  std::int64_t out = 0, in = 0;
  std::vector<float> w;             // [out, in] f32 holding values of the model's dtype
  std::vector<float> pqs;           // pre-quantization scale on the input (model dtype values); empty: none
  std::vector<float> folded_scale;  // the scale folded into the preceding norm (the input is scaled by it)
  std::vector<float> row_scale;     // output rows multiplied by the next Linear's scale (NVFP4_AWQ's v_proj, up_proj)
  std::vector<float> amax;          // weight amax fixed by an algorithm (clip); empty: max-calibrate w
  std::vector<float> block_amax;    // NVFP4 block maxima fixed before GPTQ; empty: from w
  std::vector<std::byte> ggml_grid_blocks;  // ggml blocks whose scales GPTQ fixed; empty: from w
  std::vector<float> input_amax;    // static input amax; empty: none
  float alpha = -1.0f;
};

// The reference's apply_pre_quant_scale_and_smooth: the input is multiplied by `s` (cast to the
// model dtype), W by 1/s (in f32, cast back), the weight re-calibrated, and a static input amax
// becomes max_j(channel_amax_j * s_j).
void apply_pre_quant_scale(LinearWork& wk, const std::vector<float>& s, const std::vector<float>& channel_amax, bool static_in, DType dtype) {
  for (float v : s) {
    if (!(v > 0.0f) || !std::isfinite(v)) fail("pre-quantization scale {} is not a positive finite number", v);
  }
  wk.pqs = s;
  round_to_dtype(dtype, wk.pqs);
  for (std::int64_t r = 0; r < wk.out; ++r) {
    for (std::int64_t j = 0; j < wk.in; ++j) wk.w[r * wk.in + j] = wk.w[r * wk.in + j] * (1.0f / s[j]);
  }
  round_to_dtype(dtype, wk.w);
  wk.amax.clear();
  if (static_in) {
    std::vector<float> a = channel_amax;
    round_to_dtype(dtype, a);
    float m = 0.0f;
    for (std::size_t j = 0; j < a.size(); ++j) m = std::max(m, a[j] * s[j]);
    std::vector<float> mv{m};
    round_to_dtype(dtype, mv);
    wk.input_amax = mv;
  }
}

// The reference's _update_pre_quant_scale: W * old / new in f32, cast back; the weight amax is re-calibrated.
void resmooth(LinearWork& wk, const std::vector<float>& scale, DType dtype) {
  if (wk.pqs == scale) return;
  for (std::int64_t r = 0; r < wk.out; ++r) {
    for (std::int64_t j = 0; j < wk.in; ++j) wk.w[r * wk.in + j] = (wk.w[r * wk.in + j] * wk.pqs[j]) / scale[j];
  }
  round_to_dtype(dtype, wk.w);
  wk.pqs = scale;
  wk.amax.clear();
}

// NVFP4_AWQ's export: the pre-quantization scale of `from` (o_proj, down_proj) multiplies the output
// rows of the Linear before it (v_proj, up_proj), when their sizes match (not under GQA for o_proj).
void fold_scale_into_rows(LinearWork& from, LinearWork& into, model::Linear& into_linear, const std::string& bias_name,
                          quant::QuantizedLayer& ql, DType dtype) {
  if (from.pqs.empty() || into.w.empty() || from.in != into.out) return;
  for (std::int64_t r = 0; r < into.out; ++r) {
    for (std::int64_t j = 0; j < into.in; ++j) into.w[r * into.in + j] = into.w[r * into.in + j] * from.pqs[r];
  }
  round_to_dtype(dtype, into.w);
  into.amax.clear();
  into.row_scale = from.pqs;
  from.folded_scale = from.pqs;  // `from` now sees its input multiplied by the scale (into's rows carry it)
  if (into_linear.bias) {
    std::vector<float> b = into_linear.bias->to_f32();
    for (std::size_t r = 0; r < b.size(); ++r) b[r] = b[r] * from.pqs[r];
    const DType bias_dtype = into_linear.bias->dtype();
    round_to_dtype(bias_dtype, b);
    ql.replaced.emplace_back(bias_name, Tensor::from_f32(b, {static_cast<std::int64_t>(b.size())}).to(bias_dtype));
    into_linear.bias = Tensor::from_f32(b, {static_cast<std::int64_t>(b.size())});
  }
  from.pqs.clear();
}

// As the reference's export does for every format but per-tensor FP8: a fused group shares the input
// amax, a per-tensor (NVFP4 global) weight amax and W4A8's second-stage amax, each the group's max.
void share_group_amax(const std::array<quant::LinearScheme, 7>& schemes, std::array<std::vector<float>, 7>& weight_amax,
                      std::array<float, 7>& second_amax, std::array<LinearWork, 7>& work) {
  for (const auto& group : kInputGroups) {
    const auto& s = schemes[kind_index(group[0])];
    if (!s.quantized() || s.format == "fp8") continue;
    float in_max = 0.0f, w_max = 0.0f, second_max = 0.0f;
    for (const auto kind : group) {
      const std::size_t k = kind_index(kind);
      if (!work[k].input_amax.empty()) in_max = std::max(in_max, work[k].input_amax[0]);
      if (weight_amax[k].size() == 1) w_max = std::max(w_max, weight_amax[k][0]);
      second_max = std::max(second_max, second_amax[k]);
    }
    for (const auto kind : group) {
      const std::size_t k = kind_index(kind);
      if (!work[k].input_amax.empty()) work[k].input_amax[0] = in_max;
      if (weight_amax[k].size() == 1) weight_amax[k][0] = w_max;
      second_amax[k] = second_max;
    }
  }
}

model::ActivationTransform input_transform(const quant::LinearScheme& s, const std::vector<float>& input_amax, const std::vector<float>& pqs) {
  if (s.input) {
    auto aq = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{*s.input, input_amax, pqs});
    return [aq](float* x, std::int64_t rows, std::int64_t cols) { aq->apply(x, rows, cols); };
  }
  if (pqs.empty()) return {};
  auto p = std::make_shared<std::vector<float>>(pqs);
  return [p](float* x, std::int64_t rows, std::int64_t cols) {
    for (std::int64_t r = 0; r < rows; ++r) {
      for (std::int64_t j = 0; j < cols; ++j) x[r * cols + j] *= (*p)[j];
    }
  };
}

// What a quantized weight stands for in the original model: the input scale (kept or folded into the
// norm) multiplied back into its columns, a row scale divided out of its rows.
std::vector<float> effective_weight(std::vector<float> w, const LinearWork& wk) {
  const std::vector<float>& col = !wk.pqs.empty() ? wk.pqs : wk.folded_scale;
  for (std::int64_t r = 0; r < wk.out; ++r) {
    const float row = wk.row_scale.empty() ? 1.0f : wk.row_scale[r];
    for (std::int64_t j = 0; j < wk.in; ++j) {
      float& v = w[r * wk.in + j];
      if (!col.empty()) v *= col[j];
      v /= row;
    }
  }
  return w;
}


// Runs `weights` over the layer inputs in `buffer` (replaced by the outputs) and returns
// ||y - ref|| / ||ref||; a non-finite output is an error.
double layer_output_error(const io::ModelConfig& c, const std::vector<float>& inv_freq, std::int64_t l, const model::LayerWeights& weights,
                          std::vector<float>& buffer, const std::vector<float>& ref, const std::vector<Batch>& batches, model::Workspace& ws) {
  const std::int64_t H = c.hidden_size;
  double num = 0.0, den = 0.0;
  for (const auto& b : batches) {
    float* y = buffer.data() + b.row0 * H;
    model::decoder_layer_forward(c, inv_freq, l, weights, y, b.rows, b.spans, nullptr, ws, nullptr);
    const float* r = ref.data() + b.row0 * H;
    for (std::int64_t i = 0; i < b.rows * H; ++i) {
      if (!std::isfinite(y[i])) fail("layer {}: the quantized layer produced a non-finite output", l);
      const double d = static_cast<double>(y[i]) - r[i];
      num += d * d;
      den += static_cast<double>(r[i]) * r[i];
    }
  }
  return den > 0.0 ? std::sqrt(num / den) : 0.0;
}

// The lm_head on the final norm of `hidden` (the last layer's outputs on the calibration rows, in
// `batches`; null without calibration), quantized with the recipe's algorithm as a decoder Linear is:
// static input amax; SmoothQuant's or AWQ-lite's input scale, folded into the final norm (it feeds only
// the lm_head, tied or not); AWQ's clip search; GPTQ on the Hessian of the normed inputs.
LayerReport quantize_head(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const quant::LinearScheme& scheme, const Algorithm& algo,
                          const PtqOptions& options, const std::vector<float>* hidden, const std::vector<Batch>& batches, const QuantizedLayerSink& sink) {
  const auto start = std::chrono::steady_clock::now();
  const io::ModelConfig& c = checkpoint.config();
  const std::int64_t H = c.hidden_size;
  const auto eps = static_cast<float>(c.rms_norm_eps);
  const DType model_dtype = c.dtype;
  const Tensor weight = checkpoint.tensor(c.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  const Tensor final_norm = checkpoint.tensor("model.norm.weight");
  LinearWork wk;
  wk.out = weight.dim(0);
  wk.in = weight.dim(1);
  wk.w = weight.to_f32();
  const std::vector<float> original = wk.w;
  const bool static_in = static_input(scheme);
  if (static_in && hidden == nullptr) fail("lm_head: {} quantizes its input and needs calibration text (--calib)", scheme.format);
  with_context("lm_head", [&] { quant::check_algorithm_supports(recipe.effective_algorithm(), scheme); });
  const bool use_algo = algo.any() && hidden != nullptr;

  // The head's inputs, and what the algorithms need of them (one slot of LayerStats stands for the head).
  std::vector<float> normed;
  std::int64_t rows = 0;
  std::vector<float> norm = final_norm.to_f32();
  constexpr LinearKind kSlot = LinearKind::q;
  const bool histogram = static_in && recipe.calibrator != quant::CalibMethod::max && scheme.input->scaling == quant::Scaling::per_tensor;
  std::array<bool, 7> want_histogram{};
  want_histogram[kind_index(kSlot)] = histogram;
  StatsNeeds needs;
  needs.channel_max = true;
  needs.mean_abs = use_algo && algo.awq_lite;
  needs.clip_samples = use_algo && algo.awq_clip;
  needs.hessian = use_algo && algo.gptq;
  LayerStats stats(want_histogram, needs);
  if (hidden != nullptr) {
    rows = static_cast<std::int64_t>(hidden->size()) / H;
    normed.resize(hidden->size());
    kernels::rmsnorm(hidden->data(), norm.data(), rows, H, eps, normed.data());
    for (const float v : normed) {
      if (!std::isfinite(v)) fail("lm_head: non-finite activation {} at its input", v);
    }
    for (const auto& b : batches) stats.linear_input(-1, kSlot, normed.data() + b.row0 * H, b.rows, H);
  }
  const std::size_t slot = kind_index(kSlot);
  quant::QuantizedLayer ql;
  ql.index = -1;
  if (static_in) {
    wk.input_amax = {histogram ? stats.histograms[slot].compute(recipe.calibrator, scheme.input->element, recipe.percentile) : stats.input_max[slot]};
  }
  const std::vector<float> input_amax_rtn = wk.input_amax;
  if (algo.smoothquant && static_in && scheme.input->element == quant::Element::int8 && hidden != nullptr) {
    const std::vector<float> s = with_context("lm_head", [&] { return smoothquant_scale(stats.channel_max[slot], wk.w.data(), wk.out, wk.in, 1.0f); });
    apply_pre_quant_scale(wk, s, stats.channel_max[slot], true, model_dtype);
  }
  if (use_algo && algo.awq_lite) {
    const AwqLiteSearch search(*scheme.weight, wk.w.data(), wk.out, wk.in, stats.mean_abs[slot].mean(), stats.batch_gram[slot].full(), model_dtype);
    wk.alpha = search.best_alpha();
    std::vector<float> s = search.scale(wk.alpha);
    for (float& v : s) v = 1.0f / v;
    apply_pre_quant_scale(wk, s, stats.channel_max[slot], static_in, model_dtype);
  }
  if (use_algo && algo.awq_clip) {
    wk.amax = with_context("lm_head", [&] { return awq_clip_search(*scheme.weight, wk.w.data(), wk.out, wk.in, stats.clip[slot], wk.pqs); });
  }
  if (!wk.pqs.empty()) {
    // The final norm feeds only the lm_head: the scale goes into it.
    for (std::int64_t j = 0; j < H; ++j) norm[j] = norm[j] * wk.pqs[j];
    round_to_dtype(final_norm.dtype(), norm);
    ql.replaced.emplace_back("model.norm.weight", Tensor::from_f32(norm, {H}).to(final_norm.dtype()));
    wk.folded_scale = wk.pqs;
    wk.pqs.clear();
    // The calibration inputs as the folded norm now produces them.
    kernels::rmsnorm(hidden->data(), norm.data(), rows, H, eps, normed.data());
  }
  const auto weight_amax = [&](const LinearWork& w) {
    return !w.amax.empty() ? w.amax : with_context("lm_head.weight", [&] { return quant::compute_amax(*scheme.weight, w.w.data(), w.out, w.in); });
  };
  const std::vector<float> amax = weight_amax(wk);
  const float second = scheme.weight->fp8_second_stage ? quant::w4a8_second_amax(*scheme.weight, wk.w.data(), wk.out, wk.in, amax) : 0.0f;
  LayerReport lr;
  if (use_algo && algo.gptq) {
    std::vector<double> h = gptq_hessian(stats.hessian[slot]);
    if (!wk.folded_scale.empty()) {
      const std::vector<float>& p = wk.folded_scale;
      for (std::int64_t i = 0; i < H; ++i) {
        for (std::int64_t j = 0; j < H; ++j) h[i * H + j] *= static_cast<double>(p[i]) * p[j];
      }
    }
    if (scheme.weight->scaling == quant::Scaling::nvfp4) wk.block_amax = quant::nvfp4_block_amax(*scheme.weight, wk.w.data(), wk.out, wk.in);
    const GptqResult g = with_context("lm_head", [&] {
      GptqOptions go;
      go.damp = options.gptq_damp;
      go.act_order = options.gptq_act_order;
      return gptq_quantize(*scheme.weight, wk.w.data(), wk.out, wk.in, amax, std::move(h), go, wk.block_amax);
    });
    lr.gptq_retries = g.damp_retries;
    lr.gptq_fallbacks = g.fell_back ? 1 : 0;
  }
  quant::QuantizedLinear qlin;
  qlin.name = "lm_head";
  qlin.scheme = scheme;
  qlin.weight = with_context("lm_head", [&] { return quant::quantize_weight(*scheme.weight, wk.w.data(), wk.out, wk.in, amax, second, wk.block_amax); });
  std::vector<float> deq = quant::dequantize_weight(*scheme.weight, *qlin.weight, wk.out, wk.in);
  qlin.input_amax = wk.input_amax;
  qlin.folded_input_scale = wk.folded_scale;
  qlin.weight_amax = amax;
  qlin.weight_amax2 = second;
  lr.layer = -1;
  lr.formats = scheme.format;
  if (wk.alpha >= 0.0f) lr.alphas.emplace_back("lm_head", wk.alpha);
  // The logits on up to 128 calibration rows against the unquantized head's (and, after an algorithm,
  // round-to-nearest's).
  if (rows > 0) {
    const std::int64_t n = std::min<std::int64_t>(rows, 128);
    std::vector<float> x(normed.begin(), normed.begin() + n * H);
    if (!wk.folded_scale.empty()) {
      // The reference's logits come from the original norm: undo the fold on this copy.
      for (std::int64_t r = 0; r < n; ++r) {
        for (std::int64_t j = 0; j < H; ++j) x[r * H + j] /= wk.folded_scale[j];
      }
    }
    std::vector<float> ref(static_cast<std::size_t>(n * wk.out)), got(ref.size());
    kernels::gemm_f32_strided(x.data(), n, H, original.data(), wk.out, ref.data(), wk.out, false);
    const auto logits_error = [&](const float* inputs, const std::vector<float>& w_deq, const std::vector<float>& in_amax) {
      std::vector<float> xq(inputs, inputs + n * H);
      if (auto t = input_transform(scheme, in_amax, {})) t(xq.data(), n, H);
      kernels::gemm_f32_strided(xq.data(), n, H, w_deq.data(), wk.out, got.data(), wk.out, false);
      return quant::relative_error(got, ref);
    };
    lr.output_error = logits_error(normed.data(), deq, qlin.input_amax);
    if (use_algo) {
      LinearWork plain;
      plain.out = wk.out;
      plain.in = wk.in;
      plain.w = original;
      const std::vector<float> a = weight_amax(plain);
      const float s2 = scheme.weight->fp8_second_stage ? quant::w4a8_second_amax(*scheme.weight, plain.w.data(), plain.out, plain.in, a) : 0.0f;
      const quant::QuantizedWeight q = quant::quantize_weight(*scheme.weight, plain.w.data(), plain.out, plain.in, a, s2, {});
      lr.output_error_rtn = logits_error(x.data(), quant::dequantize_weight(*scheme.weight, q, plain.out, plain.in), input_amax_rtn);
    }
  }
  lr.weight_error = qlin.weight_error = quant::relative_error(effective_weight(std::move(deq), wk), original);
  ql.linears.push_back(std::move(qlin));
  sink(std::move(ql));
  lr.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return lr;
}

}  // namespace

std::int64_t CalibrationSet::tokens() const {
  std::int64_t n = 0;
  for (const auto& s : sequences) n += static_cast<std::int64_t>(s.size());
  return n;
}

CalibrationSet make_calibration_set(const std::vector<std::string>& documents, const io::Tokenizer& tokenizer, std::int64_t n,
                                    std::int64_t seq_len, std::uint64_t seed) {
  if (n <= 0 || seq_len < 2) fail("calibration needs at least one sample of at least 2 tokens");
  const std::vector<std::int32_t> prefix = tokenizer.prefix_special_ids();
  const auto piece = seq_len - static_cast<std::int64_t>(prefix.size());
  if (piece < 1) fail("sequence length {} leaves no room after the tokenizer's {} prefix tokens", seq_len, prefix.size());
  std::vector<std::vector<std::int32_t>> pool;
  for (const auto& doc : documents) {
    const std::vector<std::int32_t> ids = tokenizer.encode(doc, false);
    for (std::size_t start = 0; start < ids.size(); start += static_cast<std::size_t>(piece)) {
      const std::size_t end = std::min(ids.size(), start + static_cast<std::size_t>(piece));
      std::vector<std::int32_t> s = prefix;
      s.insert(s.end(), ids.begin() + static_cast<std::ptrdiff_t>(start), ids.begin() + static_cast<std::ptrdiff_t>(end));
      if (s.size() >= 2) pool.push_back(std::move(s));
    }
  }
  if (pool.empty()) fail("the calibration text gives no sample of at least 2 tokens");
  CalibrationSet set;
  if (static_cast<std::int64_t>(pool.size()) <= n) {
    set.sequences = std::move(pool);
    return set;
  }
  // Fisher-Yates with splitmix64: the same draw on every platform.
  std::vector<std::size_t> order(pool.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  seeded_shuffle(order, seed);
  order.resize(static_cast<std::size_t>(n));
  std::sort(order.begin(), order.end());  // keep the text's order among the chosen pieces
  for (std::size_t i : order) set.sequences.push_back(std::move(pool[i]));
  return set;
}

bool folds_scales_across_linears(const quant::LinearScheme& scheme, const PtqOptions& options) {
  return scheme.format == "nvfp4_awq" || options.fold_pre_quant_scales;
}

bool needs_calibration(const io::ModelConfig& config, const quant::Recipe& recipe) {
  if (recipe.kv_cache || recipe.effective_algorithm() != "max") return true;
  if (!recipe.sparsity.empty() && sparse_algo_needs_calibration(parse_sparse_algo(recipe.sparse_algo))) return true;
  if (static_input(recipe.scheme_for("lm_head"))) return true;
  for (std::int64_t l = 0; l < config.num_layers; ++l) {
    for (const auto kind : model::kAllLinears) {
      if (static_input(recipe.scheme_for(fmt::format("model.layers.{}.{}", l, model::linear_name(kind))))) return true;
    }
  }
  return false;
}

PtqReport quantize_checkpoint(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const CalibrationSet& calib,
                              const PtqOptions& options, const QuantizedLayerSink& sink, const QuantizedLayerSink& head_sink) {
  recipe.validate();
  const quant::LinearScheme head_scheme = recipe.scheme_for("lm_head");
  if (head_scheme.quantized() && !head_sink) fail("lm_head: this export keeps the lm_head in 16 bits (only the modelopt export holds a quantized lm_head)");
  const io::ModelConfig& c = checkpoint.config();
  const auto start_time = std::chrono::steady_clock::now();
  const bool calibrating = !calib.sequences.empty();
  const Algorithm algo = parse_algorithm(recipe.effective_algorithm());
  const bool sparsify = !recipe.sparsity.empty();
  const SparseAlgo sparse_algo = sparsify ? parse_sparse_algo(recipe.sparse_algo) : SparseAlgo::magnitude;
  if (!calibrating && needs_calibration(c, recipe)) {
    if (sparsify && sparse_algo_needs_calibration(sparse_algo) && !algo.any()) {
      fail("sparsity algorithm {} needs calibration text (--calib)", recipe.sparse_algo);
    }
    fail("{}{} needs calibration text (--calib)", algo.any() ? "algorithm " + recipe.effective_algorithm() : "format " + recipe.format,
         !algo.any() && recipe.kv_cache ? " with a KV-cache format" : "");
  }
  // Every Linear's shape against its layout, before any calibration work.
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    for (const auto kind : model::kAllLinears) {
      const std::string name = fmt::format("model.layers.{}.{}", l, model::linear_name(kind));
      const quant::LinearScheme s = recipe.scheme_for(name);
      if (!s.quantized()) continue;
      const io::TensorStore::Location* loc = checkpoint.tensors().find(name + ".weight");
      if (loc == nullptr || loc->entry->shape.size() != 2) continue;  // the layer's loading names what is wrong
      with_context(name, [&] { quant::check_weight_shape(*s.weight, loc->entry->shape[0], loc->entry->shape[1]); });
    }
  }
  // As the reference by default (its GPTQ too: layerwise.enable is off), every layer is calibrated on the
  // unquantized model's activations; `propagate_quantized` gives GPTQ's original sequential procedure.
  const bool propagate = options.propagate_quantized;
  const std::int64_t H = c.hidden_size;
  const std::int64_t total_rows = calib.tokens();
  const DType model_dtype = c.dtype;
  std::optional<quant::KvScheme> kv;
  if (recipe.kv_cache) kv = quant::kv_scheme(*recipe.kv_cache);

  // Embeddings of every calibration token.
  std::vector<float> hidden(static_cast<std::size_t>(total_rows * H));
  {
    const Tensor embed = checkpoint.tensor("model.embed_tokens.weight");
    const auto* base = reinterpret_cast<const std::uint8_t*>(embed.bytes().data());
    const std::int64_t row_bytes = H * static_cast<std::int64_t>(dtype_bits(embed.dtype())) / 8;
    std::int64_t row = 0;
    for (const auto& seq : calib.sequences) {
      for (std::int32_t t : seq) {
        if (t < 0 || t >= embed.dim(0)) fail("calibration token id {} is outside the embedding table ({} rows)", t, embed.dim(0));
        convert_to_f32(embed.dtype(), base + t * row_bytes, hidden.data() + row * H, static_cast<std::size_t>(H));
        ++row;
      }
    }
  }
  std::vector<float> saved, scratch;
  const std::vector<Batch> batches = make_batches(calib, std::max<std::int64_t>(1, options.batch_sequences));
  const std::vector<float> inv_freq = model::rope_inv_freq(c);
  model::Workspace ws;

  PtqReport report;
  report.algorithm = recipe.effective_algorithm();
  report.calib_sequences = static_cast<std::int64_t>(calib.sequences.size());
  report.calib_tokens = total_rows;
  Progress progress("quantize", static_cast<std::uint64_t>(c.num_layers), "layers");

  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const auto layer_start = std::chrono::steady_clock::now();
    const model::LayerWeights fp = model::load_layer(checkpoint, l);
    const std::string prefix = fmt::format("model.layers.{}.", l);

    std::array<quant::LinearScheme, 7> schemes;
    std::array<bool, 7> want_histogram{};
    for (const auto kind : model::kAllLinears) {
      auto& s = schemes[kind_index(kind)];
      s = recipe.scheme_for(prefix + std::string(model::linear_name(kind)));
      want_histogram[kind_index(kind)] = static_input(s) && recipe.calibrator != quant::CalibMethod::max && s.input->scaling == quant::Scaling::per_tensor;
      if (s.quantized()) with_context(prefix + std::string(model::linear_name(kind)), [&] { quant::check_algorithm_supports(recipe.effective_algorithm(), s); });
    }
    // Linears that share an input (q/k/v, gate/up) become one fused Linear in the engines: they must share a format.
    for (const auto& group : kInputGroups) {
      for (const auto kind : group) {
        if (schemes[kind_index(kind)].format != schemes[kind_index(group[0])].format) {
          fail("layer {}: {} and {} share an input and must share a format (got '{}' and '{}')", l, model::linear_name(group[0]),
               model::linear_name(kind), schemes[kind_index(group[0])].format, schemes[kind_index(kind)].format);
        }
      }
    }

    // Which Linears are pruned to 2:4 (the recipe's, where the algorithm's shape rules allow).
    std::array<bool, 7> sparse{};
    for (const auto kind : model::kAllLinears) {
      const Tensor& w = fp.linear(kind).weight;
      sparse[kind_index(kind)] = sparsify && recipe.sparse_for(prefix + std::string(model::linear_name(kind))) &&
                                 sparsity_eligible(sparse_algo, w.dim(0), w.dim(1));
    }
    const bool sparsegpt = sparsify && sparse_algo_needs_calibration(sparse_algo) && std::find(sparse.begin(), sparse.end(), true) != sparse.end();

    // 1. The original layer on the calibration activations, observed.
    StatsNeeds needs;
    needs.channel_max = algo.smoothquant || algo.awq_lite;
    needs.mean_abs = algo.awq_lite;
    needs.clip_samples = algo.awq_clip;
    needs.hessian = algo.gptq || sparsegpt;
    needs.mean_square = std::any_of(schemes.begin(), schemes.end(), [](const quant::LinearScheme& s) {
      return s.quantized() && s.weight->grid == quant::IntGrid::ggml;
    });
    LayerStats stats(want_histogram, needs);
    if (calibrating) {
      saved = hidden;
      for (const auto& b : batches) {
        model::decoder_layer_forward(c, inv_freq, l, fp, hidden.data() + b.row0 * H, b.rows, b.spans, nullptr, ws, &stats);
      }
    }

    // 2. Pruning first (the quantizers are calibrated on the pruned weights, as the reference's
    // sparsify-then-quantize does): each pruned Linear's mask and weights.
    quant::QuantizedLayer ql;
    ql.index = l;
    model::LayerWeights qw = fp;
    LayerReport lr;
    std::array<std::vector<std::uint8_t>, 7> masks;
    std::array<std::vector<float>, 7> pruned;
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      if (!sparse[k]) continue;
      const std::string name = prefix + std::string(model::linear_name(kind));
      const Tensor& wt = fp.linear(kind).weight;
      const std::int64_t out = wt.dim(0), in = wt.dim(1);
      std::vector<float> w = wt.to_f32();
      const std::vector<float> original = w;
      if (sparse_algo == SparseAlgo::magnitude) {
        masks[k] = magnitude_24_mask(w.data(), out, in);
        apply_mask(w.data(), masks[k].data(), out * in);
      } else {
        SparseGptOptions so;
        so.update_weights = sparse_algo == SparseAlgo::sparsegpt;
        const SparseGptResult r = with_context(name, [&] {
          return sparsegpt_prune(w.data(), out, in, gptq_hessian(stats.hessian[kind_index(input_leader(kind))]), so);
        });
        masks[k] = r.mask;
        lr.sparse_retries += r.damp_retries;
        lr.sparse_fallbacks += r.fell_back ? 1 : 0;
        round_to_dtype(model_dtype, w);
        apply_mask(w.data(), masks[k].data(), out * in);
      }
      lr.sparse_weight_error += quant::relative_error(w, original);
      ++lr.sparse_linears;
      qw.linear(kind).weight = Tensor::from_f32(w, {out, in});
      if (!schemes[k].quantized()) {
        const DType dtype = wt.dtype();
        ql.replaced.emplace_back(name + ".weight", Tensor::from_f32(w, {out, in}).to(dtype));
      }
      pruned[k] = std::move(w);
    }
    if (lr.sparse_linears > 0) lr.sparse_weight_error /= lr.sparse_linears;

    // 3. The algorithm's weights, scales and amax per Linear.
    std::array<LinearWork, 7> work;
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      if (!schemes[k].quantized()) continue;
      const Tensor& w = fp.linear(kind).weight;
      work[k].out = w.dim(0);
      work[k].in = w.dim(1);
      work[k].w = sparse[k] ? pruned[k] : w.to_f32();
      if (static_input(schemes[k])) {
        work[k].input_amax = {want_histogram[k] ? stats.histograms[k].compute(recipe.calibrator, schemes[k].input->element, recipe.percentile)
                                                : stats.input_max[k]};
      }
    }
    std::array<std::vector<float>, 7> original_weights;  // the weight error is measured against these (before pruning)
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      if (schemes[k].quantized()) original_weights[k] = sparse[k] ? fp.linear(kind).weight.to_f32() : work[k].w;
    }
    const auto input_amax_rtn = [&] {
      std::array<std::vector<float>, 7> a;
      for (std::size_t k = 0; k < 7; ++k) a[k] = work[k].input_amax;
      return a;
    }();

    if (algo.smoothquant) {
      for (const auto kind : model::kAllLinears) {
        const std::size_t k = kind_index(kind);
        if (!schemes[k].quantized()) continue;
        const auto& a = stats.channel_max[kind_index(input_leader(kind))];
        const std::vector<float> s = with_context(prefix + std::string(model::linear_name(kind)), [&] { return smoothquant_scale(a, work[k].w.data(), work[k].out, work[k].in, 1.0f); });
        apply_pre_quant_scale(work[k], s, a, static_input(schemes[k]), model_dtype);
      }
    }
    if (algo.awq_lite) {
      std::array<std::unique_ptr<AwqLiteSearch>, 7> searches;
      for (const auto kind : model::kAllLinears) {
        const std::size_t k = kind_index(kind);
        if (!schemes[k].quantized()) continue;
        const std::size_t lead = kind_index(input_leader(kind));
        searches[k] = std::make_unique<AwqLiteSearch>(*schemes[k].weight, work[k].w.data(), work[k].out, work[k].in, stats.mean_abs[lead].mean(),
                                                      stats.batch_gram[lead].full(), model_dtype, stats.mean_square(lead));
      }
      for (const auto kind : model::kAllLinears) {
        const std::size_t k = kind_index(kind);
        if (!searches[k]) continue;
        const float alpha = searches[k]->best_alpha();
        std::vector<float> s = searches[k]->scale(alpha);
        for (float& v : s) v = 1.0f / v;
        apply_pre_quant_scale(work[k], s, stats.channel_max[kind_index(input_leader(kind))], static_input(schemes[k]), model_dtype);
        work[k].alpha = alpha;
        lr.alphas.emplace_back(std::string(model::linear_name(kind)), alpha);
      }
    }
    if (algo.awq_clip) {
      for (const auto kind : model::kAllLinears) {
        const std::size_t k = kind_index(kind);
        if (!schemes[k].quantized()) continue;
        work[k].amax = with_context(prefix + std::string(model::linear_name(kind)), [&] {
          return awq_clip_search(*schemes[k].weight, work[k].w.data(), work[k].out, work[k].in, stats.clip[kind_index(input_leader(kind))],
                                 work[k].pqs);
        });
      }
    }

    // 4. As the reference's export does: one pre-quantization scale per shared input, folded where it can be.
    if (folds_scales_across_linears(schemes[kind_index(LinearKind::q)], options)) {
      fold_scale_into_rows(work[kind_index(LinearKind::o)], work[kind_index(LinearKind::v)], qw.v, prefix + "self_attn.v_proj.bias", ql, model_dtype);
      fold_scale_into_rows(work[kind_index(LinearKind::down)], work[kind_index(LinearKind::up)], qw.up, prefix + "mlp.up_proj.bias", ql, model_dtype);
    }
    if (options.fold_pre_quant_scales) {
      // A scale that could not be folded (o_proj under GQA, or when v_proj is not quantized) is dropped:
      // that Linear is quantized unsmoothed, with its own clip search when the algorithm has one.
      for (const auto kind : {LinearKind::o, LinearKind::down}) {
        const std::size_t k = kind_index(kind);
        if (work[k].pqs.empty()) continue;
        work[k].w = sparse[k] ? pruned[k] : original_weights[k];
        work[k].pqs.clear();
        work[k].amax.clear();
        work[k].input_amax = input_amax_rtn[k];
        if (algo.awq_clip) {
          work[k].amax = with_context(prefix + std::string(model::linear_name(kind)), [&] {
            return awq_clip_search(*schemes[k].weight, work[k].w.data(), work[k].out, work[k].in, stats.clip[kind_index(input_leader(kind))], {});
          });
        }
      }
    }
    for (const auto& group : kInputGroups) {
      const auto& s = schemes[kind_index(group[0])];
      if (!s.quantized() || s.format == "fp8" || work[kind_index(group[0])].pqs.empty()) continue;
      std::vector<float> avg(work[kind_index(group[0])].pqs.size(), 0.0f);
      for (const auto kind : group) {
        for (std::size_t j = 0; j < avg.size(); ++j) avg[j] += work[kind_index(kind)].pqs[j];
      }
      for (float& v : avg) v = v / static_cast<float>(group.size());
      round_to_dtype(model_dtype, avg);
      for (const auto kind : group) resmooth(work[kind_index(kind)], avg, model_dtype);
      // AWQ formats fold the shared scale into the norm that feeds the group (SmoothQuant's INT8 keeps it).
      if (s.weight->element != quant::Element::int8 || options.fold_pre_quant_scales) {
        const bool attention = group[0] == LinearKind::q;
        const std::string norm_name = prefix + (attention ? "input_layernorm.weight" : "post_attention_layernorm.weight");
        std::vector<float> norm = (attention ? fp.input_norm : fp.post_attention_norm).to_f32();
        for (std::size_t j = 0; j < norm.size(); ++j) norm[j] = norm[j] * avg[j];
        const DType norm_dtype = checkpoint.tensor(norm_name).dtype();
        round_to_dtype(norm_dtype, norm);
        ql.replaced.emplace_back(norm_name, Tensor::from_f32(norm, {static_cast<std::int64_t>(norm.size())}).to(norm_dtype));
        (attention ? qw.input_norm : qw.post_attention_norm) = Tensor::from_f32(norm, {static_cast<std::int64_t>(norm.size())});
        for (const auto kind : group) {
          work[kind_index(kind)].folded_scale = avg;
          work[kind_index(kind)].pqs.clear();
        }
      }
    }

    // The importance of each Linear's input channels for weights in ggml blocks: the mean square of the
    // input the Linear now sees (scaled by its pre-quantization or folded scale).
    std::array<std::vector<float>, 7> importance;
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      if (!schemes[k].quantized() || schemes[k].weight->grid != quant::IntGrid::ggml) continue;
      importance[k] = stats.mean_square(kind_index(input_leader(kind)));
      const std::vector<float>& p = !work[k].pqs.empty() ? work[k].pqs : work[k].folded_scale;
      if (!importance[k].empty() && !p.empty()) {
        for (std::size_t j = 0; j < p.size(); ++j) importance[k][j] = importance[k][j] * p[j] * p[j];
      }
    }

    // 5. Weight amax (calibrated, or clipped), shared within fused groups; GPTQ on the fixed grid.
    std::array<std::vector<float>, 7> weight_amax;
    std::array<float, 7> second_amax{};
    const auto weight_scales = [&](std::array<LinearWork, 7>& wk) {
      for (const auto kind : model::kAllLinears) {
        const std::size_t k = kind_index(kind);
        const auto& s = schemes[k];
        if (!s.quantized()) continue;
        const std::string tensor_name = prefix + std::string(model::linear_name(kind)) + ".weight";
        weight_amax[k] = !wk[k].amax.empty() ? wk[k].amax
                                             : with_context(tensor_name, [&] { return quant::compute_amax(*s.weight, wk[k].w.data(), wk[k].out, wk[k].in); });
        second_amax[k] = s.weight->fp8_second_stage ? quant::w4a8_second_amax(*s.weight, wk[k].w.data(), wk[k].out, wk[k].in, weight_amax[k]) : 0.0f;
      }
      share_group_amax(schemes, weight_amax, second_amax, wk);
    };
    weight_scales(work);
    if (algo.gptq) {
      for (const auto kind : model::kAllLinears) {
        const std::size_t k = kind_index(kind);
        if (!schemes[k].quantized()) continue;
        std::vector<double> h = gptq_hessian(stats.hessian[kind_index(input_leader(kind))]);
        if (!work[k].pqs.empty() || !work[k].folded_scale.empty()) {
          const std::vector<float>& p = !work[k].pqs.empty() ? work[k].pqs : work[k].folded_scale;
          const auto n = static_cast<std::int64_t>(p.size());
          for (std::int64_t i = 0; i < n; ++i) {
            for (std::int64_t j = 0; j < n; ++j) h[i * n + j] *= static_cast<double>(p[i]) * p[j];
          }
        }
        if (schemes[k].weight->scaling == quant::Scaling::nvfp4) {
          work[k].block_amax = quant::nvfp4_block_amax(*schemes[k].weight, work[k].w.data(), work[k].out, work[k].in);
        }
        const GptqResult g = with_context(prefix + std::string(model::linear_name(kind)), [&] {
          GptqOptions go;
          go.damp = options.gptq_damp;
          go.act_order = options.gptq_act_order;
          go.mask = sparse[k] ? masks[k].data() : nullptr;
          go.ggml_importance = importance[k];
          return gptq_quantize(*schemes[k].weight, work[k].w.data(), work[k].out, work[k].in, weight_amax[k], std::move(h), go,
                               work[k].block_amax);
        });
        work[k].ggml_grid_blocks = g.ggml_grid_blocks;
        lr.gptq_retries += g.damp_retries;
        lr.gptq_fallbacks += g.fell_back ? 1 : 0;
      }
    }

    // 6. Real quantization, and the layer with quantized weights (and activations) for the evaluation passes.
    double weight_error_sum = 0.0;
    int quantized_here = 0;
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      quant::QuantizedLinear qlin;
      qlin.name = prefix + std::string(model::linear_name(kind));
      qlin.scheme = schemes[k];
      qlin.sparsity_mask = std::move(masks[k]);
      if (qlin.scheme.quantized()) {
        const std::int64_t out = work[k].out, in = work[k].in;
        qlin.weight = with_context(qlin.name, [&] {
          return quant::quantize_weight(*qlin.scheme.weight, work[k].w.data(), out, in, weight_amax[k], second_amax[k], work[k].block_amax,
                                        {importance[k], work[k].ggml_grid_blocks});
        });
        std::vector<float> deq = quant::dequantize_weight(*qlin.scheme.weight, *qlin.weight, out, in);
        qlin.weight_error = quant::relative_error(effective_weight(deq, work[k]), original_weights[k]);
        weight_error_sum += qlin.weight_error;
        ++quantized_here;
        qw.linear(kind).weight = Tensor::from_f32(deq, {out, in});
        qlin.input_amax = work[k].input_amax;
        qlin.pre_quant_scale = work[k].pqs;
        qlin.folded_input_scale = work[k].folded_scale;
        qlin.folded_output_scale = work[k].row_scale;
        qlin.weight_amax = weight_amax[k];
        qlin.weight_amax2 = second_amax[k];
        if (options.keep_master_weights) qlin.master_weight = work[k].w;
        qw.linear(kind).input_transform = input_transform(qlin.scheme, qlin.input_amax, qlin.pre_quant_scale);
        original_weights[k].clear();
        original_weights[k].shrink_to_fit();
      }
      ql.linears.push_back(std::move(qlin));
    }
    if (kv) {
      ql.key_amax = stats.key_max;
      ql.value_amax = stats.value_max;
      auto kq = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv->spec, {stats.key_max}, {}});
      auto vq = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{kv->spec, {stats.value_max}, {}});
      qw.key_transform = [kq](float* x, std::int64_t rows, std::int64_t cols) { kq->apply(x, rows, cols); };
      qw.value_transform = [vq](float* x, std::int64_t rows, std::int64_t cols) { vq->apply(x, rows, cols); };
    }

    // 7. The quantized layer on the same inputs: its output error, and the next inputs when asked.
    lr.layer = l;
    lr.formats = layer_formats(ql.linears) + (lr.sparse_linears > 0 ? " 2:4" : "");
    lr.weight_error = quantized_here > 0 ? weight_error_sum / quantized_here : lr.sparse_weight_error;
    if (calibrating) {
      if (algo.any()) {
        // Round-to-nearest of the same layer, for the before/after column of the report.
        model::LayerWeights rtn = fp;
        std::array<LinearWork, 7> plain;
        for (const auto kind : model::kAllLinears) {
          const std::size_t k = kind_index(kind);
          if (!schemes[k].quantized()) continue;
          plain[k].out = work[k].out;
          plain[k].in = work[k].in;
          plain[k].w = sparse[k] ? pruned[k] : fp.linear(kind).weight.to_f32();
          plain[k].input_amax = input_amax_rtn[k];
        }
        weight_scales(plain);
        const auto importance_rtn = [&](LinearKind kind) {
          return schemes[kind_index(kind)].weight->grid == quant::IntGrid::ggml ? stats.mean_square(kind_index(input_leader(kind))) : std::vector<float>{};
        };
        for (const auto kind : model::kAllLinears) {
          const std::size_t k = kind_index(kind);
          if (!schemes[k].quantized()) continue;
          const quant::QuantizedWeight q = quant::quantize_weight(*schemes[k].weight, plain[k].w.data(), plain[k].out, plain[k].in, weight_amax[k],
                                                                  second_amax[k], {}, {importance_rtn(kind), {}});
          rtn.linear(kind).weight = Tensor::from_f32(quant::dequantize_weight(*schemes[k].weight, q, plain[k].out, plain[k].in), {plain[k].out, plain[k].in});
          rtn.linear(kind).input_transform = input_transform(schemes[k], plain[k].input_amax, {});
        }
        rtn.key_transform = qw.key_transform;
        rtn.value_transform = qw.value_transform;
        scratch = saved;
        lr.output_error_rtn = layer_output_error(c, inv_freq, l, rtn, scratch, hidden, batches, ws);
      }
      lr.output_error = layer_output_error(c, inv_freq, l, qw, saved, hidden, batches, ws);
      if (propagate) hidden.swap(saved);
    }
    report.quantized_linears += quantized_here;
    report.sparse_linears += lr.sparse_linears;
    lr.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - layer_start).count();
    report.layers.push_back(lr);
    sink(std::move(ql));
    // Done with this layer's source weights: let their pages go, so resident memory does not grow with depth.
    for (const auto kind : model::kAllLinears) fp.linear(kind).weight.release_pages();
    progress.advance();
  }
  progress.finish();
  if (head_scheme.quantized()) {
    report.head = quantize_head(checkpoint, recipe, head_scheme, algo, options, calibrating ? &hidden : nullptr, batches, head_sink);
    report.quantized_linears += 1;
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  return report;
}

}  // namespace mopt::algo
