// The PTQ pipeline's work on one decoder layer, as passes over one `LayerState`
// (algo/ptq.h runs them layer after layer):
//
//   plan        each Linear's scheme, which inputs need a histogram, which Linears are pruned
//   observe     the original layer on the calibration activations (`LayerStats`)
//   prune       2:4 masks and pruned weights (magnitude or SparseGPT), before any quantizer sees them
//   start_work  each quantized Linear's working weight and static input amax
//   the algorithm's passes, in the order its name gives them (`algorithm_passes`):
//     smoothquant, awq_lite (input scales), awq_clip (weight amax), gptq (after the scales)
//   fold_scales fold_into_rows, drop_unfoldable_scales (a target without pre_quant_scale asks for
//               it), share_input_scales (one per shared input, into the norm), ggml_importance
//   weight_scales  weight amax (calibrated or clipped), shared within fused groups
//   quantize    codes and scales, and the layer as the quantized model computes it
//   measure     the quantized layer's output error (and round-to-nearest's) on the same inputs
//
// A pass reads and writes only the state; a new one (a sensitivity score, another pruning rule)
// is one more function here and one more line in the driver.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "algo/gptq.h"
#include "algo/ptq.h"
#include "algo/smoothing.h"
#include "algo/sparsity.h"
#include "io/checkpoint.h"
#include "model/llama.h"
#include "quant/calibrator.h"
#include "quant/quantized_layer.h"
#include "quant/recipe.h"

namespace mopt::algo {

inline std::size_t kind_index(model::LinearKind kind) { return static_cast<std::size_t>(kind); }

// The Linears that share an input: q/k/v (the attention norm's output) and gate/up (the MLP norm's).
extern const std::array<std::vector<model::LinearKind>, 2> kInputGroups;

// The Linear whose input statistics stand for `kind`'s (they see the same tensor).
model::LinearKind input_leader(model::LinearKind kind);

// True when the scheme quantizes its input with a static (calibrated) amax.
bool static_input(const quant::LinearScheme& s);

// The algorithm passes, in the order they run.
enum class AlgorithmPass { smoothquant, awq_lite, awq_clip, gptq };
// "max" -> none, "awq_full" -> awq_lite, awq_clip; "awq_lite+gptq" -> awq_lite, gptq; ... Throws Error
// for a name mopt does not know.
std::vector<AlgorithmPass> algorithm_passes(const std::string& name);
bool has_pass(const std::vector<AlgorithmPass>& passes, AlgorithmPass pass);

struct StatsNeeds {
  bool channel_max = false, mean_abs = false, clip_samples = false, hessian = false;
  bool mean_square = false;  // weights in ggml blocks: their quantizer's importance
};

// What one layer's calibration run saw.
class LayerStats : public model::LayerObserver {
 public:
  LayerStats(std::array<bool, 7> want_histogram, StatsNeeds needs) : want_histogram_(want_histogram), needs_(needs) {}

  void linear_input(std::int64_t layer, model::LinearKind kind, const float* x, std::int64_t rows, std::int64_t cols) override;
  void key_value(std::int64_t layer, const float* k, const float* v, std::int64_t rows, std::int64_t kv_dim) override;

