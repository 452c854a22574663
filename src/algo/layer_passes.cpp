#include "algo/layer_passes.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <memory>

#include "core/convert.h"
#include "core/error.h"
#include "quant/act_quant.h"
#include "quant/fake_quant.h"
#include "quant/formats.h"

namespace mopt::algo {

using model::LinearKind;

const std::array<std::vector<LinearKind>, 2> kInputGroups = {std::vector<LinearKind>{LinearKind::q, LinearKind::k, LinearKind::v},
                                                             std::vector<LinearKind>{LinearKind::gate, LinearKind::up}};

LinearKind input_leader(LinearKind kind) {
  switch (kind) {
    case LinearKind::k:
    case LinearKind::v: return LinearKind::q;
    case LinearKind::up: return LinearKind::gate;
    default: return kind;
  }
}

bool static_input(const quant::LinearScheme& s) { return s.input && s.input->needs_amax(); }

std::vector<AlgorithmPass> algorithm_passes(const std::string& name) {
  using P = AlgorithmPass;
  if (name == "max") return {};
  if (name == "smoothquant") return {P::smoothquant};
  if (name == "awq_lite") return {P::awq_lite};
  if (name == "awq_clip") return {P::awq_clip};
  if (name == "awq_full") return {P::awq_lite, P::awq_clip};
  if (name == "gptq") return {P::gptq};
  if (name == "awq_lite+gptq") return {P::awq_lite, P::gptq};
  fail("unknown algorithm '{}'", name);
}

bool has_pass(const std::vector<AlgorithmPass>& passes, AlgorithmPass pass) {
  return std::find(passes.begin(), passes.end(), pass) != passes.end();
}

void LayerStats::linear_input(std::int64_t layer, LinearKind kind, const float* x, std::int64_t rows, std::int64_t cols) {
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

std::vector<float> LayerStats::mean_square(std::size_t k) const {
  std::vector<float> m;
  if (square_rows[k] == 0) return m;
  for (const double v : square_sum[k]) m.push_back(static_cast<float>(v / static_cast<double>(square_rows[k])));
  return m;
}

void LayerStats::key_value(std::int64_t layer, const float* k, const float* v, std::int64_t rows, std::int64_t kv_dim) {
  for (std::int64_t i = 0; i < rows * kv_dim; ++i) {
    if (!std::isfinite(k[i]) || !std::isfinite(v[i])) fail("layer {}: non-finite key or value after RoPE (row {})", layer, i / kv_dim);
    key_max = std::max(key_max, std::fabs(k[i]));
    value_max = std::max(value_max, std::fabs(v[i]));
  }
}

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

namespace {

// Whether a fused group of Linears in this format shares its scales (the format table's row).
bool shares_scales(const quant::LinearScheme& s) {
  const quant::FormatRow* row = quant::find_format(s.format);
  return row == nullptr || row->fused_groups_share_scales;
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
    if (!s.quantized() || !shares_scales(s)) continue;
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

}  // namespace

std::optional<quant::ActivationQuantizer> input_transform(const quant::LinearScheme& s, const std::vector<float>& input_amax, const std::vector<float>& pqs) {
  if (!s.input && pqs.empty()) return std::nullopt;
  return quant::ActivationQuantizer{s.input, input_amax, pqs};
}

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


PtqContext make_ptq_context(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const PtqOptions& options) {
  const bool sparsify = !recipe.sparsity.empty();
  return PtqContext{checkpoint,
                    recipe,
                    options,
                    algorithm_passes(recipe.effective_algorithm()),
                    sparsify,
                    sparsify ? parse_sparse_algo(recipe.sparse_algo) : SparseAlgo::magnitude,
                    recipe.kv_cache ? std::optional(quant::kv_scheme(*recipe.kv_cache)) : std::nullopt,
                    checkpoint.config().dtype};
}

bool LayerState::any_sparse() const { return std::find(sparse.begin(), sparse.end(), true) != sparse.end(); }

LayerState plan_layer(const PtqContext& ctx, std::int64_t index) {
  const quant::Recipe& recipe = ctx.recipe;
  LayerState s;
  s.index = index;
  s.prefix = fmt::format("model.layers.{}.", index);
  s.fp = model::load_layer(ctx.checkpoint, index);
  for (const auto kind : model::kAllLinears) {
    auto& sc = s.schemes[kind_index(kind)];
    sc = recipe.scheme_for(s.linear_name(kind));
    s.want_histogram[kind_index(kind)] = static_input(sc) && recipe.calibrator != quant::CalibMethod::max && sc.input->scaling == quant::Scaling::per_tensor;
    if (sc.quantized()) with_context(s.linear_name(kind), [&] { quant::check_algorithm_supports(recipe.effective_algorithm(), sc); });
  }
  // Linears that share an input (q/k/v, gate/up) become one fused Linear in the engines: they must share a format.
  for (const auto& group : kInputGroups) {
    for (const auto kind : group) {
      if (s.schemes[kind_index(kind)].format != s.schemes[kind_index(group[0])].format) {
        fail("layer {}: {} and {} share an input and must share a format (got '{}' and '{}')", index, model::linear_name(group[0]),
             model::linear_name(kind), s.schemes[kind_index(group[0])].format, s.schemes[kind_index(kind)].format);
      }
    }
  }
  // Which Linears are pruned to 2:4 (the recipe's, where the algorithm's shape rules allow).
  for (const auto kind : model::kAllLinears) {
    const Tensor& w = s.fp.linear(kind).weight;
    s.sparse[kind_index(kind)] = ctx.sparsify && recipe.sparse_for(s.linear_name(kind)) && sparsity_eligible(ctx.sparse_algo, w.dim(0), w.dim(1));
  }
  s.qw = s.fp;
  s.ql.index = index;
  return s;
}

StatsNeeds stats_needs(const PtqContext& ctx, const LayerState& s) {
  const auto& p = ctx.passes;
  StatsNeeds needs;
  needs.channel_max = has_pass(p, AlgorithmPass::smoothquant) || has_pass(p, AlgorithmPass::awq_lite);
  needs.mean_abs = has_pass(p, AlgorithmPass::awq_lite);
  needs.clip_samples = has_pass(p, AlgorithmPass::awq_clip);
  needs.hessian = has_pass(p, AlgorithmPass::gptq) || (ctx.sparsify && sparse_algo_needs_calibration(ctx.sparse_algo) && s.any_sparse());
  needs.mean_square = std::any_of(s.schemes.begin(), s.schemes.end(), [](const quant::LinearScheme& sc) {
    return sc.quantized() && sc.weight->grid == quant::IntGrid::ggml;
  });
  return needs;
}

void prune(const PtqContext& ctx, LayerState& s) {
  LayerReport& lr = s.report;
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.sparse[k]) continue;
    const std::string name = s.linear_name(kind);
    const Tensor& wt = s.fp.linear(kind).weight;
    const std::int64_t out = wt.dim(0), in = wt.dim(1);
    std::vector<float> w = wt.to_f32();
    const std::vector<float> original = w;
    if (ctx.sparse_algo == SparseAlgo::magnitude) {
      s.masks[k] = magnitude_24_mask(w.data(), out, in);
      apply_mask(w.data(), s.masks[k].data(), out * in);
    } else {
      SparseGptOptions so;
      so.update_weights = ctx.sparse_algo == SparseAlgo::sparsegpt;
      const SparseGptResult r = with_context(name, [&] {
        return sparsegpt_prune(w.data(), out, in, gptq_hessian(s.stats->hessian[kind_index(input_leader(kind))]), so);
      });
      s.masks[k] = r.mask;
      lr.sparse_retries += r.damp_retries;
      lr.sparse_fallbacks += r.fell_back ? 1 : 0;
      round_to_dtype(ctx.model_dtype, w);
      apply_mask(w.data(), s.masks[k].data(), out * in);
    }
    lr.sparse_weight_error += quant::relative_error(w, original);
    ++lr.sparse_linears;
    s.qw.linear(kind).weight = Tensor::from_f32(w, {out, in});
    if (!s.schemes[k].quantized()) {
      const DType dtype = wt.dtype();
      s.ql.replaced.emplace_back(name + ".weight", Tensor::from_f32(w, {out, in}).to(dtype));
    }
    s.pruned[k] = std::move(w);
  }
  if (lr.sparse_linears > 0) lr.sparse_weight_error /= lr.sparse_linears;
}

void start_work(const PtqContext& ctx, LayerState& s) {
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.schemes[k].quantized()) continue;
    const Tensor& w = s.fp.linear(kind).weight;
    LinearWork& wk = s.work[k];
    wk.out = w.dim(0);
    wk.in = w.dim(1);
    wk.w = s.sparse[k] ? s.pruned[k] : w.to_f32();
    if (static_input(s.schemes[k])) {
      wk.input_amax = {s.want_histogram[k] ? s.stats->histograms[k].compute(ctx.recipe.calibrator, s.schemes[k].input->element, ctx.recipe.percentile)
                                           : s.stats->input_max[k]};
    }
    s.original_weights[k] = s.sparse[k] ? s.fp.linear(kind).weight.to_f32() : wk.w;
  }
  for (std::size_t k = 0; k < 7; ++k) s.input_amax_rtn[k] = s.work[k].input_amax;
}

