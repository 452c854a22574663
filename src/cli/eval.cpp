#include <fmt/format.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/progress.h"
#include "eval/generate.h"
#include "eval/loss.h"
#include "eval/multiple_choice.h"
#include "eval/perplexity.h"
#include "io/atomic_file.h"
#include "io/chat_template.h"
#include "io/json_util.h"
#include "load/load_model.h"
#include "model/llama.h"
#include "train/data.h"

namespace mopt::cli {

namespace {

using nlohmann::json;

std::vector<std::int32_t> tokenize_file(const model::Model& m, const std::string& path) {
  const std::string text = io::read_text_file(path);
  const auto tokens = m.require_tokenizer().encode(text, false);
  if (tokens.size() < 2) fail("{}: {} tokens is too little text to evaluate", path, tokens.size());
  return tokens;
}

// A Progress created on the first report (when the total is known).
struct LazyProgress {
  std::string stage, unit;
  std::unique_ptr<Progress> bar;
  eval::ProgressFn fn() {
    return [this](std::size_t done, std::size_t total) {
      if (!bar) bar = std::make_unique<Progress>(stage, total, unit);
      bar->advance(done - previous);
      previous = done;
    };
  }
  void finish() {
    if (bar) bar->finish();
  }
  std::size_t previous = 0;
};

std::int64_t default_ctx(const model::Model& m, std::int64_t requested) {
  if (requested > 0) return requested;
  return std::min<std::int64_t>(512, m.config().max_position_embeddings);
}

json ppl_json(const eval::PerplexityResult& r) {
  return {{"perplexity", r.perplexity}, {"nll_sum", r.nll_sum}, {"scored_tokens", r.scored_tokens},
          {"total_tokens", r.total_tokens}, {"seconds", r.seconds}, {"tokens_per_second", r.tokens_per_second}};
}

}  // namespace

void report_plain_loops(const model::Model& m, const std::string& path) {
  for (const auto& l : m.plain_loop_linears()) fmt::print(stderr, "mopt: note: {}: {}\n", path, l.notice());
}

// The model, with its plain-loop Linears reported.
static model::Model load_reported(const std::string& path, load::QuantizedRun run = load::QuantizedRun::kernels) {
  model::Model m = load::load_model(path, run);
  report_plain_loops(m, path);
  return m;
}

static load::QuantizedRun run_of(const EvalOptions& o) { return o.fake_quant ? load::QuantizedRun::fake_quant : load::QuantizedRun::kernels; }

kernels::Precision parse_products(const std::string& value) {
  if (value == "bf16") return kernels::Precision::bf16;
  if (value == "f32") return kernels::Precision::f32;
  fail("--products {}: expected bf16 or f32", value);
}

// The model as the evaluation runs it: quantized kernels or the definition, products as asked.
static model::Model load_for_eval(const std::string& dir, const EvalOptions& o) {
  const kernels::Precision products = parse_products(o.products);
  model::Model m = load_reported(dir, run_of(o));
  m.set_precision(products);
  return m;
}

int run_eval_ppl(const EvalOptions& o) {
  auto m = load_for_eval(o.model, o);
  const auto tokens = tokenize_file(m, o.text);
  const std::int64_t ctx = default_ctx(m, o.ctx);
  const std::int64_t stride = o.stride > 0 ? o.stride : ctx;
  // Opened first: an unwritable path fails before the evaluation, not after it.
  std::optional<io::AtomicFileWriter> token_nll_out;
  if (!o.token_nll.empty()) token_nll_out.emplace(o.token_nll);
  LazyProgress progress{"perplexity", "windows", nullptr};
  const auto r = eval::perplexity(m, tokens, ctx, stride, progress.fn(), o.decode ? eval::WindowRun::decode : eval::WindowRun::prefill);
  progress.finish();
  if (token_nll_out) {
    std::string lines;
    for (const auto& t : r.token_nll) lines += fmt::format("{}\t{:.17g}\n", t.position, t.nll);
    token_nll_out->write(lines);
    token_nll_out->commit();
  }
  if (o.json) {
    json j = ppl_json(r);
    j["model"] = o.model;
    j["text"] = o.text;
    j["ctx"] = ctx;
    j["stride"] = stride;
    fmt::print("{}\n", j.dump(2));
  } else {
    fmt::print("perplexity {:.4f} over {} scored tokens of {} (ctx {}, stride {}), {:.1f} tokens/s\n", r.perplexity,
               r.scored_tokens, r.total_tokens, ctx, stride, r.tokens_per_second);
  }
  return 0;
}

int run_eval_loss(const EvalOptions& o) {
  auto m = load_for_eval(o.model, o);
  const auto& c = m.config();
  const std::int32_t eos = c.eos_token_ids.empty() ? -1 : static_cast<std::int32_t>(c.eos_token_ids.front());
  std::optional<io::ChatTemplate> chat;
  if (o.chat_template) {
    if (!std::filesystem::is_directory(o.model)) fail("--chat-template: {} is not a model directory (its chat template is read from there)", o.model);
    chat = io::load_chat_template(o.model);
  }
  std::vector<eval::ScoredSequence> sequences;
  for (auto& e : train::read_examples(o.data, m.require_tokenizer(), o.seq_len, eos, chat ? &*chat : nullptr)) {
    for (const std::int32_t t : e.tokens) {
      if (t >= c.vocab_size) fail("{}: the tokenizer gives token {}, outside the model's vocabulary of {}", o.data, t, c.vocab_size);
    }
    sequences.push_back({std::move(e.tokens), std::move(e.targets)});
  }
  LazyProgress progress{"loss", "examples", nullptr};
  const auto r = eval::sequence_loss(m, sequences, progress.fn());
  progress.finish();
  // Against a base on the same tokens: the mean difference and its paired standard error.
  std::optional<eval::LossResult> base;
  double diff = 0, diff_stderr = 0;
  if (!o.base.empty()) {
    auto b = load_for_eval(o.base, o);
    if (b.config().vocab_size != c.vocab_size) fail("{}: vocabulary {} is not {}'s {}", o.base, b.config().vocab_size, o.model, c.vocab_size);
    LazyProgress base_progress{"loss (base)", "examples", nullptr};
    base = eval::sequence_loss(b, sequences, base_progress.fn());
    base_progress.finish();
    double sum = 0, squares = 0;
    for (std::size_t i = 0; i < r.token_nll.size(); ++i) {
      const double d = r.token_nll[i] - base->token_nll[i];
      sum += d;
      squares += d * d;
    }
    const double n = static_cast<double>(r.token_nll.size());
    diff = sum / n;
    diff_stderr = n > 1 ? std::sqrt(std::max(0.0, squares / n - diff * diff) / (n - 1)) : 0.0;
  }
  if (o.json) {
    json j = {{"model", o.model}, {"data", o.data}, {"seq_len", o.seq_len}, {"loss", r.mean}, {"stderr", r.stderr_},
              {"perplexity", std::exp(r.mean)}, {"scored_tokens", r.scored_tokens}, {"examples", r.sequences}, {"seconds", r.seconds}};
    if (base) {
      j["base"] = o.base;
      j["base_loss"] = base->mean;
      j["base_stderr"] = base->stderr_;
      j["difference"] = diff;
      j["difference_stderr"] = diff_stderr;
    }
    fmt::print("{}\n", j.dump(2));
  } else {
    fmt::print("loss {:.4f} ± {:.4f} (perplexity {:.2f}) over {} scored tokens of {} examples\n", r.mean, r.stderr_, std::exp(r.mean),
               r.scored_tokens, r.sequences);
    if (base) {
      fmt::print("base {:.4f} ± {:.4f}; difference {:+.4f} ± {:.4f} (paired, same tokens)\n", base->mean, base->stderr_, diff, diff_stderr);
    }
  }
  return 0;
}

int run_eval_kld(const EvalOptions& o) {
  if (o.base.empty()) fail("eval kld needs --base BASE_MODEL");
  auto m = load_for_eval(o.model, o);
  auto base = load_for_eval(o.base, o);
  const auto tokens = tokenize_file(base, o.text);
  const std::int64_t ctx = default_ctx(base, o.ctx);
  const std::int64_t stride = o.stride > 0 ? o.stride : ctx;
  LazyProgress progress{"kl-divergence", "windows", nullptr};
  const auto r = eval::kl_divergence(m, base, tokens, ctx, stride, progress.fn());
  progress.finish();
  const double dppl = r.model.perplexity - r.base.perplexity;
  if (o.json) {
    json j = {{"model", o.model}, {"base", o.base}, {"text", o.text}, {"ctx", ctx}, {"stride", stride},
              {"positions", r.positions}, {"mean_kld", r.mean_kld}, {"median_kld", r.median_kld}, {"p90_kld", r.p90_kld},
              {"p95_kld", r.p95_kld}, {"p99_kld", r.p99_kld}, {"p999_kld", r.p999_kld}, {"max_kld", r.max_kld},
              {"top1_agreement", r.top1_agreement}, {"delta_ppl", dppl}, {"model_ppl", ppl_json(r.model)}, {"base_ppl", ppl_json(r.base)},
              {"kld_stderr", r.kld_stderr}, {"mean_delta_nll", r.mean_dnll}, {"delta_nll_stderr", r.dnll_stderr}};
    fmt::print("{}\n", j.dump(2));
  } else {
    fmt::print("positions      {}\n", r.positions);
    fmt::print("ppl(base)      {:.4f}\nppl(model)     {:.4f}\ndelta ppl      {:+.4f} ({:+.2f}%)\n", r.base.perplexity,
               r.model.perplexity, dppl, 100.0 * dppl / r.base.perplexity);
    // ln(ppl ratio) is the mean per-token NLL difference; its paired standard error says whether it is noise.
    fmt::print("ln ppl ratio   {:+.4f} ± {:.4f} (per-token NLL difference, paired standard error)\n", r.mean_dnll, r.dnll_stderr);
    fmt::print("mean KLD       {:.6f} ± {:.6f}\nmedian KLD     {:.6f}\n90% KLD        {:.6f}\n95% KLD        {:.6f}\n99% KLD        {:.6f}\n"
               "99.9% KLD      {:.6f}\nmax KLD        {:.6f}\ntop-1 agree    {:.2f}%\n",
               r.mean_kld, r.kld_stderr, r.median_kld, r.p90_kld, r.p95_kld, r.p99_kld, r.p999_kld, r.max_kld, 100.0 * r.top1_agreement);
  }
  return 0;
}

int run_eval_mc(const EvalOptions& o) {
  auto m = load_for_eval(o.model, o);
  const auto questions = eval::parse_mc_csv(io::read_text_file(o.data), o.data);
  LazyProgress progress{"multiple-choice", "questions", nullptr};
  const auto r = eval::multiple_choice(m, questions, o.shots, progress.fn());
  progress.finish();
  if (o.json) {
    fmt::print("{}\n", json{{"model", o.model}, {"data", o.data}, {"shots", o.shots}, {"questions", r.questions},
                            {"correct", r.correct}, {"accuracy", r.accuracy}, {"seconds", r.seconds}}
                           .dump(2));
  } else {
    fmt::print("accuracy {:.2f}% ({} of {} questions, {} shots) in {:.1f} s\n", 100.0 * r.accuracy, r.correct, r.questions,
               o.shots, r.seconds);
  }
  return 0;
}

int run_generate(const GenerateCliOptions& o) {
  const kernels::Precision products = parse_products(o.products);
  auto m = load_reported(o.model);
  m.set_precision(products);
  const auto& tok = m.require_tokenizer();
  const auto prompt = tok.encode(o.prompt, true);
  eval::GenerateOptions g;
  g.max_tokens = o.max_tokens;
  g.temperature = o.temperature;
  g.top_p = o.top_p;
  g.seed = o.seed;
  if (g.max_tokens < 1) fail("--max-tokens must be at least 1");
  if (g.temperature < 0) fail("--temp must not be negative");
  if (!(g.top_p > 0 && g.top_p <= 1)) fail("--top-p must be in (0, 1]");
  eval::GenerateStats stats;
  fmt::print("{}", o.prompt);
  std::fflush(stdout);
  eval::generate(m, prompt, g, [](std::string_view piece) {
    fmt::print("{}", piece);
    std::fflush(stdout);
  }, &stats);
  fmt::print("\n");
  std::fflush(stdout);
  fmt::print(stderr, "prompt {} tokens in {:.2f} s ({:.1f} tokens/s); generated {} tokens in {:.2f} s ({:.1f} tokens/s)\n",
             stats.prompt_tokens, stats.prefill_seconds, static_cast<double>(stats.prompt_tokens) / std::max(stats.prefill_seconds, 1e-9),
             stats.generated_tokens, stats.decode_seconds,
             static_cast<double>(stats.generated_tokens) / std::max(stats.decode_seconds, 1e-9));
  return 0;
}

}  // namespace mopt::cli
