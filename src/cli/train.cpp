#include <fmt/format.h>

#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/thread_pool.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "io/tokenizer.h"
#include "train/model.h"
#include "train/trainer.h"

namespace mopt::cli {

namespace fs = std::filesystem;

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
  if (o.dtype == "bf16") t.dtype = DType::BF16;
  else if (o.dtype == "f32") t.dtype = DType::F32;
  else fail("--dtype {}: bf16 or f32", o.dtype);

  train::TrainableModel model = o.init.empty() ? train::TrainableModel::from_checkpoint(io::Checkpoint::open(o.model))
                                               : train::TrainableModel::initialize(io::load_model_config(o.init), t.seed);
  t.label = o.init.empty() ? o.model : o.init;
  const train::TrainSummary s = train::run_training(model, tokenizer, t);
  fmt::print("trained {} steps on {} examples: train loss {:.4f}", s.steps, s.examples, s.final_train_loss);
  if (s.final_val_loss >= 0) fmt::print(", validation loss {:.4f} (perplexity {:.2f})", s.final_val_loss, std::exp(s.final_val_loss));
  fmt::print(", {:.0f} tokens/s, peak memory {:.0f} MiB\nwrote {}\n", s.tokens_per_second,
             static_cast<double>(peak_rss_bytes()) / (1 << 20), t.out);
  return 0;
}

}  // namespace mopt::cli