void smoothquant_pass(const PtqContext& ctx, LayerState& s) {
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.schemes[k].quantized()) continue;
    LinearWork& wk = s.work[k];
    const auto& a = s.stats->channel_max[kind_index(input_leader(kind))];
    const std::vector<float> scale = with_context(s.linear_name(kind), [&] { return smoothquant_scale(a, wk.w.data(), wk.out, wk.in, 1.0f); });
    apply_pre_quant_scale(wk, scale, a, static_input(s.schemes[k]), ctx.model_dtype);
  }
}

void awq_lite_pass(const PtqContext& ctx, LayerState& s) {
  std::array<std::unique_ptr<AwqLiteSearch>, 7> searches;
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.schemes[k].quantized()) continue;
    const std::size_t lead = kind_index(input_leader(kind));
    LinearWork& wk = s.work[k];
    searches[k] = std::make_unique<AwqLiteSearch>(*s.schemes[k].weight, wk.w.data(), wk.out, wk.in, s.stats->mean_abs[lead].mean(),
                                                  s.stats->batch_gram[lead].full(), ctx.model_dtype, s.stats->mean_square(lead));
  }
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!searches[k]) continue;
    const float alpha = searches[k]->best_alpha();
    std::vector<float> scale = searches[k]->scale(alpha);
    for (float& v : scale) v = 1.0f / v;
    apply_pre_quant_scale(s.work[k], scale, s.stats->channel_max[kind_index(input_leader(kind))], static_input(s.schemes[k]), ctx.model_dtype);
    s.work[k].alpha = alpha;
    s.report.alphas.emplace_back(std::string(model::linear_name(kind)), alpha);
  }
}

