#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "algo/ptq.h"
#include "cli/commands.h"
#include "cli/quantize_common.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/thread_pool.h"
#include "export/hf_modelopt.h"
#include "export/targets.h"
#include "load/load_model.h"
#include "io/atomic_file.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "io/tokenizer.h"
#include "model/llama.h"
#include "quant/fake_quant.h"
#include "train/model.h"
#include "train/qat.h"
#include "train/trainer.h"

namespace mopt::cli {

namespace fs = std::filesystem;

namespace {

DType weights_dtype(const std::string& name) {
  if (name == "bf16") return DType::BF16;
  if (name == "f32") return DType::F32;
  fail("--dtype {}: bf16 or f32", name);
}

void print_summary(const train::TrainSummary& s, const std::string& out) {
  fmt::print("trained {} steps on {} examples: train loss {:.4f}", s.steps, s.examples, s.final_train_loss);
  if (s.final_val_loss >= 0) {
    fmt::print(", validation loss {:.4f} ± {:.4f} (perplexity {:.2f})", s.final_val_loss, s.final_val_stderr, std::exp(s.final_val_loss));
  }
  fmt::print(", {:.0f} tokens/s, peak memory {:.0f} MiB\nwrote {}\n", s.tokens_per_second, static_cast<double>(peak_rss_bytes()) / (1 << 20), out);
}


// `mopt train MODEL --qat FORMAT ...`: calibrate as `mopt quantize` does, train with the fake
// quantizers (distilling from the unquantized model with --distill), then write what `mopt quantize`
// writes for the format, from the trained weights under the frozen scales.
int run_qat(const TrainCliOptions& o, train::TrainOptions t, const io::Tokenizer& tokenizer) {
  if (o.model.empty()) fail("--qat fine-tunes a model: give its directory (not --init)");
  QuantizeOptions q = o.qat;
  if (q.format.empty() && q.recipe.empty()) q.format = "none";  // --sparsity alone: prune, then train with the masks kept
  if (q.format == "none" && o.learn_scales) fail("--learn-scales learns quantization scales: it needs --qat FORMAT");
  q.model = o.model;
  q.out_dir = t.out;
  const quant::Recipe recipe = recipe_from_options(q);
  check_export_target(q, recipe);
  if (recipe.scheme_for("lm_head").quantized()) fail("--qat does not train a quantized lm_head; leave it out (--quantize-lm-head)");
  const train::SteMode ste = train::parse_ste_mode(o.ste);
  if (o.distill && !(o.kd_temperature > 0.0f)) fail("--kd-temperature {} is not positive", o.kd_temperature);
  if (o.distill && !(o.kd_weight >= 0.0f && o.kd_weight <= 1.0f)) fail("--kd-weight {} is not in [0, 1]", o.kd_weight);
  if (load::is_quantized_checkpoint(o.model)) fail("{}: already quantized; train the original checkpoint", o.model);
  const io::Checkpoint ckpt = io::Checkpoint::open(o.model);
  if (o.learn_scales) {  // refused before any work
    for (std::int64_t l = 0; l < ckpt.config().num_layers; ++l) {
      for (const auto kind : model::kAllLinears) {
        const std::string name = fmt::format("model.layers.{}.{}", l, model::linear_name(kind));
        const quant::LinearScheme scheme = recipe.scheme_for(name);
        if (scheme.quantized() && !quant::supports_learned_scales(*scheme.weight)) {
          fail("--learn-scales: {} is quantized as {}; learned scales are for integer weights in blocks (int4_rtn, int4_awq, int8 blocks) and NVFP4 (nvfp4, nvfp4_awq)",
               name, scheme.weight->describe());
        }
      }
    }
  }
  const algo::CalibrationSet calib = calibration_from_options(q, ckpt, recipe);

  // 1. Calibration: the quantizers' scales and the transformed weights training starts from.
  algo::PtqOptions options;
  options.fold_pre_quant_scales = !exporter::export_target(q.export_format).stores_pre_quant_scale;
  options.batch_sequences = q.calib_batch;
  options.gptq_damp = q.gptq_damp;
  options.gptq_act_order = q.gptq_act_order;
  options.keep_master_weights = true;
  std::vector<quant::QuantizedLayer> layers;
  const algo::PtqReport report = algo::quantize_checkpoint(ckpt, recipe, calib, options, [&](quant::QuantizedLayer&& l) {
    for (auto& lin : l.linears) lin.weight.reset();  // the codes are made again from the trained weights
    layers.push_back(std::move(l));
  });
  if (report.sparse_linears > 0) {
    fmt::print(stderr, "sparsity: pruned {} linears to 2:4 ({}); training keeps the masks\n", report.sparse_linears, recipe.sparse_algo);
  }
  if (report.quantized_linears > 0 || recipe.kv_cache) {
    fmt::print(stderr, "qat: calibrated {} linears of {} layers as {} ({}{}) in {:.1f} s\n", report.quantized_linears, report.layers.size(),
               recipe.format, recipe.effective_algorithm(), recipe.kv_cache ? ", kv " + *recipe.kv_cache : "", report.seconds);
  }

  if (t.state.empty()) t.state = t.out + ".train-state.safetensors";

  // 2. The student (fake-quantized) and, for distillation, the teacher (the model as it was).
  train::TrainableModel model = train::TrainableModel::from_checkpoint(ckpt);
  std::optional<quant::KvScheme> kv;
  if (recipe.kv_cache) kv = quant::kv_scheme(*recipe.kv_cache);
  auto fq = std::make_shared<train::FakeQuantization>(std::move(layers), kv, ste, model, o.learn_scales);
  model.set_fake_quantization(fq);
  std::unique_ptr<train::TrainableModel> teacher;
  if (o.distill) {
    teacher = std::make_unique<train::TrainableModel>(train::TrainableModel::from_checkpoint(ckpt, false));
    model.set_distillation(train::Distillation{teacher.get(), o.kd_temperature, o.kd_weight});
  }

  // 3. Training.
  t.write_checkpoint = false;
  t.validate_at_start = true;
  t.settings = fmt::format("qat {} algo {} group {} kv {} calib {} size {} seq {} seed {} ste {} distill {} T {} w {} export {} lsq {}", recipe.format,
                           recipe.effective_algorithm(), recipe.group_size, recipe.kv_cache.value_or("-"), fmt::join(q.calib, ","),
                           recipe.calib_size, recipe.seq_len, recipe.seed, o.ste, o.distill, o.kd_temperature, o.kd_weight, q.export_format,
                           o.learn_scales);
  if (!recipe.sparsity.empty()) {
    t.settings += fmt::format(" sparsity {} {} exclude {}", recipe.sparsity, recipe.sparse_algo, fmt::join(recipe.sparse_exclude, ","));
  }
  const std::string what = recipe.format == "none" ? std::string() : fmt::format(" with {} fake quantization", recipe.format);
  const std::string pruned = recipe.sparsity.empty() ? std::string() : fmt::format("{} pruned to 2:4 ({})", what.empty() ? "" : ",", recipe.sparse_algo);
  t.label = fmt::format("{}{}{}{}", o.model, what, pruned, o.distill ? ", distilled from the original model" : "");
  const train::TrainSummary s = train::run_training(model, tokenizer, t);
  teacher.reset();

  // 4. What quantize writes: the trained weights quantized under the frozen scales, every other tensor
  // trained, in the source checkpoint's names, order and dtypes. Other formats via a staging directory.
  io::ScratchDir staging;
  std::string modelopt_dir = q.out_dir;
  if (exporter::export_target(q.export_format).converted_from_modelopt) modelopt_dir = staging.create(q.out_dir) + "/modelopt";
  std::uint64_t bytes = 0;
  {
    exporter::HfModeloptWriter writer(ckpt, modelopt_dir, recipe);
    writer.set_tensor_override([&](const std::string& name) -> std::optional<Tensor> {
      const auto& params = model.parameters();
      const auto it = std::find_if(params.begin(), params.end(), [&](const train::Parameter& p) { return p.name == name; });
      if (it == params.end()) return std::nullopt;
      return Tensor::from_f32(it->value, it->shape).to(ckpt.tensor(name).dtype());
    });
    for (std::int64_t l = 0; l < fq->layers(); ++l) writer.add_layer(fq->quantized_layer(l, model));
    if (!exporter::export_target(q.export_format).converted_from_modelopt) {
      std::string log;
      for (const auto& line : s.log) log += line + "\n";
      writer.write_text("train_log.jsonl", log);
      writer.write_text("loss_curve.svg", train::loss_curve_svg(s.log));
    }
    writer.finish();
    bytes = writer.bytes_written();
  }
  convert_export(modelopt_dir, q, recipe, bytes);
  if (s.initial_val_loss >= 0) {
    fmt::print("validation loss before training (the {} model): {:.4f} ± {:.4f}\n",
               recipe.format == "none" ? "pruned" : recipe.sparsity.empty() ? "PTQ" : "pruned PTQ", s.initial_val_loss, s.initial_val_stderr);
  }
  print_summary(s, q.out_dir);
  return 0;
}

}  // namespace

int run_train(const TrainCliOptions& o) {
  if (o.model.empty() == o.init.empty()) fail("train needs a model directory or --init CONFIG (one of them)");
  if (fs::exists(o.train.out)) fail("{}: already exists", o.train.out);
  const std::string tokenizer_dir = !o.tokenizer.empty() ? o.tokenizer : o.model;
  if (tokenizer_dir.empty()) fail("--init needs --tokenizer DIR (a directory with tokenizer.json)");
  if (!fs::exists(fs::path(tokenizer_dir) / "tokenizer.json")) fail("{}: no tokenizer.json", tokenizer_dir);
  const io::Tokenizer tokenizer = io::Tokenizer::load(tokenizer_dir);

  train::TrainOptions t = o.train;
  t.schedule = train::parse_schedule(o.schedule);
  t.seed = static_cast<std::uint64_t>(o.seed);
  t.tokenizer_dir = tokenizer_dir;
  t.dtype = weights_dtype(o.dtype);
  if (o.precision != "f32" && o.precision != "bf16") fail("--precision {}: f32 or bf16", o.precision);
  t.bf16_products = o.precision == "bf16";
  if (!o.qat.format.empty() || !o.qat.recipe.empty() || !o.qat.sparsity.empty()) return run_qat(o, t, tokenizer);
  if (!o.qat.sparse_algo.empty() || !o.qat.sparse_exclude.empty()) fail("--sparse-algo and --sparse-exclude apply with --sparsity 2:4");
  if (o.distill) fail("--distill distills a quantized or pruned student from its original self: it needs --qat FORMAT or --sparsity 2:4");
  if (o.learn_scales) fail("--learn-scales learns quantization scales: it needs --qat FORMAT");

  train::TrainableModel model = o.init.empty() ? train::TrainableModel::from_checkpoint(io::Checkpoint::open(o.model))
                                               : train::TrainableModel::initialize(io::load_model_config(o.init), t.seed);
  t.label = o.init.empty() ? o.model : o.init;
  const train::TrainSummary s = train::run_training(model, tokenizer, t);
  print_summary(s, t.out);
  return 0;
}

}  // namespace mopt::cli
