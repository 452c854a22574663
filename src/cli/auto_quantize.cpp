// `mopt quantize --auto-bits B`: a format per group of Linears under an effective-bits budget
// (algo/auto_quantize.h). Each candidate format is calibrated once over the whole model with its own
// algorithm (nvfp4_awq: AWQ-lite, fp8: max), as the reference calibrates each candidate recipe; each
// group is scored with each candidate, by the reference's gradient score (default: the loss gradient
// times each Linear's output change, from backward passes of the unquantized model) or by the KL
// divergence with that group alone quantized; the solver picks; the output takes every Linear from the
// candidate chosen for its group, so the exported Linears are exactly the ones that were scored.
#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <set>

#include "algo/auto_quantize.h"
#include "cli/commands.h"
#include "cli/quantize_common.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/progress.h"
#include "export/hf_modelopt.h"
#include "export/targets.h"
#include "load/load_model.h"
#include "io/atomic_file.h"
#include "io/checkpoint.h"
#include "io/json_util.h"
#include "train/data.h"
#include "train/model.h"

namespace mopt::cli {

namespace {

using nlohmann::json;

std::vector<std::string> split_formats(const std::string& list) {
  std::vector<std::string> out;
  std::size_t begin = 0;
  while (begin <= list.size()) {
    const std::size_t end = std::min(list.find(',', begin), list.size());
    const std::string f = list.substr(begin, end - begin);
    if (f.empty()) fail("--auto-formats '{}': an empty format name", list);
    if (f == "none") fail("--auto-formats: 'none' is always a candidate (16 bits, score 0); list quantized formats");
    (void)quant::format_scheme(f);  // an unknown name is refused here, naming the known ones
    for (const auto& seen : out) {
      if (seen == f) fail("--auto-formats '{}': {} is listed twice", list, f);
    }
    out.push_back(f);
    begin = end + 1;
  }
  return out;
}

void refuse_unsupported(const QuantizeOptions& o) {
  if (o.auto_method != "gradient" && o.auto_method != "kl") {
    fail("--auto-method {}: choose gradient (the reference's default: loss gradient times each Linear's output change) or kl (KL divergence with one group quantized)",
         o.auto_method);
  }
  if (!(o.auto_bits > 0.0) || !std::isfinite(o.auto_bits)) fail("--auto-bits {} is not a positive number", o.auto_bits);
  if (!o.format.empty()) fail("--auto-bits chooses the formats from --auto-formats; --format does not apply");
  if (!o.exclude.empty()) fail("--auto-bits with --exclude is not supported (every decoder Linear is a candidate)");
  if (!o.recipe.empty() || !o.overrides.empty()) fail("--auto-bits chooses every Linear's format; --recipe and --override do not apply");
  if (!o.algo.empty()) fail("--auto-bits calibrates each candidate with its own algorithm (nvfp4_awq: awq_lite, fp8: max); --algo does not apply");
  if (o.quantize_lm_head) fail("--auto-bits leaves the lm_head unquantized; --quantize-lm-head does not apply");
  if (!o.sparsity.empty()) fail("--auto-bits with --sparsity is not supported");
  if (o.export_format == "gguf" && !o.gguf_type.empty() && o.gguf_type != "native") {
    fail("--auto-bits --export gguf writes each Linear in its own type (--gguf-type native); --gguf-type {} does not apply", o.gguf_type);
  }
  if (o.calib.empty()) fail("--auto-bits scores the candidates on calibration text: give --calib FILE");
  if (o.auto_score_size < 1) fail("--auto-score-size {} must be at least 1", o.auto_score_size);
}

// The scores saved by an earlier run (--auto-state), when they are for this model, these candidates
// and these groups; std::nullopt when the file does not exist.
std::optional<std::vector<std::vector<double>>> read_state(const std::string& path, const std::string& method, const std::vector<std::string>& formats,
                                                           const std::vector<algo::LinearGroup>& groups, const json& calibration) {
  if (path.empty() || !std::filesystem::exists(path)) return std::nullopt;
  const json j = io::parse_json_unique_keys(io::read_text_file(path), path);
  const auto field = [&](const char* name) -> const json& {
    if (!j.is_object() || !j.contains(name)) fail("{}: not a mixed-precision state (no \"{}\")", path, name);
    return j[name];
  };
  if (field("method") != json(method)) fail("{}: {} scores, not {} (--auto-method)", path, field("method").dump(), method);
  if (field("formats") != json(formats)) fail("{}: scores for candidates {}, not {}", path, field("formats").dump(), json(formats).dump());
  if (field("calibration") != calibration) fail("{}: scores of another model or from other calibration settings", path);
  const json& g = field("groups");
  if (!g.is_array() || g.size() != groups.size()) fail("{}: scores for {} groups, the model has {}", path, g.is_array() ? g.size() : 0, groups.size());
  std::vector<std::vector<double>> scores;
  for (std::size_t i = 0; i < groups.size(); ++i) {
    if (!g[i].is_object() || g[i].value("name", "") != groups[i].name || !g[i].contains("scores") || !g[i]["scores"].is_array() ||
        g[i]["scores"].size() != formats.size()) {
      fail("{}: group {} is not {} with {} scores", path, i, groups[i].name, formats.size());
    }
    std::vector<double> row;
    for (const auto& v : g[i]["scores"]) {
      if (!v.is_number() || !std::isfinite(v.get<double>()) || v.get<double>() < 0.0) fail("{}: {} has a score that is not a finite number >= 0", path, groups[i].name);
      row.push_back(v.get<double>());
    }
    scores.push_back(std::move(row));
  }
  return scores;
}

json state_json(const std::string& model, const std::string& method, const std::vector<std::string>& formats, const std::vector<algo::LinearGroup>& groups,
                const std::vector<std::vector<double>>& scores, const json& calibration) {
  json g = json::array();
  for (std::size_t i = 0; i < groups.size(); ++i) g.push_back({{"name", groups[i].name}, {"weights", groups[i].weights}, {"scores", scores[i]}});
  return {{"model", model}, {"method", method}, {"formats", formats}, {"calibration", calibration}, {"groups", g}};
}

// The reference's gradient scores: the unquantized model's backward over the score samples, batches
// of --calib-batch samples each with its mean cross-entropy as the loss, every Linear's input and
// output gradient handed to the scorer with each candidate's Linear (its folded scales undone).
std::vector<std::vector<double>> gradient_scores(const io::Checkpoint& ckpt, const model::Model& base, const std::vector<model::Model>& models,
                                                 const std::vector<std::vector<quant::QuantizedLayer>>& layers, const std::vector<algo::LinearGroup>& groups,
                                                 const std::vector<std::vector<std::int32_t>>& score_set, std::int64_t batch_sequences) {
  const std::int64_t L = ckpt.config().num_layers;
  std::vector<std::vector<std::array<algo::ScoredLinear, 7>>> cand(models.size());
  for (std::size_t c = 0; c < models.size(); ++c) {
    if (static_cast<std::int64_t>(layers[c].size()) != L) fail("--auto-bits: candidate {} has {} layers, the model {}", c, layers[c].size(), L);
    cand[c].resize(static_cast<std::size_t>(L));
    for (std::int64_t l = 0; l < L; ++l) {
      const quant::QuantizedLayer& ql = layers[c][static_cast<std::size_t>(l)];
      for (std::size_t k = 0; k < 7; ++k) {
        const model::LinearKind kind = model::kAllLinears[k];
        const std::string name = fmt::format("model.layers.{}.{}", l, model::linear_name(kind));
        const auto it = std::find_if(ql.linears.begin(), ql.linears.end(), [&](const quant::QuantizedLinear& q) { return q.name == name; });
        if (ql.index != l || it == ql.linears.end()) fail("--auto-bits: candidate {} has no {}", c, name);
        cand[c][static_cast<std::size_t>(l)][k] = {&models[c].layer(l).linear(kind), it->folded_input_scale, it->folded_output_scale};
      }
    }
  }
  algo::GradientScorer scorer(base, std::move(cand));
  train::TrainableModel trainable = train::TrainableModel::from_checkpoint(ckpt, false);  // activations' gradients only
  trainable.set_linear_gradient_observer([&](std::int64_t layer, std::size_t kind, const float* x, const float* dy, std::int64_t rows, std::int64_t, std::int64_t) {
    scorer.add(layer, kind, x, dy, rows);
  });
  std::vector<train::Example> examples;
  for (const auto& seq : score_set) {
    train::Example e;
    e.tokens = seq;
    e.targets.assign(seq.size(), -1);
    for (std::size_t i = 0; i + 1 < seq.size(); ++i) e.targets[i] = seq[i + 1];
    examples.push_back(std::move(e));
  }
  const auto n = static_cast<std::int64_t>(examples.size());
  const std::int64_t per_batch = std::max<std::int64_t>(1, batch_sequences);
  Progress progress("scoring (loss gradient x output change)", static_cast<std::uint64_t>((n + per_batch - 1) / per_batch), "batches");
  for (std::int64_t b0 = 0; b0 < n; b0 += per_batch) {
    std::vector<std::int64_t> indices;
    for (std::int64_t i = b0; i < std::min(n, b0 + per_batch); ++i) indices.push_back(i);
    const train::Batch batch = train::make_batch(examples, indices);
    const std::int64_t targets = batch.target_count();
    if (targets == 0) {  // one-token samples: nothing to predict
      progress.advance();
      continue;
    }
    const train::LossResult r = trainable.input_gradients(batch, 1.0f / static_cast<float>(targets));
    if (!std::isfinite(r.loss_sum)) fail("--auto-bits: the loss on score samples {}-{} is not finite (NaN or Inf in the model)", b0, b0 + per_batch - 1);
    progress.advance();
  }
  progress.finish();
  return scorer.group_scores(groups);
}

// The solver trusts the sum of per-group scores; the uniform candidates that fit the budget are
// feasible too, and each is checked against its choice by the KL divergence both add on the score
// samples (a few forward passes): the solver's choice is kept unless one of them does better. Returns
// what was measured (empty when no uniform candidate fits).
json check_against_uniform(model::Model& base, const std::vector<model::Model*>& candidates, const std::vector<algo::LinearGroup>& groups,
                           const std::vector<std::vector<std::int32_t>>& score_set, const std::vector<std::string>& formats,
                           const std::vector<double>& bits, const std::vector<std::vector<double>>& scores, double budget, algo::MixedChoice& choice) {
  json check = json::object();
  std::vector<std::size_t> fits;
  for (std::size_t c = 0; c < formats.size(); ++c) {
    const bool is_choice = std::all_of(choice.choice.begin(), choice.choice.end(), [&](std::size_t x) { return x == c; });
    if (bits[c] <= budget && !is_choice) fits.push_back(c);
  }
  if (fits.empty()) return check;
  const double kl_choice = algo::kl_of_choice(base, candidates, groups, choice.choice, score_set);
  check["kl_choice"] = kl_choice;
  std::size_t best = formats.size();
  double best_kl = kl_choice;
  for (const std::size_t c : fits) {
    const double kl = algo::kl_of_choice(base, candidates, groups, std::vector<std::size_t>(groups.size(), c), score_set);
    check["kl_uniform"][formats[c]] = kl;
    fmt::print(stderr, "check on the score samples: KL {:.6f} for the choice, {:.6f} for uniform {}\n", kl_choice, kl, formats[c]);
    if (kl < best_kl) {
      best = c;
      best_kl = kl;
    }
  }
  if (best < formats.size()) {
    fmt::print(stderr, "uniform {} does better than the solver's choice on the score samples: taking it\n", formats[best]);
    choice.choice.assign(groups.size(), best);
    choice.score = 0.0;
    for (std::size_t g = 0; g < groups.size(); ++g) choice.score += scores[g][best];
    choice.effective_bits = bits[best];
  }
  check["kept"] = best < formats.size() ? "uniform " + formats[best] : std::string("solver");
  return check;
}

// The output: each Linear from its group's candidate (choice[g] == layers.size(): unquantized), and
// each tensor a candidate changed beside its codes (norms AWQ folded a scale into, biases) from the
// candidate chosen for the group it belongs to.
void write_choice(std::vector<std::vector<quant::QuantizedLayer>>& layers, const std::vector<algo::LinearGroup>& groups,
                  const std::vector<std::size_t>& choice, exporter::HfModeloptWriter& writer) {
  const std::size_t none = layers.size();
  std::map<std::string, std::size_t> chosen;  // module -> candidate
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (const auto& m : groups[g].modules) chosen[m] = choice[g];
  }
  for (std::size_t l = 0; l < layers[0].size(); ++l) {
    quant::QuantizedLayer out;
    out.index = layers[0][l].index;
    out.key_amax = layers[0][l].key_amax;
    out.value_amax = layers[0][l].value_amax;
    for (std::size_t i = 0; i < layers[0][l].linears.size(); ++i) {
      const std::string& name = layers[0][l].linears[i].name;
      const auto it = chosen.find(name);
      if (it == chosen.end()) fail("--auto-bits: {} is in no group", name);
      if (it->second == none) {
        quant::QuantizedLinear plain;
        plain.name = name;
        out.linears.push_back(std::move(plain));
        continue;
      }
      quant::QuantizedLinear& from = layers[it->second][l].linears[i];
      if (from.name != name) fail("--auto-bits: the candidates list layer {}'s Linears in different orders", l);
      out.linears.push_back(std::move(from));
    }
    for (std::size_t c = 0; c < none; ++c) {
      for (auto& [name, tensor] : layers[c][l].replaced) {
        if (choice[algo::group_of_tensor(groups, name)] == c) out.replaced.emplace_back(name, std::move(tensor));
      }
    }
    writer.add_layer(out);
  }
}

// One line per group: its weights, the format chosen and every candidate's score; returns the mix
// ("fp8 123 weights, nvfp4_awq 456 weights").
std::string print_choice_table(const std::vector<algo::LinearGroup>& groups, const std::vector<std::string>& formats,
                               const std::vector<std::vector<double>>& scores, const std::vector<std::size_t>& choice, const std::string& method) {
  fmt::print("{:<48} {:>10} {:>7}", "group", "weights", "choice");
  for (const auto& f : formats) fmt::print(" {:>14}", (method == "kl" ? "KL " : "score ") + f);
  fmt::print("\n");
  std::map<std::string, std::int64_t> counts;
  for (std::size_t g = 0; g < groups.size(); ++g) {
    const std::string name = choice[g] < formats.size() ? formats[choice[g]] : "none";
    counts[name] += groups[g].weights;
    fmt::print("{:<48} {:>10} {:>7}", groups[g].name, groups[g].weights, name);
    for (const double s : scores[g]) fmt::print(" {:>14}", method == "kl" ? fmt::format("{:.6f}", s) : fmt::format("{:.6e}", s));
    fmt::print("\n");
  }
  std::string mix;
  for (const auto& [name, weights] : counts) mix += fmt::format("{}{} {} weights", mix.empty() ? "" : ", ", name, weights);
  return mix;
}

}  // namespace