namespace {

void clip_search(LayerState& s, LinearKind kind, const std::vector<float>& pqs) {
  const std::size_t k = kind_index(kind);
  LinearWork& wk = s.work[k];
  wk.amax = with_context(s.linear_name(kind), [&] {
    return awq_clip_search(*s.schemes[k].weight, wk.w.data(), wk.out, wk.in, s.stats->clip[kind_index(input_leader(kind))], pqs);
  });
}

}  // namespace

void awq_clip_pass(const PtqContext&, LayerState& s) {
  for (const auto kind : model::kAllLinears) {
    if (s.schemes[kind_index(kind)].quantized()) clip_search(s, kind, s.work[kind_index(kind)].pqs);
  }
}

void fold_into_rows(const PtqContext& ctx, LayerState& s) {
  if (!folds_scales_across_linears(s.schemes[kind_index(LinearKind::q)], ctx.options)) return;
  auto& work = s.work;
  fold_scale_into_rows(work[kind_index(LinearKind::o)], work[kind_index(LinearKind::v)], s.qw.v, s.prefix + "self_attn.v_proj.bias", s.ql, ctx.model_dtype);
  fold_scale_into_rows(work[kind_index(LinearKind::down)], work[kind_index(LinearKind::up)], s.qw.up, s.prefix + "mlp.up_proj.bias", s.ql, ctx.model_dtype);
}

