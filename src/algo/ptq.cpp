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
#include "core/progress.h"
#include "model/llama.h"
#include "quant/act_quant.h"
#include "quant/calibrator.h"
#include "quant/fake_quant.h"

namespace mopt::algo {

namespace {

using model::LinearKind;

std::size_t kind_index(LinearKind kind) { return static_cast<std::size_t>(kind); }

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// What one layer's calibration run saw.
class LayerStats : public model::LayerObserver {
 public:
  LayerStats(std::array<bool, 7> want_histogram) : want_histogram_(want_histogram) {}

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

 private:
  std::array<bool, 7> want_histogram_;
};

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
  std::uint64_t state = seed;
  for (std::size_t i = order.size() - 1; i > 0; --i) {
    const std::size_t j = static_cast<std::size_t>(splitmix64(state) % (i + 1));
    std::swap(order[i], order[j]);
  }
  order.resize(static_cast<std::size_t>(n));
  std::sort(order.begin(), order.end());  // keep the text's order among the chosen pieces
  for (std::size_t i : order) set.sequences.push_back(std::move(pool[i]));
  return set;
}

bool needs_calibration(const io::ModelConfig& config, const quant::Recipe& recipe) {
  if (recipe.kv_cache) return true;
  for (std::int64_t l = 0; l < config.num_layers; ++l) {
    for (const auto kind : model::kAllLinears) {
      if (static_input(recipe.scheme_for(fmt::format("model.layers.{}.{}", l, model::linear_name(kind))))) return true;
    }
  }
  return false;
}

PtqReport quantize_checkpoint(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const CalibrationSet& calib,
                              const PtqOptions& options, const LayerSink& sink) {
  recipe.validate();
  const io::ModelConfig& c = checkpoint.config();
  const auto start_time = std::chrono::steady_clock::now();
  const bool calibrating = !calib.sequences.empty();
  if (!calibrating && needs_calibration(c, recipe)) {
    fail("format {}{} quantizes activations or the KV cache: calibration text is needed (--calib)", recipe.format,
         recipe.kv_cache ? " with a KV-cache format" : "");
  }
  const std::int64_t H = c.hidden_size;
  const std::int64_t total_rows = calib.tokens();
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
  std::vector<float> saved;
  const std::vector<Batch> batches = make_batches(calib, std::max<std::int64_t>(1, options.batch_sequences));
  const std::vector<float> inv_freq = model::rope_inv_freq(c);
  model::Workspace ws;

  PtqReport report;
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
    }
    // Linears that share an input (q/k/v, gate/up) become one fused Linear in the engines: they must share a format.
    for (const auto& group : {std::vector<LinearKind>{LinearKind::q, LinearKind::k, LinearKind::v},
                              std::vector<LinearKind>{LinearKind::gate, LinearKind::up}}) {
      for (const auto kind : group) {
        if (schemes[kind_index(kind)].format != schemes[kind_index(group[0])].format) {
          fail("layer {}: {} and {} share an input and must share a format (got '{}' and '{}')", l, model::linear_name(group[0]),
               model::linear_name(kind), schemes[kind_index(group[0])].format, schemes[kind_index(kind)].format);
        }
      }
    }

    // 1. The original layer on the calibration activations, observed.
    LayerStats stats(want_histogram);
    if (calibrating) {
      saved = hidden;
      for (const auto& b : batches) {
        model::decoder_layer_forward(c, inv_freq, l, fp, hidden.data() + b.row0 * H, b.rows, b.spans, nullptr, ws, &stats);
      }
    }

