#include "train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/progress.h"
#include "core/tensor.h"
#include "core/thread_pool.h"
#include "export/checkpoint_dir.h"
#include "io/checkpoint.h"
#include "io/json_util.h"
#include "io/safetensors.h"
#include "kernels/gemm.h"
#include "train/data.h"

namespace mopt::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Everything that decides the bits of a run: a state saved under other settings is not resumed.
std::string fingerprint(const TrainOptions& o, std::int64_t total_steps, std::int64_t examples) {
  json j = {{"data", o.data}, {"steps", total_steps}, {"examples", examples}, {"batch", o.batch}, {"grad_accum", o.grad_accum},
            {"seq_len", o.seq_len}, {"lr", o.lr}, {"warmup", o.warmup}, {"schedule", static_cast<int>(o.schedule)},
            {"min_lr_ratio", o.min_lr_ratio}, {"beta1", o.adam.beta1}, {"beta2", o.adam.beta2}, {"eps", o.adam.eps},
            {"weight_decay", o.adam.weight_decay}, {"clip", o.clip}, {"seed", o.seed}};
  if (!o.settings.empty()) j["more"] = o.settings;
  if (o.scale_lr > 0) j["scale_lr"] = o.scale_lr;
  if (o.chat_template) j["chat_template"] = true;
  if (o.bf16_products) j["products"] = "bf16";
  return j.dump();
}

struct State {
  std::int64_t step = 0;
  std::int64_t cursor = 0;
  std::vector<std::string> log;  // the JSONL lines so far
};

void save_state(const std::string& path, const TrainableModel& model, const AdamW& opt, const State& state, const std::string& print) {
  io::StreamingSafetensorsWriter w;
  const auto& params = model.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    w.add("value." + p.name, Tensor::from_f32(p.value, p.shape));
    w.add("adam_m." + p.name, Tensor::from_f32(opt.first_moment(i), p.shape));
    w.add("adam_v." + p.name, Tensor::from_f32(opt.second_moment(i), p.shape));
  }
  std::string log;
  for (const auto& l : state.log) log += l + "\n";
  w.write(path, {{"mopt_train_step", std::to_string(state.step)},
                 {"mopt_train_cursor", std::to_string(state.cursor)},
                 {"mopt_train_settings", print},
                 {"mopt_train_log", log}});
}

State load_state(const std::string& path, TrainableModel& model, AdamW& opt, const std::string& print) {
  const auto file = io::SafetensorsFile::open(path);
  const auto& meta = file.metadata();
  auto field = [&](const std::string& key) -> const std::string& {
    const auto it = meta.find(key);
    if (it == meta.end()) fail("{}: not a mopt training state (no {})", path, key);
    return it->second;
  };
  if (field("mopt_train_settings") != print) {
    fail("{}: the state was saved by a run with other settings (data, steps, batch, schedule, optimizer, seed or quantization); "
         "resume with the same ones", path);
  }
  State s;
  s.step = std::stoll(field("mopt_train_step"));
  s.cursor = std::stoll(field("mopt_train_cursor"));
  const std::string& log = field("mopt_train_log");
  for (std::size_t start = 0; start < log.size();) {
    const std::size_t end = log.find('\n', start);
    s.log.push_back(log.substr(start, end - start));
    start = end == std::string::npos ? log.size() : end + 1;
  }
  auto& params = model.parameters();
  for (std::size_t i = 0; i < params.size(); ++i) {
    auto& p = params[i];
    auto read = [&](const std::string& name, std::vector<float>& into) {
      const Tensor t = file.tensor(name);
      if (t.dtype() != DType::F32 || t.shape() != p.shape) fail("{}: {} is not f32 of the model's shape", path, name);
      into = t.to_f32();
    };
    read("value." + p.name, p.value);
    read("adam_m." + p.name, opt.first_moment(i));
    read("adam_v." + p.name, opt.second_moment(i));
  }
  opt.set_steps(s.step);
  return s;
}

// The mean cross-entropy over the validation targets and its standard error (over tokens).
struct Validation {
  double loss = 0, stderr_ = 0;
};

Validation validation_loss(TrainableModel& model, const std::vector<Example>& examples, std::int64_t batch) {
  double sum = 0, squares = 0;
  std::int64_t targets = 0;
  for (std::size_t i = 0; i < examples.size(); i += static_cast<std::size_t>(batch)) {
    std::vector<std::int64_t> idx;
    for (std::size_t j = i; j < std::min(examples.size(), i + static_cast<std::size_t>(batch)); ++j) idx.push_back(static_cast<std::int64_t>(j));
    const LossResult r = model.loss(make_batch(examples, idx));
    sum += r.loss_sum;
    squares += r.cross_entropy_squares;
    targets += r.targets;
  }
  if (!std::isfinite(sum)) fail("validation: the loss is {} (NaN or Inf in the forward pass)", sum);
  if (targets == 0) return {};
  const double n = static_cast<double>(targets), mean = sum / n;
  return {mean, targets > 1 ? std::sqrt(std::max(0.0, squares / n - mean * mean) / (n - 1)) : 0.0};
}

