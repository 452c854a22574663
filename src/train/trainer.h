// `mopt train`: the training loop around TrainableModel and AdamW — micro-batches accumulated into
// optimizer steps, clipping, the schedule, validation every N steps, a JSONL log, a loss-curve
// picture, a training state saved atomically every N steps that a resumed run continues to the same
// bits, and the trained model written as a Hugging Face checkpoint with its tokenizer.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "io/tokenizer.h"
#include "train/model.h"
#include "train/optimizer.h"

namespace mopt::train {

struct TrainOptions {
  std::vector<std::string> data;  // .txt / .jsonl files
  std::string validation;         // a .txt / .jsonl file scored every eval_every steps and at the end; empty: none
  std::int64_t steps = 0;         // optimizer steps; 0: from epochs
  double epochs = 1.0;            // passes over the data when steps is 0
  std::int64_t batch = 8;         // sequences per micro-batch
  std::int64_t grad_accum = 1;    // micro-batches per optimizer step
  std::int64_t seq_len = 512;
  double lr = 1e-4;
  std::int64_t warmup = 0;
  Schedule schedule = Schedule::cosine;
  double min_lr_ratio = 0.1;
  AdamWSettings adam{0.9, 0.95, 1e-8, 0.0};
  double clip = 1.0;               // global gradient-norm limit; <= 0: none
  std::uint64_t seed = 0;
  std::int64_t eval_every = 0;     // 0: validation at the end only
  std::int64_t save_every = 0;     // training state every N steps (and at the end); 0: never
  bool recompute = false;
  bool bf16_products = false;      // mixed precision: TrainableModel::set_bf16_products
  std::string out;                 // the checkpoint directory to create
  std::string state;               // the training state file (default: OUT.train-state.safetensors)
  bool resume = false;             // continue from the state file
  DType dtype = DType::BF16;       // of the written weights: bf16 or f32
  std::string tokenizer_dir;       // tokenizer.json (and its companions) copied from here
  bool chat_template = false;      // render .jsonl pairs and conversations with tokenizer_dir's chat template
  std::string log;                 // a JSONL copy of the log written as training runs; empty: none
  std::string label;               // what is trained, for the first line on stdout
  double scale_lr = 0;             // the learning rate of learned quantization scales (QAT's LSQ); 0: lr
  bool write_checkpoint = true;    // false: the caller writes the model (QAT's export); the log is in the summary
  bool validate_at_start = false;  // score --val before the first step too (QAT: the PTQ model's loss)
  std::string settings;            // more settings that decide the bits (QAT's recipe), for the resume check
};

struct TrainSummary {
  std::int64_t steps = 0;
  double final_train_loss = 0;
  double final_val_loss = -1;      // < 0: no validation
  double final_val_stderr = 0;     // its standard error over the scored tokens
  double initial_val_loss = -1;    // before the first step (validate_at_start); < 0: not measured
  double initial_val_stderr = 0;
  double tokens_per_second = 0;    // trained tokens (every row, targets or not) per second
  std::int64_t examples = 0;
  std::vector<std::string> log;    // the JSONL lines
};

// Trains `model` and writes it to options.out. Throws Error (the last saved state kept) for bad
// input, a NaN or Inf loss or gradient (naming the step and the tensor), or a failed write.
TrainSummary run_training(TrainableModel& model, const io::Tokenizer& tokenizer, const TrainOptions& options);

// The loss curve of a log's JSONL lines as an SVG picture.
std::string loss_curve_svg(const std::vector<std::string>& log);

// The loss curve as an SVG picture: train loss per step, validation loss per evaluation.
std::string loss_curve_svg(const std::vector<std::pair<std::int64_t, double>>& train,
                           const std::vector<std::pair<std::int64_t, double>>& validation);

}  // namespace mopt::train
