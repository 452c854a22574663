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
#include "quant/formats.h"
#include "algo/gptq.h"
#include "algo/layer_passes.h"
#include "algo/smoothing.h"
#include "algo/sparsity.h"
#include <memory>

namespace mopt::algo {

namespace {

using model::LinearKind;

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

// The head's weight amax: an algorithm's (clip), else calibrated.
std::vector<float> head_weight_amax(const quant::LinearScheme& scheme, const LinearWork& w) {
  return !w.amax.empty() ? w.amax : with_context("lm_head.weight", [&] { return quant::compute_amax(*scheme.weight, w.w.data(), w.out, w.in); });
}

// The head's logits on up to 128 of its `rows` calibration inputs (`normed`, through the norm as folded)
// against the unquantized head's: with the quantized weight `deq` and, when `input_amax_rtn` is given,
// with round-to-nearest's (the "before" of an algorithm).
std::pair<double, double> head_logits_errors(const quant::LinearScheme& scheme, const LinearWork& wk, const std::vector<float>& original,
                                             const std::vector<float>& normed, std::int64_t rows, std::int64_t H, const std::vector<float>& deq,
                                             const std::vector<float>& input_amax, const std::vector<float>* input_amax_rtn) {
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
    if (const auto t = input_transform(scheme, in_amax, {})) t->apply(xq.data(), n, H);
    kernels::gemm_f32_strided(xq.data(), n, H, w_deq.data(), wk.out, got.data(), wk.out, false);
    return quant::relative_error(got, ref);
  };
  const double error = logits_error(normed.data(), deq, input_amax);
  double error_rtn = -1.0;
  if (input_amax_rtn != nullptr) {
    LinearWork plain;
    plain.out = wk.out;
    plain.in = wk.in;
    plain.w = original;
    const std::vector<float> a = head_weight_amax(scheme, plain);
    const float s2 = scheme.weight->fp8_second_stage ? quant::w4a8_second_amax(*scheme.weight, plain.w.data(), plain.out, plain.in, a) : 0.0f;
    const quant::QuantizedWeight q = quant::quantize_weight(*scheme.weight, plain.w.data(), plain.out, plain.in, a, s2, {});
    error_rtn = logits_error(x.data(), quant::dequantize_weight(*scheme.weight, q, plain.out, plain.in), *input_amax_rtn);
  }
  return {error, error_rtn};
}

// The lm_head on the final norm of `hidden` (the last layer's outputs on the calibration rows, in
// `batches`; null without calibration), quantized with the recipe's algorithm as a decoder Linear is:
// static input amax; SmoothQuant's or AWQ-lite's input scale, folded into the final norm (it feeds only
// the lm_head, tied or not); AWQ's clip search; GPTQ on the Hessian of the normed inputs.
LayerReport quantize_head(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const quant::LinearScheme& scheme,
                          const std::vector<AlgorithmPass>& passes, const PtqOptions& options, const std::vector<float>* hidden, const std::vector<Batch>& batches, const QuantizedLayerSink& sink) {
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
  const bool use_algo = !passes.empty() && hidden != nullptr;
  const bool smoothquant = has_pass(passes, AlgorithmPass::smoothquant), awq_lite = has_pass(passes, AlgorithmPass::awq_lite),
             awq_clip = has_pass(passes, AlgorithmPass::awq_clip), gptq = has_pass(passes, AlgorithmPass::gptq);

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
  needs.mean_abs = use_algo && awq_lite;
  needs.clip_samples = use_algo && awq_clip;
  needs.hessian = use_algo && gptq;
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
  if (smoothquant && static_in && scheme.input->element == quant::Element::int8 && hidden != nullptr) {
    const std::vector<float> s = with_context("lm_head", [&] { return smoothquant_scale(stats.channel_max[slot], wk.w.data(), wk.out, wk.in, 1.0f); });
    apply_pre_quant_scale(wk, s, stats.channel_max[slot], true, model_dtype);
  }
  if (use_algo && awq_lite) {
    const AwqLiteSearch search(*scheme.weight, wk.w.data(), wk.out, wk.in, stats.mean_abs[slot].mean(), stats.batch_gram[slot].full(), model_dtype);
    wk.alpha = search.best_alpha();
    std::vector<float> s = search.scale(wk.alpha);
    for (float& v : s) v = 1.0f / v;
    apply_pre_quant_scale(wk, s, stats.channel_max[slot], static_in, model_dtype);
  }
  if (use_algo && awq_clip) {
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
  const std::vector<float> amax = head_weight_amax(scheme, wk);
  const float second = scheme.weight->fp8_second_stage ? quant::w4a8_second_amax(*scheme.weight, wk.w.data(), wk.out, wk.in, amax) : 0.0f;
  LayerReport lr;
  if (use_algo && gptq) {
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
  if (rows > 0) {
    const auto [error, error_rtn] = head_logits_errors(scheme, wk, original, normed, rows, H, deq, qlin.input_amax, use_algo ? &input_amax_rtn : nullptr);
    lr.output_error = error;
    if (use_algo) lr.output_error_rtn = error_rtn;
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
  const quant::FormatRow* row = quant::find_format(scheme.format);
  return (row != nullptr && row->folds_scales_into_rows) || options.fold_pre_quant_scales;
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

namespace {

// Every Linear's shape against its layout, before any calibration work.
void check_shapes(const io::Checkpoint& checkpoint, const quant::Recipe& recipe) {
  const io::ModelConfig& c = checkpoint.config();
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
}

// The embeddings of every calibration token, [tokens, hidden].
std::vector<float> embed_calibration(const io::Checkpoint& checkpoint, const CalibrationSet& calib) {
  const std::int64_t H = checkpoint.config().hidden_size;
  std::vector<float> hidden(static_cast<std::size_t>(calib.tokens() * H));
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
  return hidden;
}

// The calibration activations while the layers stream through: `hidden` holds the current layer's
// inputs; `saved` a copy the layer's forward overwrote, for the measurement runs.
struct Activations {
  std::vector<float> hidden, saved, scratch;
  std::vector<Batch> batches;
  std::vector<float> inv_freq;
  model::Workspace ws;
};

// observe: the original layer over the calibration activations (they become its outputs).
void observe_layer(const io::ModelConfig& c, LayerState& s, LayerStats& stats, Activations& act) {
  act.saved = act.hidden;
  for (const auto& b : act.batches) {
    model::decoder_layer_forward(c, act.inv_freq, s.index, s.fp, act.hidden.data() + b.row0 * c.hidden_size, b.rows, b.spans, nullptr, act.ws, &stats);
  }
}

// measure: the quantized layer (and, after an algorithm, round-to-nearest's) on the same inputs
// against the original's outputs; with `propagate` the quantized outputs become the next inputs.
void measure_layer(const PtqContext& ctx, LayerState& s, Activations& act) {
  const io::ModelConfig& c = ctx.checkpoint.config();
  if (!ctx.passes.empty()) {
    const model::LayerWeights rtn = round_to_nearest_layer(s);
    act.scratch = act.saved;
    s.report.output_error_rtn = layer_output_error(c, act.inv_freq, s.index, rtn, act.scratch, act.hidden, act.batches, act.ws);
  }
  s.report.output_error = layer_output_error(c, act.inv_freq, s.index, s.qw, act.saved, act.hidden, act.batches, act.ws);
  if (ctx.options.propagate_quantized) act.hidden.swap(act.saved);
}

}  // namespace

PtqReport quantize_checkpoint(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const CalibrationSet& calib,
                              const PtqOptions& options, const QuantizedLayerSink& sink, const QuantizedLayerSink& head_sink) {
  recipe.validate();
  const quant::LinearScheme head_scheme = recipe.scheme_for("lm_head");
  if (head_scheme.quantized() && !head_sink) fail("lm_head: this export keeps the lm_head in 16 bits (only the modelopt export holds a quantized lm_head)");
  const io::ModelConfig& c = checkpoint.config();
  const auto start_time = std::chrono::steady_clock::now();
  const bool calibrating = !calib.sequences.empty();
  const PtqContext ctx = make_ptq_context(checkpoint, recipe, options);
  const bool any_algorithm = !ctx.passes.empty();
  if (!calibrating && needs_calibration(c, recipe)) {
    if (ctx.sparsify && sparse_algo_needs_calibration(ctx.sparse_algo) && !any_algorithm) {
      fail("sparsity algorithm {} needs calibration text (--calib)", recipe.sparse_algo);
    }
    fail("{}{} needs calibration text (--calib)", any_algorithm ? "algorithm " + recipe.effective_algorithm() : "format " + recipe.format,
         !any_algorithm && recipe.kv_cache ? " with a KV-cache format" : "");
  }
  check_shapes(checkpoint, recipe);
  // As the reference by default (its GPTQ too: layerwise.enable is off), every layer is calibrated on the
  // unquantized model's activations; `propagate_quantized` gives GPTQ's original sequential procedure.
  Activations act;
  act.hidden = embed_calibration(checkpoint, calib);
  act.batches = make_batches(calib, std::max<std::int64_t>(1, options.batch_sequences));
  act.inv_freq = model::rope_inv_freq(c);

  PtqReport report;
  report.algorithm = recipe.effective_algorithm();
  report.calib_sequences = static_cast<std::int64_t>(calib.sequences.size());
  report.calib_tokens = calib.tokens();
  Progress progress("quantize", static_cast<std::uint64_t>(c.num_layers), "layers");
  for (std::int64_t l = 0; l < c.num_layers; ++l) {
    const auto layer_start = std::chrono::steady_clock::now();
    LayerState s = plan_layer(ctx, l);
    run_layer_passes(ctx, s, [&](LayerState& st, LayerStats& stats) {
      if (calibrating) observe_layer(c, st, stats, act);
    });
    if (calibrating) measure_layer(ctx, s, act);
    report.quantized_linears += s.quantized_linears;
    report.sparse_linears += s.report.sparse_linears;
    s.report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - layer_start).count();
    report.layers.push_back(s.report);
    sink(std::move(s.ql));
    // Done with this layer's source weights: let their pages go, so resident memory does not grow with depth.
    for (const auto kind : model::kAllLinears) s.fp.linear(kind).weight.release_pages();
    progress.advance();
  }
  progress.finish();
  if (head_scheme.quantized()) {
    report.head = quantize_head(checkpoint, recipe, head_scheme, ctx.passes, options, calibrating ? &act.hidden : nullptr, act.batches, head_sink);
    report.quantized_linears += 1;
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  return report;
}

}  // namespace mopt::algo