void drop_unfoldable_scales(const PtqContext& ctx, LayerState& s) {
  // A scale that could not be folded (o_proj under GQA, or when v_proj is not quantized) is dropped:
  // that Linear is quantized unsmoothed, with its own clip search when the algorithm has one.
  for (const auto kind : {LinearKind::o, LinearKind::down}) {
    const std::size_t k = kind_index(kind);
    LinearWork& wk = s.work[k];
    if (wk.pqs.empty()) continue;
    wk.w = s.sparse[k] ? s.pruned[k] : s.original_weights[k];
    wk.pqs.clear();
    wk.amax.clear();
    wk.input_amax = s.input_amax_rtn[k];
    if (has_pass(ctx.passes, AlgorithmPass::awq_clip)) clip_search(s, kind, {});
  }
}

void share_input_scales(const PtqContext& ctx, LayerState& s) {
  const DType model_dtype = ctx.model_dtype;
  auto& work = s.work;
  for (const auto& group : kInputGroups) {
    const auto& sc = s.schemes[kind_index(group[0])];
    if (!sc.quantized() || !shares_scales(sc) || work[kind_index(group[0])].pqs.empty()) continue;
    std::vector<float> avg(work[kind_index(group[0])].pqs.size(), 0.0f);
    for (const auto kind : group) {
      for (std::size_t j = 0; j < avg.size(); ++j) avg[j] += work[kind_index(kind)].pqs[j];
    }
    for (float& v : avg) v = v / static_cast<float>(group.size());
    round_to_dtype(model_dtype, avg);
    for (const auto kind : group) resmooth(work[kind_index(kind)], avg, model_dtype);
    // AWQ formats fold the shared scale into the norm that feeds the group (SmoothQuant's INT8 keeps it).
    if (sc.weight->element != quant::Element::int8 || ctx.options.fold_pre_quant_scales) {
      const bool attention = group[0] == LinearKind::q;
      const std::string norm_name = s.prefix + (attention ? "input_layernorm.weight" : "post_attention_layernorm.weight");
      std::vector<float> norm = (attention ? s.fp.input_norm : s.fp.post_attention_norm).to_f32();
      for (std::size_t j = 0; j < norm.size(); ++j) norm[j] = norm[j] * avg[j];
      const DType norm_dtype = ctx.checkpoint.tensor(norm_name).dtype();
      round_to_dtype(norm_dtype, norm);
      s.ql.replaced.emplace_back(norm_name, Tensor::from_f32(norm, {static_cast<std::int64_t>(norm.size())}).to(norm_dtype));
      (attention ? s.qw.input_norm : s.qw.post_attention_norm) = Tensor::from_f32(norm, {static_cast<std::int64_t>(norm.size())});
      for (const auto kind : group) {
        work[kind_index(kind)].folded_scale = avg;
        work[kind_index(kind)].pqs.clear();
      }
    }
  }
}

void ggml_importance(LayerState& s) {
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.schemes[k].quantized() || s.schemes[k].weight->grid != quant::IntGrid::ggml) continue;
    s.importance[k] = s.stats->mean_square(kind_index(input_leader(kind)));
    const std::vector<float>& p = !s.work[k].pqs.empty() ? s.work[k].pqs : s.work[k].folded_scale;
    if (!s.importance[k].empty() && !p.empty()) {
      for (std::size_t j = 0; j < p.size(); ++j) s.importance[k][j] = s.importance[k][j] * p[j] * p[j];
    }
  }
}