int run_auto_quantize(const QuantizeOptions& o) {
  const auto start = std::chrono::steady_clock::now();
  refuse_unsupported(o);
  const std::vector<std::string> formats = split_formats(o.auto_formats);
  if (o.group_size > 0 && std::none_of(formats.begin(), formats.end(), [](const std::string& f) { return quant::format_takes_group_size(f); })) {
    fail("--group-size applies to the INT4 formats only; none of --auto-formats {} takes one", o.auto_formats);
  }
  if (std::filesystem::exists(o.out_dir)) fail("{}: already exists (choose a new output)", o.out_dir);
  if (load::is_quantized_checkpoint(o.model)) fail("{}: already quantized; quantize the original checkpoint", o.model);
  const io::Checkpoint ckpt = io::Checkpoint::open(o.model);
  std::vector<quant::Recipe> recipes;
  std::vector<double> bits;
  for (const auto& f : formats) {
    QuantizeOptions one = o;
    one.format = f;
    if (!quant::format_takes_group_size(f)) one.group_size = 0;  // --group-size is for the candidates that take one
    recipes.push_back(recipe_from_options(one));
    bits.push_back(algo::effective_bits(recipes.back().scheme_for("model.layers.0.mlp.down_proj")));
  }
  const algo::CalibrationSet calib = calibration_from_options(o, ckpt, recipes[0]);
  algo::PtqOptions options;
  options.batch_sequences = o.calib_batch;
  options.gptq_damp = o.gptq_damp;
  options.gptq_act_order = o.gptq_act_order;
  options.fold_pre_quant_scales = !exporter::export_target(o.export_format).stores_pre_quant_scale;
  for (const auto& r : recipes) check_export_target(o, r);
  bool whole_blocks = false;
  for (const auto& r : recipes) whole_blocks = whole_blocks || algo::folds_scales_across_linears(r.scheme_for("model.layers.0.self_attn.q_proj"), options);
  const std::vector<algo::LinearGroup> groups = algo::linear_groups(ckpt.config(), whole_blocks);
  if (whole_blocks) fmt::print(stderr, "groups: attention and MLP of each layer whole (a candidate folds o_proj's and down_proj's scales into v_proj and up_proj)\n");
  const json calibration = {{"samples", recipes[0].calib_size}, {"seq_len", recipes[0].seq_len}, {"seed", recipes[0].seed},
                            {"files", o.calib}, {"score_samples", o.auto_score_size}, {"batch", o.calib_batch}, {"group_size", o.group_size},
                            {"folded_scales", options.fold_pre_quant_scales}, {"model_config", ckpt.config().raw}};

  io::ScratchDir staging;
  staging.create(o.out_dir);

  // Every candidate over the whole model, its layers kept for the output and written for scoring.
  std::vector<std::vector<quant::QuantizedLayer>> layers(formats.size());
  for (std::size_t c = 0; c < formats.size(); ++c) {
    fmt::print(stderr, "candidate {}/{}: {} ({}, {} bits per weight)\n", c + 1, formats.size(), formats[c], recipes[c].effective_algorithm(), bits[c]);
    exporter::HfModeloptWriter writer(ckpt, fmt::format("{}/candidate-{}", staging.path(), c), recipes[c]);
    algo::quantize_checkpoint(ckpt, recipes[c], calib, options, [&](quant::QuantizedLayer&& l) {
      for (const auto& r : l.replaced) (void)algo::group_of_tensor(groups, r.first);  // each one belongs to a group, or an error
      writer.add_layer(l);
      layers[c].push_back(std::move(l));
    });
    writer.finish();
  }

  model::Model base = load::load_model(o.model);
  std::vector<model::Model> models;
  models.reserve(formats.size());
  for (std::size_t c = 0; c < formats.size(); ++c) models.push_back(load::load_model(fmt::format("{}/candidate-{}", staging.path(), c)));
  std::vector<model::Model*> candidates;
  for (auto& m : models) candidates.push_back(&m);
  const std::vector<std::vector<std::int32_t>> score_set(
      calib.sequences.begin(), calib.sequences.begin() + std::min<std::ptrdiff_t>(o.auto_score_size, static_cast<std::ptrdiff_t>(calib.sequences.size())));
  std::vector<std::vector<double>> scores;
  if (auto saved = read_state(o.auto_state, o.auto_method, formats, groups, calibration)) {
    scores = std::move(*saved);
    fmt::print(stderr, "scores: read from {} (no scoring)\n", o.auto_state);
  } else {
    std::int64_t score_tokens = 0;
    for (const auto& s : score_set) score_tokens += static_cast<std::int64_t>(s.size());
    if (o.auto_method == "gradient") {
      scores = gradient_scores(ckpt, base, models, layers, groups, score_set, o.calib_batch);
    } else {
      Progress progress("scoring (KL, one group quantized)", static_cast<std::uint64_t>(score_set.size() * groups.size() * formats.size()), "passes");
      scores = algo::kl_scores(base, candidates, groups, score_set, [&](std::int64_t, std::int64_t) { progress.advance(); });
      progress.finish();
    }
    fmt::print(stderr, "scores ({}): {} groups x {} candidates on {} tokens\n", o.auto_method, groups.size(), formats.size(), score_tokens);
    if (!o.auto_state.empty()) io::write_file_atomically(o.auto_state, state_json(o.model, o.auto_method, formats, groups, scores, calibration).dump(1) + "\n");
  }

  algo::MixedChoice choice = algo::choose_under_budget(groups, scores, bits, o.auto_bits);

  const json check = check_against_uniform(base, candidates, groups, score_set, formats, bits, scores, o.auto_bits, choice);
  quant::Recipe mixed = recipes[0];
  for (std::size_t g = 0; g < groups.size(); ++g) {
    for (const auto& m : groups[g].modules) mixed.overrides.push_back({m, choice.choice[g] < formats.size() ? formats[choice.choice[g]] : "none"});
  }
  const bool converted = exporter::export_target(o.export_format).converted_from_modelopt;
  const std::string modelopt_dir = converted ? staging.path() + "/mixed" : o.out_dir;
  exporter::HfModeloptWriter writer(ckpt, modelopt_dir, mixed);
  write_choice(layers, groups, choice.choice, writer);
  writer.finish();
  if (converted) {
    QuantizeOptions converted_options = o;
    if (o.export_format == "gguf") converted_options.gguf_type = "native";  // a type per Linear
    (void)convert_export(modelopt_dir, converted_options, mixed, 0);
  }

  const std::string mix = print_choice_table(groups, formats, scores, choice.choice, o.auto_method);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("mixed precision under {} bits: {:.4f} effective bits, total score {:.6g} ({}); {:.1f} s; peak RSS {:.1f} MiB\n", o.auto_bits,
             choice.effective_bits, choice.score, mix, seconds, static_cast<double>(peak_rss_bytes()) / (1 << 20));
  fmt::print("wrote {}\n", o.out_dir);
  if (!o.report.empty()) {
    json j = state_json(o.model, o.auto_method, formats, groups, scores, calibration);
    j["budget_bits"] = o.auto_bits;
    j["effective_bits"] = choice.effective_bits;
    j["total_score"] = choice.score;
    if (!check.empty()) j["uniform_check"] = check;
    j["out"] = o.out_dir;
    j["seconds"] = seconds;
    for (std::size_t g = 0; g < groups.size(); ++g) j["groups"][g]["choice"] = choice.choice[g] < formats.size() ? formats[choice.choice[g]] : "none";
    io::write_file_atomically(o.report, j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace mopt::cli
