// The subcommands of the mopt program. Each is thin: it parses nothing itself
// (main.cpp does) and calls into the library.
#pragma once

#include <cstdint>
#include <string>

#include "kernels/gemm.h"
#include "train/trainer.h"
#include <vector>

namespace mopt::model {
class Model;
}

namespace mopt::cli {

// Says on stderr, once per Linear of `m` (loaded from `path`), which ones run the plain loops rather
// than a vectorized kernel and why: "mopt: note: PATH: model.layers.3.mlp.down_proj: int4 g48 runs the
// plain loop: no AVX2 kernel for groups of 48 (it takes multiples of 32)". Nothing when all are vectorized.
void report_plain_loops(const model::Model& m, const std::string& path);

struct InspectOptions {
  std::string path;
  bool tensors = false;
  bool json = false;
  bool sparsity = false;  // read every Linear and report which are 2:4 sparse
};
int run_inspect(const InspectOptions& options);

struct TokenizeOptions {
  std::string tokenizer;  // tokenizer.json or a model directory
  std::string text;
  bool special = false;  // add the post-processor's special tokens (BOS, ...)
};
int run_tokenize(const TokenizeOptions& options);

struct DetokenizeOptions {
  std::string tokenizer;
  std::string ids;  // "1,2,3" or "[1, 2, 3]"
  bool skip_special = false;
};
int run_detokenize(const DetokenizeOptions& options);
struct ConvertOptions {
  std::string gguf;
  std::string out_dir;
};
int run_convert(const ConvertOptions& options);

struct ExportOptions {
  std::string model;
  std::string to;  // "gguf", "compressed-tensors"
  std::string out;
  std::string type = "bf16";
};
int run_export(const ExportOptions& options);

struct BenchCliOptions {
  std::vector<std::string> models;
  std::string base;  // the 16-bit baseline; default: the first model, dequantized to bf16
  std::string batches = "1,32,64";
  std::int64_t prompt = 512;
  std::int64_t gen = 128;
  int threads = 0;  // 0: OpenMP's default (every core)
  int rounds = 3;
  bool json = false;
  bool no_rss = false;  // skip the per-model peak-RSS processes
  // Internal: print this model's peak RSS per batch as JSON and exit (run in a child process).
  bool probe_rss = false;
  bool probe_as_baseline = false;
  std::string products = "bf16";
};
int run_bench(const BenchCliOptions& options, const std::string& self_path);

struct CreateRandomOptions {
  std::string like;
  std::string out;
  std::string tokenizer;
  std::uint64_t seed = 0;
};
int run_create_random(const CreateRandomOptions& options);

struct EvalOptions {
  std::string model;
  std::string base;  // kld
  std::string text;  // ppl, kld
  std::string data;  // mc
  std::int64_t ctx = 0;     // 0: min(512, the model's context)
  std::int64_t stride = 0;  // 0: the context
  std::int64_t shots = 0;
  bool json = false;
  bool fake_quant = false;  // dequantized weights with fake-quantized inputs instead of the quantized kernels
  bool decode = false;      // ppl: one token at a time through the KV cache
  std::string token_nll;    // ppl: write each scored token's position and NLL here
  std::string products = "bf16";  // bf16 or f32 (kernels::Precision); --fake-quant runs f32 weights, always f32
  std::int64_t seq_len = 512;     // loss: an example's tokens at most (as training cuts them)
  bool chat_template = false;     // loss: records in the model directory's chat template, as mopt train --chat-template
};
int run_eval_ppl(const EvalOptions& options);
int run_eval_loss(const EvalOptions& options);
int run_eval_kld(const EvalOptions& options);
int run_eval_mc(const EvalOptions& options);

struct GenerateCliOptions {
  std::string model;
  std::string prompt;
  std::int64_t max_tokens = 128;
  float temperature = 0.0f;
  float top_p = 1.0f;
  std::uint64_t seed = 0;
  std::string products = "bf16";
};
int run_generate(const GenerateCliOptions& options);

struct QuantizeOptions {
  std::string model;
  std::string out_dir;
  std::string format;
  std::string recipe;       // JSON recipe file
  std::string algo;         // "" = the format's default
  std::string kv_cache;     // "", "fp8", "nvfp4"
  std::string calibrator;   // "" = max
  double percentile = 0.0;  // 0 = 99.99 (or the recipe's)
  std::vector<std::string> calib;  // text / .jsonl files
  std::int64_t calib_size = 0;     // 0 = 128 (or the recipe's)
  std::int64_t seq_len = 0;        // 0 = 512 (or the recipe's)
  std::int64_t seed = -1;          // -1 = 0 (or the recipe's)
  std::int64_t group_size = 0;
  std::int64_t calib_batch = 1;
  std::vector<std::string> exclude;
  std::vector<std::string> overrides;  // "glob=format"
  bool propagate_quantized = false;
  bool quantize_lm_head = false;
  double gptq_damp = 0.01;
  bool gptq_act_order = false;
  std::string report;  // JSON report path
  std::string export_format = "modelopt";  // modelopt, compressed-tensors, gguf
  std::string gguf_type;                   // "" = q4_0 for 4-bit formats, q8_0 otherwise
  std::string sparsity;                    // "" or "2:4"
  std::string sparse_algo;                 // "" = magnitude (or the recipe's)
  std::vector<std::string> sparse_exclude; // globs left dense
  // Mixed precision (--auto-bits > 0): a format per group of Linears from auto_formats under an
  // effective-bits budget, scored by auto_method on the first auto_score_size calibration samples;
  // the scores saved to / read from auto_state.
  double auto_bits = 0.0;
  std::string auto_formats = "nvfp4_awq,fp8";
  std::string auto_method = "gradient";
  std::string auto_state;
  std::int64_t auto_score_size = 8;
};
int run_quantize(const QuantizeOptions& options);
// `mopt quantize --auto-bits` (cli/auto_quantize.cpp); run_quantize hands over to it.
int run_auto_quantize(const QuantizeOptions& options);

struct TrainCliOptions {
  std::string model;      // a Hugging Face checkpoint to fine-tune; empty with init
  std::string init;       // a config.json: a model from scratch (transformers' initialization)
  std::string tokenizer;  // a directory with tokenizer.json (default: the model's)
  std::string schedule = "cosine";
  std::string dtype = "bf16";
  std::string precision = "f32";  // of the products: f32, or bf16 (mixed precision)
  std::int64_t seed = 0;
  train::TrainOptions train;  // the rest, bound to the flags directly
  // Quantization-aware training (--qat FORMAT): the quantize flags that apply (format, algorithm,
  // group size, KV cache, calibration, export); qat.format empty: plain training.
  QuantizeOptions qat;
  std::string ste = "pass";     // pass or clip
  bool distill = false;         // QAD: distill from the unquantized model
  float kd_temperature = 1.0f;
  float kd_weight = 1.0f;       // the distillation loss's weight; 1 - it the cross-entropy's
  bool learn_scales = false;    // LSQ: integer block weights' amax trained (train.scale_lr their learning rate)
};
int run_train(const TrainCliOptions& options);

// "1,2,3", "[1, 2, 3]" or "1 2 3" -> ids; throws Error on anything else.
std::vector<std::int32_t> parse_ids(const std::string& text);

// "mopt 0.1.0" and the CPU features this build uses.
std::string version_text();

// --products bf16|f32 as a kernels::Precision (an error names anything else).
kernels::Precision parse_products(const std::string& value);

}  // namespace mopt::cli