  // The mean square of each channel of input k over every token seen (llama-imatrix's statistic); empty
  // when none was collected.
  std::vector<float> mean_square(std::size_t k) const;

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
void apply_pre_quant_scale(LinearWork& wk, const std::vector<float>& s, const std::vector<float>& channel_amax, bool static_in, DType dtype);

// What a quantized weight stands for in the original model: the input scale (kept or folded into the
// norm) multiplied back into its columns, a row scale divided out of its rows.
std::vector<float> effective_weight(std::vector<float> w, const LinearWork& wk);

// The input's fake quantization (and pre-quantization scale) as a Linear's transform; empty when none.
std::optional<quant::ActivationQuantizer> input_transform(const quant::LinearScheme& s, const std::vector<float>& input_amax, const std::vector<float>& pqs);

// What every layer's passes read.
struct PtqContext {
  const io::Checkpoint& checkpoint;
  const quant::Recipe& recipe;
  const PtqOptions& options;
  std::vector<AlgorithmPass> passes;
  bool sparsify = false;
  SparseAlgo sparse_algo = SparseAlgo::magnitude;
  std::optional<quant::KvScheme> kv;
  DType model_dtype = DType::BF16;
};

// The context of `recipe` on `checkpoint`: its algorithm's passes, its sparsity and KV schemes.
PtqContext make_ptq_context(const io::Checkpoint& checkpoint, const quant::Recipe& recipe, const PtqOptions& options);

// Everything one decoder layer carries through the passes.
struct LayerState {
  std::int64_t index = 0;
  std::string prefix;           // "model.layers.3."
  model::LayerWeights fp;       // the original layer
  model::LayerWeights qw;       // the layer as the quantized model computes it
  std::array<quant::LinearScheme, 7> schemes;
  std::array<bool, 7> want_histogram{};
  std::array<bool, 7> sparse{};  // pruned to 2:4
  std::unique_ptr<LayerStats> stats;
  std::array<std::vector<std::uint8_t>, 7> masks;
  std::array<std::vector<float>, 7> pruned;
  std::array<LinearWork, 7> work;
  std::array<std::vector<float>, 7> original_weights;  // the weight error is measured against these (before pruning)
  std::array<std::vector<float>, 7> input_amax_rtn;    // the static input amax before any algorithm
  std::array<std::vector<float>, 7> importance;        // ggml blocks' channel importance
  std::array<std::vector<float>, 7> weight_amax;
  std::array<float, 7> second_amax{};
  quant::QuantizedLayer ql;
  LayerReport report;
  int quantized_linears = 0;

  std::string linear_name(model::LinearKind kind) const { return prefix + std::string(model::linear_name(kind)); }
  bool any_sparse() const;
};

// plan: loads layer `index`, each Linear's scheme (checked against the algorithm), the histogram
// wants, the shared-input format rule, and which Linears are pruned.
LayerState plan_layer(const PtqContext& ctx, std::int64_t index);
// What `observe` must collect for the passes planned.
StatsNeeds stats_needs(const PtqContext& ctx, const LayerState& s);
// prune: each pruned Linear's mask and weights; an unquantized pruned Linear is replaced in the output.
void prune(const PtqContext& ctx, LayerState& s);
// start_work: working weights (pruned where pruned) and static input amax from the statistics.
void start_work(const PtqContext& ctx, LayerState& s);
void smoothquant_pass(const PtqContext& ctx, LayerState& s);
void awq_lite_pass(const PtqContext& ctx, LayerState& s);
void awq_clip_pass(const PtqContext& ctx, LayerState& s);
// The scales after the algorithm, as the export holds them (run in this order by fold_scales):
// fold_into_rows: NVFP4_AWQ's export (or a target without pre_quant_scale tensors) multiplies
// o_proj's and down_proj's scales into v_proj's and up_proj's output rows where the sizes allow.
void fold_into_rows(const PtqContext& ctx, LayerState& s);
// drop_unfoldable_scales: what a target without pre_quant_scale tensors asks for
// (PtqOptions::fold_pre_quant_scales, from exporter::ExportTarget): a scale still unfolded is dropped, that Linear quantized
// unsmoothed (its own clip search when the algorithm has one).
void drop_unfoldable_scales(const PtqContext& ctx, LayerState& s);
// share_input_scales: one scale per shared input (the group's mean), folded into the norm that feeds
// it for AWQ formats and folding targets (SmoothQuant's INT8 keeps it as pre_quant_scale).
void share_input_scales(const PtqContext& ctx, LayerState& s);
// ggml_importance: each input channel's importance for weights in ggml blocks under the final scales.
void ggml_importance(LayerState& s);
void fold_scales(const PtqContext& ctx, LayerState& s);
// weight_scales: the weight amax (and W4A8's second stage) of `work`, shared within fused groups,
// into s.weight_amax / s.second_amax.
void weight_scales(LayerState& s, std::array<LinearWork, 7>& work);
void gptq_pass(const PtqContext& ctx, LayerState& s);
// quantize: codes and scales into s.ql, the dequantized weights and input/KV transforms into s.qw.
void quantize(const PtqContext& ctx, LayerState& s);
// The round-to-nearest twin of the layer (same calibration, no algorithm), for the report's "before".
model::LayerWeights round_to_nearest_layer(LayerState& s);

// Runs every pass in order on one layer; `observe(s, stats)` runs the original layer over the
// calibration activations with the observer (nothing when not calibrating).
void run_layer_passes(const PtqContext& ctx, LayerState& s, const std::function<void(LayerState&, LayerStats&)>& observe);

}  // namespace mopt::algo