void fold_scales(const PtqContext& ctx, LayerState& s) {
  fold_into_rows(ctx, s);
  if (ctx.options.fold_pre_quant_scales) drop_unfoldable_scales(ctx, s);
  share_input_scales(ctx, s);
  ggml_importance(s);
}

void weight_scales(LayerState& s, std::array<LinearWork, 7>& wk) {
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    const auto& sc = s.schemes[k];
    if (!sc.quantized()) continue;
    const std::string tensor_name = s.linear_name(kind) + ".weight";
    s.weight_amax[k] = !wk[k].amax.empty() ? wk[k].amax
                                           : with_context(tensor_name, [&] { return quant::compute_amax(*sc.weight, wk[k].w.data(), wk[k].out, wk[k].in); });
    s.second_amax[k] = sc.weight->fp8_second_stage ? quant::w4a8_second_amax(*sc.weight, wk[k].w.data(), wk[k].out, wk[k].in, s.weight_amax[k]) : 0.0f;
  }
  share_group_amax(s.schemes, s.weight_amax, s.second_amax, wk);
}

void gptq_pass(const PtqContext& ctx, LayerState& s) {
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.schemes[k].quantized()) continue;
    LinearWork& wk = s.work[k];
    std::vector<double> h = gptq_hessian(s.stats->hessian[kind_index(input_leader(kind))]);
    if (!wk.pqs.empty() || !wk.folded_scale.empty()) {
      const std::vector<float>& p = !wk.pqs.empty() ? wk.pqs : wk.folded_scale;
      const auto n = static_cast<std::int64_t>(p.size());
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t j = 0; j < n; ++j) h[i * n + j] *= static_cast<double>(p[i]) * p[j];
      }
    }
    if (s.schemes[k].weight->scaling == quant::Scaling::nvfp4) wk.block_amax = quant::nvfp4_block_amax(*s.schemes[k].weight, wk.w.data(), wk.out, wk.in);
    const GptqResult g = with_context(s.linear_name(kind), [&] {
      GptqOptions go;
      go.damp = ctx.options.gptq_damp;
      go.act_order = ctx.options.gptq_act_order;
      go.mask = s.sparse[k] ? s.masks[k].data() : nullptr;
      go.ggml_importance = s.importance[k];
      return gptq_quantize(*s.schemes[k].weight, wk.w.data(), wk.out, wk.in, s.weight_amax[k], std::move(h), go, wk.block_amax);
    });
    wk.ggml_grid_blocks = g.ggml_grid_blocks;
    s.report.gptq_retries += g.damp_retries;
    s.report.gptq_fallbacks += g.fell_back ? 1 : 0;
  }
}

void quantize(const PtqContext& ctx, LayerState& s) {
  double weight_error_sum = 0.0;
  int quantized_here = 0;
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    LinearWork& wk = s.work[k];
    quant::QuantizedLinear qlin;
    qlin.name = s.linear_name(kind);
    qlin.scheme = s.schemes[k];
    qlin.sparsity_mask = std::move(s.masks[k]);
    if (qlin.scheme.quantized()) {
      const std::int64_t out = wk.out, in = wk.in;
      qlin.weight = with_context(qlin.name, [&] {
        return quant::quantize_weight(*qlin.scheme.weight, wk.w.data(), out, in, s.weight_amax[k], s.second_amax[k], wk.block_amax,
                                      {s.importance[k], wk.ggml_grid_blocks});
      });
      std::vector<float> deq = quant::dequantize_weight(*qlin.scheme.weight, *qlin.weight, out, in);
      qlin.weight_error = quant::relative_error(effective_weight(deq, wk), s.original_weights[k]);
      weight_error_sum += qlin.weight_error;
      ++quantized_here;
      s.qw.linear(kind).weight = Tensor::from_f32(deq, {out, in});
      qlin.input_amax = wk.input_amax;
      qlin.pre_quant_scale = wk.pqs;
      qlin.folded_input_scale = wk.folded_scale;
      qlin.folded_output_scale = wk.row_scale;
      qlin.weight_amax = s.weight_amax[k];
      qlin.weight_amax2 = s.second_amax[k];
      if (ctx.options.keep_master_weights) qlin.master_weight = wk.w;
      s.qw.linear(kind).input_transform = input_transform(qlin.scheme, qlin.input_amax, qlin.pre_quant_scale);
      s.original_weights[k].clear();
      s.original_weights[k].shrink_to_fit();
    }
    s.ql.linears.push_back(std::move(qlin));
  }
  if (ctx.kv) {
    s.ql.key_amax = s.stats->key_max;
    s.ql.value_amax = s.stats->value_max;
    s.qw.key_transform = quant::ActivationQuantizer{ctx.kv->spec, {s.stats->key_max}, {}};
    s.qw.value_transform = quant::ActivationQuantizer{ctx.kv->spec, {s.stats->value_max}, {}};
  }
  s.report.layer = s.index;
  s.report.formats = layer_formats(s.ql.linears) + (s.report.sparse_linears > 0 ? " 2:4" : "");
  s.report.weight_error = quantized_here > 0 ? weight_error_sum / quantized_here : s.report.sparse_weight_error;
  s.quantized_linears = quantized_here;
}