    // 2. Weights: amax, shared amax of fused groups, real quantization.
    quant::QuantizedLayer ql;
    ql.index = l;
    model::LayerWeights qw = fp;
    std::array<std::vector<float>, 7> weight_f32, weight_amax, input_amax;
    std::array<float, 7> second_amax{};
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      const auto& s = schemes[k];
      if (!s.quantized()) continue;
      const Tensor& w = fp.linear(kind).weight;
      const std::string tensor_name = prefix + std::string(model::linear_name(kind)) + ".weight";
      weight_f32[k] = w.to_f32();
      weight_amax[k] = with_context(tensor_name, [&] { return quant::compute_amax(*s.weight, weight_f32[k].data(), w.dim(0), w.dim(1)); });
      if (s.weight->fp8_second_stage) second_amax[k] = quant::w4a8_second_amax(*s.weight, weight_f32[k].data(), w.dim(0), w.dim(1), weight_amax[k]);
      if (static_input(s)) {
        const bool histogram = want_histogram[k];
        input_amax[k] = {histogram ? stats.histograms[k].compute(recipe.calibrator, s.input->element, recipe.percentile) : stats.input_max[k]};
      }
    }
    for (const auto& group : {std::vector<LinearKind>{LinearKind::q, LinearKind::k, LinearKind::v},
                              std::vector<LinearKind>{LinearKind::gate, LinearKind::up}}) {
      const auto& s = schemes[kind_index(group[0])];
      // As the reference's export does for every format but per-tensor FP8: the group shares the input amax,
      // a per-tensor (NVFP4 global) weight amax and W4A8's second-stage amax, each the group's max.
      if (!s.quantized() || s.format == "fp8") continue;
      float in_max = 0.0f, w_max = 0.0f, second_max = 0.0f;
      for (const auto kind : group) {
        const std::size_t k = kind_index(kind);
        if (!input_amax[k].empty()) in_max = std::max(in_max, input_amax[k][0]);
        if (weight_amax[k].size() == 1) w_max = std::max(w_max, weight_amax[k][0]);
        second_max = std::max(second_max, second_amax[k]);
      }
      for (const auto kind : group) {
        const std::size_t k = kind_index(kind);
        if (!input_amax[k].empty()) input_amax[k][0] = in_max;
        if (weight_amax[k].size() == 1) weight_amax[k][0] = w_max;
        second_amax[k] = second_max;
      }
    }
    double weight_error_sum = 0.0;
    int quantized_here = 0;
    for (const auto kind : model::kAllLinears) {
      const std::size_t k = kind_index(kind);
      quant::QuantizedLinear qlin;
      qlin.name = prefix + std::string(model::linear_name(kind));
      qlin.scheme = schemes[k];
      if (qlin.scheme.quantized()) {
        const Tensor& w = fp.linear(kind).weight;
        const std::int64_t out = w.dim(0), in = w.dim(1);
        qlin.weight = with_context(qlin.name, [&] {
          return quant::quantize_weight(*qlin.scheme.weight, weight_f32[k].data(), out, in, weight_amax[k], second_amax[k]);
        });
        std::vector<float> deq = quant::dequantize_weight(*qlin.scheme.weight, *qlin.weight, out, in);
        double num = 0.0, den = 0.0;
        for (std::size_t i = 0; i < deq.size(); ++i) {
          const double d = static_cast<double>(deq[i]) - weight_f32[k][i];
          num += d * d;
          den += static_cast<double>(weight_f32[k][i]) * weight_f32[k][i];
        }
        qlin.weight_error = den > 0.0 ? std::sqrt(num / den) : 0.0;
        weight_error_sum += qlin.weight_error;
        ++quantized_here;
        qw.linear(kind).weight = Tensor::from_f32(deq, {out, in});
        qlin.input_amax = input_amax[k];
        if (qlin.scheme.input) {
          auto aq = std::make_shared<quant::ActivationQuantizer>(quant::ActivationQuantizer{*qlin.scheme.input, qlin.input_amax, {}});
          qw.linear(kind).input_transform = [aq](float* x, std::int64_t rows, std::int64_t cols) { aq->apply(x, rows, cols); };
        }
        weight_f32[k].clear();
        weight_f32[k].shrink_to_fit();
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

    // 3. The quantized layer on the same inputs: its output error, and the next inputs when asked.
    LayerReport lr;
    lr.layer = l;
    lr.formats = layer_formats(ql.linears);
    lr.weight_error = quantized_here > 0 ? weight_error_sum / quantized_here : 0.0;
    if (calibrating) {
      double num = 0.0, den = 0.0;
      for (const auto& b : batches) {
        float* y = saved.data() + b.row0 * H;
        model::decoder_layer_forward(c, inv_freq, l, qw, y, b.rows, b.spans, nullptr, ws, nullptr);
        const float* ref = hidden.data() + b.row0 * H;
        for (std::int64_t i = 0; i < b.rows * H; ++i) {
          const double d = static_cast<double>(y[i]) - ref[i];
          num += d * d;
          den += static_cast<double>(ref[i]) * ref[i];
        }
      }
      for (float v : saved) {
        if (!std::isfinite(v)) fail("layer {}: the quantized layer produced a non-finite output", l);
      }
      lr.output_error = den > 0.0 ? std::sqrt(num / den) : 0.0;
      if (options.propagate_quantized) hidden.swap(saved);
    }
    report.quantized_linears += quantized_here;
    lr.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - layer_start).count();
    report.layers.push_back(lr);
    sink(std::move(ql));
    // Done with this layer's source weights: let their pages go, so resident memory does not grow with depth.
    for (const auto kind : model::kAllLinears) fp.linear(kind).weight.release_pages();
    progress.advance();
  }
  progress.finish();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_time).count();
  return report;
}

}  // namespace mopt::algo
