// mopt: the command-line program. Parses arguments, runs one subcommand, and
// turns every failure into one line `mopt: error: <message>` and exit code 1
// (2 for a malformed command line).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>

#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <exception>
#include <new>

#include "cli/commands.h"
#include "core/signal_cleanup.h"
#include "core/startup_settings.h"
#include "core/thread_pool.h"
#include "kernels/gemm.h"
#include "core/convert.h"
#include "core/cpu_features.h"
#include "core/error.h"
#include "io/json_util.h"

namespace mopt::cli {

std::string version_text() {
  return fmt::format("mopt {}\ncpu: {}\nconversions: {}\ngemm: {}\nthreads: {}", MOPT_VERSION, describe(cpu_features()), convert_isa(),
                     kernels::describe_gemm(), describe_compute_threads());
}

}  // namespace mopt::cli

namespace {

int report_error(const char* message) {
  std::fprintf(stderr, "mopt: error: %s\n", mopt::io::printable(message).c_str());
  return 1;
}

struct Commands {
  mopt::cli::InspectOptions inspect;
  mopt::cli::TokenizeOptions tokenize;
  mopt::cli::DetokenizeOptions detokenize;
  mopt::cli::ConvertOptions convert;
  mopt::cli::ExportOptions export_options;
  mopt::cli::EvalOptions eval;
  mopt::cli::BenchCliOptions bench;
  mopt::cli::CreateRandomOptions create_random;
  mopt::cli::GenerateCliOptions gen;
  mopt::cli::QuantizeOptions quantize;
  mopt::cli::TrainCliOptions train;
  CLI::App* inspect_cmd = nullptr;
  CLI::App* tokenize_cmd = nullptr;
  CLI::App* detokenize_cmd = nullptr;
  CLI::App* convert_cmd = nullptr;
  CLI::App* export_cmd = nullptr;
  CLI::App* eval_cmd = nullptr;
  CLI::App* ppl_cmd = nullptr;
  CLI::App* kld_cmd = nullptr;
  CLI::App* loss_cmd = nullptr;
  CLI::App* mc_cmd = nullptr;
  CLI::App* bench_cmd = nullptr;
  CLI::App* random_cmd = nullptr;
  CLI::App* gen_cmd = nullptr;
  CLI::App* quantize_cmd = nullptr;
  CLI::App* train_cmd = nullptr;
};

void add_inspect(CLI::App& app, Commands& c) {
  c.inspect_cmd = app.add_subcommand("inspect", "Describe a model directory or a .safetensors file");
  c.inspect_cmd->add_option("path", c.inspect.path, "Model directory or .safetensors file")->required();
  c.inspect_cmd->add_flag("--tensors", c.inspect.tensors, "List every tensor");
  c.inspect_cmd->add_flag("--json", c.inspect.json, "Print JSON instead of text");
  c.inspect_cmd->add_flag("--sparsity", c.inspect.sparsity, "Read every decoder Linear (dequantized) and count the 2:4 sparse ones");
}

void add_tokenizer_commands(CLI::App& app, Commands& c) {
  c.tokenize_cmd = app.add_subcommand("tokenize", "Print the token ids of a text as a JSON array");
  c.tokenize_cmd->add_option("tokenizer", c.tokenize.tokenizer, "tokenizer.json, a model directory or a .gguf file")->required();
  c.tokenize_cmd->add_option("--text", c.tokenize.text, "The text to encode")->required();
  c.tokenize_cmd->add_flag("--special", c.tokenize.special, "Add the special tokens the tokenizer's post-processor adds (BOS, ...)");
  c.detokenize_cmd = app.add_subcommand("detokenize", "Print the text of token ids");
  c.detokenize_cmd->add_option("tokenizer", c.detokenize.tokenizer, "tokenizer.json, a model directory or a .gguf file")->required();
  c.detokenize_cmd->add_option("--ids", c.detokenize.ids, "Token ids: 1,2,3")->required();
  c.detokenize_cmd->add_flag("--skip-special", c.detokenize.skip_special, "Leave out special tokens");
}

void add_convert_and_export(CLI::App& app, Commands& c) {
  c.convert_cmd = app.add_subcommand("convert", "Convert a llama.cpp GGUF model into a Hugging Face checkpoint directory");
  c.convert_cmd->add_option("gguf", c.convert.gguf, "The .gguf file")->required();
  c.convert_cmd->add_option("out_dir", c.convert.out_dir, "The directory to create")->required();
  c.export_cmd = app.add_subcommand("export", "Write a checkpoint (plain, or mopt's quantized export) in another engine's format");
  c.export_cmd->add_option("model", c.export_options.model, "Model directory (Hugging Face checkpoint, or a mopt quantized export)")->required();
  c.export_cmd->add_option("--to", c.export_options.to, "Target format: gguf (llama.cpp) or compressed-tensors (vLLM; quantized input only)")->required();
  c.export_cmd->add_option("out", c.export_options.out, "The file (gguf) or directory (compressed-tensors) to create")->required();
  c.export_cmd->add_option("--type", c.export_options.type, "GGUF weight type: bf16 (default), f16, f32; llama-quantize's mixes q8_0, q5_0, q4_0, q6_k, q4_k_m (its type for each tensor: Q6_K head); every matrix in one type: q4_0_pure, q5_0_pure (llama-quantize --pure), q4_k; nvfp4, mxfp4 (from such a quantized export); native (a type per quantized Linear: its own codes where a GGUF type holds them, else Q8_0; for mixed precision)");
}

void add_eval(CLI::App& app, Commands& c) {
  c.eval_cmd = app.add_subcommand("eval", "Measure a model: perplexity, KL divergence against a base, multiple choice");
  c.eval_cmd->require_subcommand(1);
  c.ppl_cmd = c.eval_cmd->add_subcommand("ppl", "Perplexity on a text file (Hugging Face's sliding-window procedure)");
  c.ppl_cmd->add_option("model", c.eval.model, "Model directory")->required();
  c.ppl_cmd->add_option("--text", c.eval.text, "UTF-8 text file")->required();
  c.kld_cmd = c.eval_cmd->add_subcommand("kld", "KL divergence of the model's token distributions from a base model's");
  c.kld_cmd->add_option("model", c.eval.model, "Model directory")->required();
  c.kld_cmd->add_option("--base", c.eval.base, "The base (reference) model directory")->required();
  c.kld_cmd->add_option("--text", c.eval.text, "UTF-8 text file")->required();
  for (auto* cmd : {c.ppl_cmd, c.kld_cmd}) {
    cmd->add_option("--ctx", c.eval.ctx, "Window length in tokens (default min(512, the model's context))");
    cmd->add_option("--stride", c.eval.stride, "Window step in tokens (default: the window length)");
  }
  c.loss_cmd = c.eval_cmd->add_subcommand("loss", "Loss on supervised examples (.jsonl prompt/response: the response's tokens; text: every token), as training validates");
  c.loss_cmd->add_option("model", c.eval.model, "Model directory or .gguf file")->required();
  c.loss_cmd->add_option("--data", c.eval.data, ".jsonl ({\"prompt\",\"response\"} or {\"text\"}) or .txt, read as mopt train reads it")->required();
  c.loss_cmd->add_option("--base", c.eval.base, "Also score this model on the same tokens: the difference and its paired standard error");
  c.loss_cmd->add_option("--seq-len", c.eval.seq_len, "Tokens per example at most, as in training (default 512)")->check(CLI::Range(2, 1 << 24));
  c.loss_cmd->add_flag("--chat-template", c.eval.chat_template, "Render pairs and {\"messages\"} records with the model's chat template, as mopt train --chat-template");
  c.mc_cmd = c.eval_cmd->add_subcommand("mc", "Multiple-choice accuracy on an MMLU-format CSV file");
  c.mc_cmd->add_option("model", c.eval.model, "Model directory")->required();
  c.mc_cmd->add_option("--data", c.eval.data, "CSV: question, A, B, C, D, answer letter")->required();
  c.mc_cmd->add_option("--shots", c.eval.shots, "Solved examples shown first (taken from the first rows)");
  for (auto* cmd : {c.ppl_cmd, c.kld_cmd, c.mc_cmd, c.loss_cmd}) {
    cmd->add_flag("--json", c.eval.json, "Print JSON");
    cmd->add_flag("--fake-quant", c.eval.fake_quant,
                  "Run a quantized checkpoint as dequantized weights with fake-quantized inputs (the definition) "
                  "instead of the quantized kernels");
  }
  for (auto* cmd : {c.ppl_cmd, c.kld_cmd, c.mc_cmd, c.loss_cmd}) {
    cmd->add_option("--products", c.eval.products,
                    "How 16-bit and quantized weights multiply in prefill: bf16 (default: bf16 operands, f32 sums, "
                    "where the CPU has AVX-512 BF16 that outruns its f32 FMAs; f32 elsewhere) or f32 (exact f32 products)");
  }
  c.ppl_cmd->add_flag("--decode", c.eval.decode, "Feed the text one token at a time through the KV cache (the decode kernels)");
  c.ppl_cmd->add_option("--token-nll", c.eval.token_nll,
                      "Write every scored token's position and negative log-likelihood (tab-separated, one per line) to "
                      "this file, to compare two runs token by token");
}

void add_bench_and_generate(CLI::App& app, Commands& c) {
  c.bench_cmd = app.add_subcommand("bench", "Prefill and decode speed and memory of models against their 16-bit baseline, "
                                                "with the quantized kernels");
  c.bench_cmd->add_option("models", c.bench.models, "Model directories (quantized exports or plain checkpoints)")->required()->expected(1, -1);
  c.bench_cmd->add_option("--base", c.bench.base, "The 16-bit baseline checkpoint (default: the first model dequantized to bf16)");
  c.bench_cmd->add_option("--batch", c.bench.batches, "Batch sizes, comma-separated (default 1,32,64)");
  c.bench_cmd->add_option("--prompt", c.bench.prompt, "Prompt tokens per sequence (default 512)");
  c.bench_cmd->add_option("--gen", c.bench.gen, "Decode steps (default 128)");
  c.bench_cmd->add_option("--threads", c.bench.threads, "Threads (default: MOPT_THREADS, else OMP_NUM_THREADS, else every core)")->check(CLI::Range(1, 4096));
  c.bench_cmd->add_option("--rounds", c.bench.rounds, "Rounds over all models; medians are reported (default 3)");
  c.bench_cmd->add_option("--products", c.bench.products, "bf16 (default, where the CPU has fast AVX-512 BF16) or f32, as for eval");
  c.bench_cmd->add_flag("--json", c.bench.json, "Print a JSON array, one object per (model, batch)");
  c.bench_cmd->add_flag("--no-rss", c.bench.no_rss, "Do not measure each model's peak RSS (in a process of its own)");
  c.bench_cmd->add_flag("--probe-rss", c.bench.probe_rss)->group("");
  c.bench_cmd->add_flag("--probe-as-baseline", c.bench.probe_as_baseline)->group("");
  c.random_cmd = app.add_subcommand("create-random", "Write a checkpoint of a real model's shape with random bf16 weights (for speed work)");
  c.random_cmd->add_option("--like", c.create_random.like, "llama-3.2-1b, llama-3.2-3b, llama-3-8b, mistral-7b, tiny-kjv")->required();
  c.random_cmd->add_option("out", c.create_random.out, "The directory to create")->required();
  c.random_cmd->add_option("--tokenizer", c.create_random.tokenizer, "Copy tokenizer.json (and its config) from this model directory");
  c.random_cmd->add_option("--seed", c.create_random.seed, "Seed (default 0)");
  c.gen_cmd = app.add_subcommand("generate", "Continue a prompt, streaming the text");
  c.gen_cmd->add_option("model", c.gen.model, "Model directory")->required();
  c.gen_cmd->add_option("--prompt", c.gen.prompt, "The prompt")->required();
  c.gen_cmd->add_option("--max-tokens", c.gen.max_tokens, "Tokens to generate (default 128)");
  c.gen_cmd->add_option("--temp", c.gen.temperature, "Sampling temperature; 0 is greedy (default)");
  c.gen_cmd->add_option("--top-p", c.gen.top_p, "Nucleus sampling threshold (default 1)");
  c.gen_cmd->add_option("--seed", c.gen.seed, "Random seed for sampling");
  c.gen_cmd->add_option("--products", c.gen.products, "bf16 (default, where the CPU has fast AVX-512 BF16) or f32, as for eval");
}

void add_quantize(CLI::App& app, Commands& c) {
  c.quantize_cmd = app.add_subcommand("quantize", "Quantize a model layer by layer and export it (modelopt, compressed-tensors or GGUF)");
  c.quantize_cmd->add_option("model", c.quantize.model, "Model directory (Hugging Face checkpoint)")->required();
  c.quantize_cmd->add_option("--out", c.quantize.out_dir, "The directory to create")->required();
  c.quantize_cmd->add_option("--format", c.quantize.format,
                           "fp8, fp8_pc_pt, fp8_block, int8, int8_sq, int8_wo, int4_rtn, int4_awq, w4a8_awq, nvfp4, nvfp4_awq, mxfp8, mxfp4, "
                           "or none (with --sparsity: prune only)");
  c.quantize_cmd->add_option("--recipe", c.quantize.recipe, "A JSON recipe (format, overrides, exclusions, calibration); flags override it");
  c.quantize_cmd->add_option("--algo", c.quantize.algo, "max (round-to-nearest), smoothquant, awq_lite, awq_clip, awq_full, gptq, awq_lite+gptq "
                           "(default: the format's: smoothquant for int8_sq, awq_lite for int4_awq, w4a8_awq, nvfp4_awq, else max)");
  c.quantize_cmd->add_option("--kv-cache", c.quantize.kv_cache, "Quantize the KV cache too: fp8 or nvfp4");
  c.quantize_cmd->add_option("--calib", c.quantize.calib, "Calibration text: .txt files or .jsonl with a \"text\" field")->expected(1, -1);
  c.quantize_cmd->add_option("--calib-size", c.quantize.calib_size, "Calibration samples (default 128)");
  c.quantize_cmd->add_option("--seq-len", c.quantize.seq_len, "Tokens per calibration sample (default 512)");
  c.quantize_cmd->add_option("--seed", c.quantize.seed, "Seed for choosing the samples (default 0)");
  c.quantize_cmd->add_option("--calib-batch", c.quantize.calib_batch, "Samples per forward call during calibration (default 1)");
  c.quantize_cmd->add_option("--calibrator", c.quantize.calibrator, "Activation amax: max (default), percentile, mse, entropy");
  c.quantize_cmd->add_option("--percentile", c.quantize.percentile, "Percentile for --calibrator percentile (default 99.99)");
  c.quantize_cmd->add_option("--group-size", c.quantize.group_size, "INT4 group size (default 128)");
  c.quantize_cmd->add_option("--exclude", c.quantize.exclude, "Leave modules matching this glob unquantized (repeatable)");
  c.quantize_cmd->add_option("--override", c.quantize.overrides, "GLOB=FORMAT: another format (or none) for matching modules (repeatable)");
  c.quantize_cmd->add_flag("--quantize-lm-head", c.quantize.quantize_lm_head,
                         "Quantize the lm_head too (default: 16-bit, as the reference) with the same algorithm, its input scale folded into the final norm; modelopt export only");
  c.quantize_cmd->add_flag("--propagate-quantized", c.quantize.propagate_quantized,
                         "Feed each layer the quantized previous layer's outputs (default: the unquantized ones, as the reference)");
  c.quantize_cmd->add_option("--gptq-damp", c.quantize.gptq_damp, "GPTQ damping as a fraction of the Hessian's mean diagonal (default 0.01)");
  c.quantize_cmd->add_flag("--gptq-act-order", c.quantize.gptq_act_order, "GPTQ: columns by decreasing Hessian diagonal (default: natural order, as the reference)");
  c.quantize_cmd->add_option("--report", c.quantize.report, "Write a JSON report here");
  c.quantize_cmd->add_option("--export", c.quantize.export_format,
                           "Output format: modelopt (default: TensorRT-LLM, vLLM, SGLang), compressed-tensors (vLLM), gguf (llama.cpp; --out is the .gguf file)");
  c.quantize_cmd->add_option("--sparsity", c.quantize.sparsity, "2:4: prune every decoder Linear to 2 of each 4 weights before quantizing (lm_head excluded)");
  c.quantize_cmd->add_option("--sparse-algo", c.quantize.sparse_algo,
                           "With --sparsity: magnitude (default), sparsegpt (mask and weight update; needs --calib) or sparsegpt-mask (the reference's: mask only)");
  c.quantize_cmd->add_option("--sparse-exclude", c.quantize.sparse_exclude, "With --sparsity: leave modules matching this glob dense (repeatable)");
  c.quantize_cmd->add_option("--auto-bits", c.quantize.auto_bits,
                           "Mixed precision: a format per group of Linears (q/k/v, o, gate/up, down) from --auto-formats or none, "
                           "least KL divergence with the weights' effective bits at most this many (e.g. 4.8); needs --calib");
  c.quantize_cmd->add_option("--auto-formats", c.quantize.auto_formats, "With --auto-bits: the candidate formats, comma-separated (default nvfp4_awq,fp8)");
  c.quantize_cmd->add_option("--auto-method", c.quantize.auto_method, "With --auto-bits: how groups are scored: gradient (default, as the reference: loss gradient x each Linear's output change) or kl (KL divergence with one group quantized)");
  c.quantize_cmd->add_option("--auto-state", c.quantize.auto_state,
                           "With --auto-bits: a JSON file of the scores; written after scoring, read instead of scoring when it exists "
                           "(another budget re-solves without scoring)");
  c.quantize_cmd->add_option("--auto-score-size", c.quantize.auto_score_size, "With --auto-bits: calibration samples the scores are measured on (default 8)");
  c.quantize_cmd->add_option("--gguf-type", c.quantize.gguf_type, "With --export gguf: q4_0, q8_0, q4_k_m, q6_k, q5_0 (llama-quantize's mixes), q4_0_pure, q5_0_pure, q4_k, bf16, f16, f32, native (with --auto-bits: each Linear in its own type) (default: nvfp4/mxfp4 for those formats, q4_0 for INT4, else q8_0). INT4 and INT8 weights are quantized in each tensor's blocks of the mix, weighted by the calibration inputs' mean squares when --calib is given (as llama-quantize --imatrix); to q4_0 with --group-size (a multiple of 32) or --algo awq_clip/awq_full, INT4 weights on Q4_0's grid in those groups");
}

void add_train(CLI::App& app, Commands& c) {
  c.train_cmd = app.add_subcommand("train", "Train or fine-tune a model (AdamW, f32 on the CPU) and write it as a Hugging Face checkpoint");
  c.train_cmd->add_option("model", c.train.model, "Model directory to fine-tune (Hugging Face checkpoint); omit with --init");
  c.train_cmd->add_option("--init", c.train.init, "A config.json: train a model from scratch (weights initialized as transformers does)");
  c.train_cmd->add_option("--tokenizer", c.train.tokenizer, "Directory with tokenizer.json (default: the model's)");
  c.train_cmd->add_option("--data", c.train.train.data, ".txt (packed into --seq-len pieces) or .jsonl ({\"text\"}, {\"prompt\",\"response\"}: loss on the response, or {\"messages\"} with --chat-template)")
      ->required()->expected(1, -1);
  c.train_cmd->add_flag("--chat-template", c.train.train.chat_template,
                      "Render .jsonl {\"prompt\",\"response\"} (and \"system\") and {\"messages\"} records with the tokenizer's chat template "
                      "(chat_template.jinja or tokenizer_config.json), as apply_chat_template does; the loss counts the assistant turns' tokens");
  c.train_cmd->add_option("--val", c.train.train.validation, "Validation file (.txt or .jsonl), scored every --eval-every steps and at the end");
  c.train_cmd->add_option("--steps", c.train.train.steps, "Optimizer steps (default: from --epochs)")->check(CLI::NonNegativeNumber);
  c.train_cmd->add_option("--epochs", c.train.train.epochs, "Passes over the data when --steps is not given (default 1)")->check(CLI::PositiveNumber);
  c.train_cmd->add_option("--lr", c.train.train.lr, "Peak learning rate (default 1e-4)")->check(CLI::PositiveNumber);
  c.train_cmd->add_option("--batch", c.train.train.batch, "Sequences per micro-batch (default 8)")->check(CLI::Range(1, 1 << 20));
  c.train_cmd->add_option("--grad-accum", c.train.train.grad_accum, "Micro-batches per optimizer step (default 1)")->check(CLI::Range(1, 1 << 20));
  c.train_cmd->add_option("--seq-len", c.train.train.seq_len, "Tokens per sequence (default 512)")->check(CLI::Range(2, 1 << 24));
  c.train_cmd->add_option("--warmup", c.train.train.warmup, "Linear warmup steps (default 0)")->check(CLI::NonNegativeNumber);
  c.train_cmd->add_option("--schedule", c.train.schedule, "constant, linear or cosine (default), decaying to --min-lr-ratio x --lr");
  c.train_cmd->add_option("--min-lr-ratio", c.train.train.min_lr_ratio, "Where linear and cosine decay end, a fraction of --lr (default 0.1)");
  c.train_cmd->add_option("--weight-decay", c.train.train.adam.weight_decay, "AdamW's decoupled weight decay on the Linear and head matrices, not norms, biases or embeddings (default 0)");
  c.train_cmd->add_option("--beta1", c.train.train.adam.beta1, "AdamW beta1 (default 0.9)");
  c.train_cmd->add_option("--beta2", c.train.train.adam.beta2, "AdamW beta2 (default 0.95)");
  c.train_cmd->add_option("--clip", c.train.train.clip, "Global gradient-norm limit (default 1; 0: none)");
  c.train_cmd->add_option("--seed", c.train.seed, "Seed of the data order and of --init's weights (default 0)")->check(CLI::NonNegativeNumber);
  c.train_cmd->add_option("--eval-every", c.train.train.eval_every, "Score --val every N steps (default: at the end only)")->check(CLI::NonNegativeNumber);
  c.train_cmd->add_option("--save-every", c.train.train.save_every, "Save the training state every N steps, for --resume (default: never)")
      ->check(CLI::NonNegativeNumber);
  c.train_cmd->add_option("--state", c.train.train.state, "The training state file (default: OUT.train-state.safetensors)");
  c.train_cmd->add_flag("--resume", c.train.train.resume, "Continue from the training state");
  c.train_cmd->add_flag("--recompute", c.train.train.recompute, "Recompute each layer's activations in the backward pass (less memory)");
  c.train_cmd->add_option("--log", c.train.train.log, "Write the JSONL log here as training runs (it is also saved in OUT)");
  c.train_cmd->add_option("--precision", c.train.precision,
                          "The products of the Linears and the head: f32 (default) or bf16 (mixed precision: bf16 operands, f32 sums, f32 weights and "
                          "optimizer; AMX tiles where the CPU has them, --version says)");
  c.train_cmd->add_option("--dtype", c.train.dtype, "Weights of the written model: bf16 (default) or f32");
  c.train_cmd->add_option("--out", c.train.train.out, "The directory to create (with --qat --export gguf: the .gguf file)")->required();
  c.train_cmd->add_option("--qat", c.train.qat.format, "Quantization-aware training: calibrate as `mopt quantize --format FORMAT` does, train with its fake quantizers, write what quantize writes");
  c.train_cmd->add_option("--recipe", c.train.qat.recipe, "With --qat: a JSON recipe, as for quantize");
  c.train_cmd->add_option("--algo", c.train.qat.algo, "With --qat: the calibration algorithm (default: the format's)");
  c.train_cmd->add_option("--group-size", c.train.qat.group_size, "With --qat: the INT4 group size (default 128)");
  c.train_cmd->add_option("--kv-cache", c.train.qat.kv_cache, "With --qat: fake-quantize the KV cache too: fp8 or nvfp4");
  c.train_cmd->add_option("--calib", c.train.qat.calib, "With --qat: calibration text (.txt/.jsonl), as for quantize")->expected(1, -1);
  c.train_cmd->add_option("--calib-size", c.train.qat.calib_size, "With --qat: calibration samples (default 128)");
  c.train_cmd->add_option("--calib-seq-len", c.train.qat.seq_len, "With --qat: tokens per calibration sample (default 512)");
  c.train_cmd->add_option("--exclude", c.train.qat.exclude, "With --qat: modules left unquantized (globs)");
  c.train_cmd->add_option("--override", c.train.qat.overrides, "With --qat: GLOB=FORMAT per-module formats");
  c.train_cmd->add_option("--export", c.train.qat.export_format, "With --qat: modelopt (default), compressed-tensors or gguf");
  c.train_cmd->add_option("--gguf-type", c.train.qat.gguf_type, "With --qat --export gguf: the GGUF type, as for quantize");
  c.train_cmd->add_option("--sparsity", c.train.qat.sparsity, "2:4: prune first (as quantize --sparsity does) and train with the masks kept; alone or with --qat");
  c.train_cmd->add_option("--sparse-algo", c.train.qat.sparse_algo, "With --sparsity: magnitude (default), sparsegpt or sparsegpt-mask (these two need --calib)");
  c.train_cmd->add_option("--sparse-exclude", c.train.qat.sparse_exclude, "With --sparsity: modules left dense (globs)");
  c.train_cmd->add_option("--ste", c.train.ste, "With --qat: the gradient through the rounding: pass (default, straight through) or clip (zero outside the amax)");
  c.train_cmd->add_flag("--learn-scales", c.train.learn_scales, "With --qat: train each weight block's amax too (LSQ, tied; INT4/INT8 blocks and NVFP4; starts from the reference's MSE search)");
  c.train_cmd->add_option("--scale-lr", c.train.train.scale_lr, "With --learn-scales: the learned scales' peak learning rate (default: --lr)")->check(CLI::PositiveNumber);
  c.train_cmd->add_flag("--distill", c.train.distill, "With --qat: distill from the unquantized model (QAD) instead of the cross-entropy");
  c.train_cmd->add_option("--kd-temperature", c.train.kd_temperature, "With --distill: the softmax temperature T (default 1)");
  c.train_cmd->add_option("--kd-weight", c.train.kd_weight, "With --distill: the distillation loss's weight; 1 - it weights the cross-entropy (default 1)");
}

// Runs the subcommand parsed; 2 (and the help) when there was none.
int run_command(const CLI::App& app, const Commands& c, const char* argv0) {
  if (c.inspect_cmd->parsed()) return mopt::cli::run_inspect(c.inspect);
  if (c.quantize_cmd->parsed()) return mopt::cli::run_quantize(c.quantize);
  if (c.train_cmd->parsed()) return mopt::cli::run_train(c.train);
  if (c.ppl_cmd->parsed()) return mopt::cli::run_eval_ppl(c.eval);
  if (c.loss_cmd->parsed()) return mopt::cli::run_eval_loss(c.eval);
  if (c.kld_cmd->parsed()) return mopt::cli::run_eval_kld(c.eval);
  if (c.mc_cmd->parsed()) return mopt::cli::run_eval_mc(c.eval);
  if (c.gen_cmd->parsed()) return mopt::cli::run_generate(c.gen);
  if (c.convert_cmd->parsed()) return mopt::cli::run_convert(c.convert);
  if (c.export_cmd->parsed()) return mopt::cli::run_export(c.export_options);
  if (c.bench_cmd->parsed()) return mopt::cli::run_bench(c.bench, argv0);
  if (c.random_cmd->parsed()) return mopt::cli::run_create_random(c.create_random);
  if (c.tokenize_cmd->parsed()) return mopt::cli::run_tokenize(c.tokenize);
  if (c.detokenize_cmd->parsed()) return mopt::cli::run_detokenize(c.detokenize);
  std::fprintf(stderr, "%s", app.help().c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  mopt::choose_startup_settings(argv);  // first: it may run the program again with OpenBLAS's kernels set
  mopt::install_signal_cleanup();       // before any thread: a SIGINT/SIGTERM removes the temporary outputs
#ifdef __GLIBC__
  // Large buffers (a layer's weights in f32, activations) are allocated and freed
  // layer after layer. glibc would raise its mmap threshold after the first free
  // and serve them from a heap that never shrinks, so resident memory grew with
  // depth; a fixed threshold keeps them mapped and returned on free.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
  CLI::App app{"mopt: quantize, evaluate and export transformer language models"};
  app.name("mopt");
  bool show_version = false;
  app.add_flag("--version", show_version, "Print the version and the CPU features in use");

  Commands c;
  add_inspect(app, c);
  add_tokenizer_commands(app, c);
  add_convert_and_export(app, c);
  add_eval(app, c);
  add_bench_and_generate(app, c);
  add_quantize(app, c);
  add_train(app, c);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "mopt: error: %s (see mopt --help)\n", mopt::io::printable(e.what()).c_str());
    return 2;
  }

  try {
    mopt::compute_threads();  // a malformed MOPT_THREADS / OMP_NUM_THREADS is one error before any work
    if (show_version) {
      fmt::print("{}\n", mopt::cli::version_text());
      return 0;
    }
    return run_command(app, c, argv[0]);
  } catch (const mopt::Error& e) {
    return report_error(e.what());
  } catch (const std::bad_alloc&) {
    return report_error("out of memory");
  } catch (const std::exception& e) {
    return report_error(e.what());
  }
}