model::LayerWeights round_to_nearest_layer(LayerState& s) {
  model::LayerWeights rtn = s.fp;
  std::array<LinearWork, 7> plain;
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    if (!s.schemes[k].quantized()) continue;
    plain[k].out = s.work[k].out;
    plain[k].in = s.work[k].in;
    plain[k].w = s.sparse[k] ? s.pruned[k] : s.fp.linear(kind).weight.to_f32();
    plain[k].input_amax = s.input_amax_rtn[k];
  }
  weight_scales(s, plain);
  const auto importance_rtn = [&](LinearKind kind) {
    return s.schemes[kind_index(kind)].weight->grid == quant::IntGrid::ggml ? s.stats->mean_square(kind_index(input_leader(kind))) : std::vector<float>{};
  };
  for (const auto kind : model::kAllLinears) {
    const std::size_t k = kind_index(kind);
    const auto& sc = s.schemes[k];
    if (!sc.quantized()) continue;
    const quant::QuantizedWeight q = quant::quantize_weight(*sc.weight, plain[k].w.data(), plain[k].out, plain[k].in, s.weight_amax[k],
                                                            s.second_amax[k], {}, {importance_rtn(kind), {}});
    rtn.linear(kind).weight = Tensor::from_f32(quant::dequantize_weight(*sc.weight, q, plain[k].out, plain[k].in), {plain[k].out, plain[k].in});
    rtn.linear(kind).input_transform = input_transform(sc, plain[k].input_amax, {});
  }
  rtn.key_transform = s.qw.key_transform;
  rtn.value_transform = s.qw.value_transform;
  return rtn;
}

void run_layer_passes(const PtqContext& ctx, LayerState& s, const std::function<void(LayerState&, LayerStats&)>& observe) {
  s.stats = std::make_unique<LayerStats>(s.want_histogram, stats_needs(ctx, s));
  if (observe) observe(s, *s.stats);
  // Pruning first: the quantizers are calibrated on the pruned weights, as the reference's
  // sparsify-then-quantize does.
  prune(ctx, s);
  start_work(ctx, s);
  for (const AlgorithmPass pass : ctx.passes) {
    switch (pass) {
      case AlgorithmPass::smoothquant: smoothquant_pass(ctx, s); break;
      case AlgorithmPass::awq_lite: awq_lite_pass(ctx, s); break;
      case AlgorithmPass::awq_clip: awq_clip_pass(ctx, s); break;
      case AlgorithmPass::gptq: break;  // after the scales are fixed, below
    }
  }
  fold_scales(ctx, s);
  weight_scales(s, s.work);
  if (has_pass(ctx.passes, AlgorithmPass::gptq)) gptq_pass(ctx, s);
  quantize(ctx, s);
}

}  // namespace mopt::algo