void write_checkpoint(const TrainableModel& model, const TrainOptions& o, const State& state) {
  exporter::CheckpointDirWriter writer(o.out, std::uint64_t{2} << 30);
  for (const auto& p : model.parameters()) {
    Tensor t = Tensor::from_f32(p.value, p.shape);
    writer.add(p.name, o.dtype == DType::F32 ? t : t.to(o.dtype));
    writer.maybe_flush();
  }
  json config = model.config().raw;
  const char* dtype = o.dtype == DType::F32 ? "float32" : "bfloat16";
  if (config.contains("torch_dtype") || !config.contains("dtype")) config["torch_dtype"] = dtype;
  if (config.contains("dtype")) config["dtype"] = dtype;
  writer.write_json("config.json", config, 2);
  if (!o.tokenizer_dir.empty()) writer.copy_model_files(o.tokenizer_dir);
  std::string log;
  for (const auto& l : state.log) log += l + "\n";
  writer.write_text("train_log.jsonl", log);
  writer.write_text("loss_curve.svg", loss_curve_svg(state.log));
  writer.commit([](const std::string& dir) { io::Checkpoint::open(dir); });
}

}  // namespace

TrainSummary run_training(TrainableModel& model, const io::Tokenizer& tokenizer, const TrainOptions& o) {
  if (o.data.empty()) fail("training needs --data");
  if (o.batch < 1 || o.grad_accum < 1) fail("--batch and --grad-accum must be at least 1");
  if (!(o.lr > 0)) fail("--lr must be positive");
  if (o.out.empty()) fail("training needs --out");
  if (o.dtype != DType::BF16 && o.dtype != DType::F32) fail("--dtype: bf16 or f32");
  const auto& config = model.config();
  const std::int32_t eos = config.eos_token_ids.empty() ? -1 : static_cast<std::int32_t>(config.eos_token_ids.front());
  std::optional<io::ChatTemplate> chat;
  if (o.chat_template) chat = io::load_chat_template(o.tokenizer_dir);
  const io::ChatTemplate* chat_template = chat ? &*chat : nullptr;
  std::vector<Example> examples;
  for (const auto& path : o.data) {
    auto more = read_examples(path, tokenizer, o.seq_len, eos, chat_template);
    examples.insert(examples.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  }
  for (const auto& e : examples) {
    for (const auto t : e.tokens) {
      if (t >= config.vocab_size) fail("{}: the tokenizer gives token {}, outside the model's vocabulary of {}", o.data.front(), t, config.vocab_size);
    }
  }
  std::vector<Example> val = o.validation.empty() ? std::vector<Example>{} : read_examples(o.validation, tokenizer, o.seq_len, eos, chat_template);
  const std::int64_t per_step = o.batch * o.grad_accum;
  std::uint64_t params = 0;
  for (const auto& p : model.parameters()) params += static_cast<std::uint64_t>(p.numel());
  const std::int64_t total = o.steps > 0 ? o.steps
                                         : std::max<std::int64_t>(1, static_cast<std::int64_t>(std::ceil(o.epochs * static_cast<double>(examples.size()) /
                                                                                                        static_cast<double>(per_step))));
  const std::string state_path = o.state.empty() ? o.out + ".train-state.safetensors" : o.state;
  const std::string print = fingerprint(o, total, static_cast<std::int64_t>(examples.size()));

  model.set_recompute(o.recompute);
  model.set_bf16_products(o.bf16_products);
  AdamW opt(model.parameters(), o.adam, weight_decay_mask(model.parameters()));
  if (o.scale_lr > 0) {
    for (std::size_t i = 0; i < model.parameters().size(); ++i) {
      if (model.parameters()[i].name.ends_with(".weight_quantizer._amax")) opt.set_lr_scale(i, o.scale_lr / o.lr);
    }
  }
  DataOrder order(static_cast<std::int64_t>(examples.size()), o.seed);
  State state;
  if (o.resume) {
    if (!fs::exists(state_path)) fail("{}: no training state to resume from", state_path);
    state = load_state(state_path, model, opt, print);
    order.set_cursor(state.cursor);
    std::printf("resuming %s at step %lld of %lld\n", state_path.c_str(), static_cast<long long>(state.step),
                static_cast<long long>(total));
  }
  const char* products = !o.bf16_products ? "" : kernels::amx_bf16_products() ? ", bf16 products (AMX)" : ", bf16 products (rounded operands; no AMX here: slower than f32)";
  std::printf("training %s: %.1fM parameters in f32%s on %d threads; %zu examples of at most %lld tokens, %lld per step, %lld steps\n",
              o.label.empty() ? "a model" : o.label.c_str(), static_cast<double>(params) / 1e6, products, compute_threads(), examples.size(),
              static_cast<long long>(o.seq_len), static_cast<long long>(per_step), static_cast<long long>(total));
  std::fflush(stdout);
  std::FILE* live_log = nullptr;
  if (!o.log.empty()) {
    live_log = std::fopen(o.log.c_str(), "w");
    if (live_log == nullptr) fail("{}: cannot write the log", o.log);
    for (const auto& l : state.log) std::fprintf(live_log, "%s\n", l.c_str());
  }
  struct CloseLog {
    std::FILE* f;
    ~CloseLog() {
      if (f) std::fclose(f);
    }
  } close_log{live_log};

  TrainSummary summary;
  summary.examples = static_cast<std::int64_t>(examples.size());
  double tokens = 0, seconds = 0;
  // What a failed step leaves: the state saved last, if any.
  auto kept = [&] {
    if (fs::exists(state_path) && (o.save_every > 0 || o.resume)) return fmt::format("the training state {} is kept", state_path);
    return std::string("no training state was saved (--save-every N saves one)");
  };
  if (o.validate_at_start && !val.empty() && state.step == 0) {
    const Validation v = validation_loss(model, val, o.batch);
    summary.initial_val_loss = v.loss;
    summary.initial_val_stderr = v.stderr_;
    state.log.push_back(json{{"step", 0}, {"val_loss", v.loss}, {"val_loss_stderr", v.stderr_}}.dump());
    if (live_log) std::fprintf(live_log, "%s\n", state.log.back().c_str());
    std::printf("step 0: validation loss %.4f ± %.4f (before training)\n", v.loss, v.stderr_);
    std::fflush(stdout);
  } else if (o.validate_at_start) {
    for (const auto& l : state.log) {
      const json j = json::parse(l);
      if (j["step"].get<std::int64_t>() == 0 && j.contains("val_loss")) {
        summary.initial_val_loss = j["val_loss"].get<double>();
        summary.initial_val_stderr = j.value("val_loss_stderr", 0.0);
      }
    }
  }
  Progress progress("training", static_cast<std::uint64_t>(total - state.step), "steps");
  for (std::int64_t step = state.step; step < total; ++step) {
    const double start = now_seconds();
    model.zero_grad();
    std::vector<Batch> micro;
    std::int64_t targets = 0;
    for (std::int64_t a = 0; a < o.grad_accum; ++a) {
      micro.push_back(make_batch(examples, order.take(o.batch)));
      targets += micro.back().target_count();
    }
    double loss_sum = 0, ce_sum = 0;
    std::int64_t rows = 0;
    const float scale = targets > 0 ? 1.0f / static_cast<float>(targets) : 0.0f;
    for (const auto& b : micro) {
      const LossResult r = model.forward_backward(b, scale);
      loss_sum += r.loss_sum;
      ce_sum += r.cross_entropy_sum;
      rows += b.rows();
    }
    if (!std::isfinite(loss_sum)) fail("step {}: the loss is {}; {}", step + 1, loss_sum, kept());
    mask_gradients(model.parameters());
    const double norm = clip_gradients(model.parameters(), o.clip);
    if (!std::isfinite(norm)) {  // a NaN or Inf gradient (clipping scaled it into NaN, never into a number)
      for (const auto& p : model.parameters()) {
        if (std::any_of(p.grad.begin(), p.grad.end(), [](float g) { return !std::isfinite(g); })) {
          fail("step {}: the gradient of {} holds NaN or Inf; {}", step + 1, p.name, kept());
        }
      }
    }
    const double lr = learning_rate(o.lr, o.schedule, step, total, o.warmup, o.min_lr_ratio);
    opt.step(model.parameters(), lr);
    mask_values(model.parameters());
    const double elapsed = now_seconds() - start;
    tokens += static_cast<double>(rows);
    seconds += elapsed;
    const double loss = targets > 0 ? loss_sum / static_cast<double>(targets) : 0.0;
    json line = {{"step", step + 1}, {"lr", lr}, {"loss", loss}, {"grad_norm", norm}, {"tokens_per_s", static_cast<double>(rows) / elapsed}};
    if (ce_sum != loss_sum && targets > 0) line["cross_entropy"] = ce_sum / static_cast<double>(targets);  // distillation's objective is not it
    summary.final_train_loss = loss;
    const bool last = step + 1 == total;
    if (!val.empty() && (last || (o.eval_every > 0 && (step + 1) % o.eval_every == 0))) {
      const Validation v = validation_loss(model, val, o.batch);
      line["val_loss"] = v.loss;
      line["val_loss_stderr"] = v.stderr_;
      summary.final_val_loss = v.loss;
      summary.final_val_stderr = v.stderr_;
      progress.message(fmt::format("step {}/{}: train loss {:.4f}, validation loss {:.4f} ± {:.4f}", step + 1, total, loss, v.loss, v.stderr_));
    }
    state.log.push_back(line.dump());
    if (live_log) {
      std::fprintf(live_log, "%s\n", state.log.back().c_str());
      std::fflush(live_log);
    }
    state.step = step + 1;
    state.cursor = order.cursor();
    if (o.save_every > 0 && (state.step % o.save_every == 0 || last)) save_state(state_path, model, opt, state, print);
    progress.advance();
  }
  progress.finish();
  if (o.write_checkpoint) write_checkpoint(model, o, state);
  summary.log = state.log;
  summary.steps = state.step;
  summary.tokens_per_second = seconds > 0 ? tokens / seconds : 0.0;
  return summary;
}

std::string loss_curve_svg(const std::vector<std::string>& log) {
  std::vector<std::pair<std::int64_t, double>> train_curve, val_curve;
  for (const auto& l : log) {
    const json j = json::parse(l);
    if (j.contains("loss")) train_curve.emplace_back(j["step"].get<std::int64_t>(), j["loss"].get<double>());
    if (j.contains("val_loss")) val_curve.emplace_back(j["step"].get<std::int64_t>(), j["val_loss"].get<double>());
  }
  return loss_curve_svg(train_curve, val_curve);
}

std::string loss_curve_svg(const std::vector<std::pair<std::int64_t, double>>& train,
                           const std::vector<std::pair<std::int64_t, double>>& validation) {
  const double width = 720, height = 420, left = 70, right = 20, top = 30, bottom = 50;
  double max_step = 1, lo = 1e300, hi = -1e300;
  for (const auto* curve : {&train, &validation}) {
    for (const auto& [s, l] : *curve) {
      max_step = std::max(max_step, static_cast<double>(s));
      lo = std::min(lo, l);
      hi = std::max(hi, l);
    }
  }
  if (lo > hi) lo = 0, hi = 1;
  if (hi - lo < 1e-9) hi = lo + 1;
  const double pad = 0.05 * (hi - lo);
  lo -= pad;
  hi += pad;
  auto x = [&](double s) { return left + (width - left - right) * s / max_step; };
  auto y = [&](double l) { return top + (height - top - bottom) * (hi - l) / (hi - lo); };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      width, height);
  svg += fmt::format("<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">mopt train: loss (nats per token)</text>\n", width / 2);
  // Axes with five ticks each.
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{0}\" y2=\"{2}\" stroke=\"black\"/>\n", left, top, height - bottom);
  svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"black\"/>\n", left, height - bottom, width - right);
  for (int i = 0; i <= 4; ++i) {
    const double l = lo + (hi - lo) * i / 4.0, s = max_step * i / 4.0;
    svg += fmt::format("<line x1=\"{0}\" y1=\"{1:.1f}\" x2=\"{2}\" y2=\"{1:.1f}\" stroke=\"#ddd\"/><text x=\"{3}\" y=\"{4:.1f}\" text-anchor=\"end\">{5:.3f}</text>\n",
                       left, y(l), width - right, left - 6, y(l) + 4, l);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n", x(s), height - bottom + 18, s);
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (left + width - right) / 2, height - 10);
  auto polyline = [&](const std::vector<std::pair<std::int64_t, double>>& curve, const char* color) {
    if (curve.empty()) return;
    svg += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"", color);
    for (const auto& [s, l] : curve) svg += fmt::format("{:.1f},{:.1f} ", x(static_cast<double>(s)), y(l));
    svg += "\"/>\n";
    for (const auto& [s, l] : curve) {
      if (curve.size() <= 50) svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2.5\" fill=\"{}\"/>\n", x(static_cast<double>(s)), y(l), color);
    }
  };
  polyline(train, "#1f77b4");
  polyline(validation, "#d62728");
  svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">train</text>\n", width - right - 110, top + 16);
  if (!validation.empty()) svg += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#d62728\">validation</text>\n", width - right - 110, top + 32);
  svg += "</svg>\n";
  return svg;
}

}  // namespace mopt::train
