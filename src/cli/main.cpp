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

  mopt::cli::InspectOptions inspect;
  auto* inspect_cmd = app.add_subcommand("inspect", "Describe a model directory or a .safetensors file");
  inspect_cmd->add_option("path", inspect.path, "Model directory or .safetensors file")->required();
  inspect_cmd->add_flag("--tensors", inspect.tensors, "List every tensor");
  inspect_cmd->add_flag("--json", inspect.json, "Print JSON instead of text");
  inspect_cmd->add_flag("--sparsity", inspect.sparsity, "Read every decoder Linear (dequantized) and count the 2:4 sparse ones");

  mopt::cli::TokenizeOptions tokenize;
  auto* tokenize_cmd = app.add_subcommand("tokenize", "Print the token ids of a text as a JSON array");
  tokenize_cmd->add_option("tokenizer", tokenize.tokenizer, "tokenizer.json, a model directory or a .gguf file")->required();
  tokenize_cmd->add_option("--text", tokenize.text, "The text to encode")->required();
  tokenize_cmd->add_flag("--special", tokenize.special, "Add the special tokens the tokenizer's post-processor adds (BOS, ...)");

  mopt::cli::DetokenizeOptions detokenize;
  auto* detokenize_cmd = app.add_subcommand("detokenize", "Print the text of token ids");
  detokenize_cmd->add_option("tokenizer", detokenize.tokenizer, "tokenizer.json, a model directory or a .gguf file")->required();
  detokenize_cmd->add_option("--ids", detokenize.ids, "Token ids: 1,2,3")->required();
  detokenize_cmd->add_flag("--skip-special", detokenize.skip_special, "Leave out special tokens");

  mopt::cli::ConvertOptions convert;
  auto* convert_cmd = app.add_subcommand("convert", "Convert a llama.cpp GGUF model into a Hugging Face checkpoint directory");
  convert_cmd->add_option("gguf", convert.gguf, "The .gguf file")->required();
  convert_cmd->add_option("out_dir", convert.out_dir, "The directory to create")->required();

  mopt::cli::ExportOptions export_options;
  auto* export_cmd = app.add_subcommand("export", "Write a checkpoint (plain, or mopt's quantized export) in another engine's format");
  export_cmd->add_option("model", export_options.model, "Model directory (Hugging Face checkpoint, or a mopt quantized export)")->required();
  export_cmd->add_option("--to", export_options.to, "Target format: gguf (llama.cpp) or compressed-tensors (vLLM; quantized input only)")->required();
  export_cmd->add_option("out", export_options.out, "The file (gguf) or directory (compressed-tensors) to create")->required();
  export_cmd->add_option("--type", export_options.type, "GGUF weight type: bf16 (default), f16, f32; llama-quantize's mixes q8_0, q5_0, q4_0, q6_k, q4_k_m (its type for each tensor: Q6_K head); every matrix in one type: q4_0_pure, q5_0_pure (llama-quantize --pure), q4_k; nvfp4, mxfp4 (from such a quantized export); native (a type per quantized Linear: its own codes where a GGUF type holds them, else Q8_0; for mixed precision)");

  mopt::cli::EvalOptions eval;
  auto* eval_cmd = app.add_subcommand("eval", "Measure a model: perplexity, KL divergence against a base, multiple choice");
  eval_cmd->require_subcommand(1);
  auto* ppl_cmd = eval_cmd->add_subcommand("ppl", "Perplexity on a text file (Hugging Face's sliding-window procedure)");
  ppl_cmd->add_option("model", eval.model, "Model directory")->required();
  ppl_cmd->add_option("--text", eval.text, "UTF-8 text file")->required();
  auto* kld_cmd = eval_cmd->add_subcommand("kld", "KL divergence of the model's token distributions from a base model's");
  kld_cmd->add_option("model", eval.model, "Model directory")->required();
  kld_cmd->add_option("--base", eval.base, "The base (reference) model directory")->required();
  kld_cmd->add_option("--text", eval.text, "UTF-8 text file")->required();
  for (auto* cmd : {ppl_cmd, kld_cmd}) {
    cmd->add_option("--ctx", eval.ctx, "Window length in tokens (default min(512, the model's context))");
    cmd->add_option("--stride", eval.stride, "Window step in tokens (default: the window length)");
  }
  auto* loss_cmd = eval_cmd->add_subcommand("loss", "Loss on supervised examples (.jsonl prompt/response: the response's tokens; text: every token), as training validates");
  loss_cmd->add_option("model", eval.model, "Model directory or .gguf file")->required();
  loss_cmd->add_option("--data", eval.data, ".jsonl ({\"prompt\",\"response\"} or {\"text\"}) or .txt, read as mopt train reads it")->required();
  loss_cmd->add_option("--base", eval.base, "Also score this model on the same tokens: the difference and its paired standard error");
  loss_cmd->add_option("--seq-len", eval.seq_len, "Tokens per example at most, as in training (default 512)")->check(CLI::Range(2, 1 << 24));
  loss_cmd->add_flag("--chat-template", eval.chat_template, "Render pairs and {\"messages\"} records with the model's chat template, as mopt train --chat-template");
  auto* mc_cmd = eval_cmd->add_subcommand("mc", "Multiple-choice accuracy on an MMLU-format CSV file");
  mc_cmd->add_option("model", eval.model, "Model directory")->required();
  mc_cmd->add_option("--data", eval.data, "CSV: question, A, B, C, D, answer letter")->required();
  mc_cmd->add_option("--shots", eval.shots, "Solved examples shown first (taken from the first rows)");
  for (auto* cmd : {ppl_cmd, kld_cmd, mc_cmd, loss_cmd}) {
    cmd->add_flag("--json", eval.json, "Print JSON");
    cmd->add_flag("--fake-quant", eval.fake_quant,
                  "Run a quantized checkpoint as dequantized weights with fake-quantized inputs (the definition) "
                  "instead of the quantized kernels");
  }
  for (auto* cmd : {ppl_cmd, kld_cmd, mc_cmd, loss_cmd}) {
    cmd->add_option("--products", eval.products,
                    "How 16-bit and quantized weights multiply in prefill: bf16 (default: bf16 operands, f32 sums, "
                    "where the CPU has AVX-512 BF16 that outruns its f32 FMAs; f32 elsewhere) or f32 (exact f32 products)");
  }
  ppl_cmd->add_flag("--decode", eval.decode, "Feed the text one token at a time through the KV cache (the decode kernels)");
  ppl_cmd->add_option("--token-nll", eval.token_nll,
                      "Write every scored token's position and negative log-likelihood (tab-separated, one per line) to "
                      "this file, to compare two runs token by token");

  mopt::cli::BenchCliOptions bench;
  auto* bench_cmd = app.add_subcommand("bench", "Prefill and decode speed and memory of models against their 16-bit baseline, "
                                                "with the quantized kernels");
  bench_cmd->add_option("models", bench.models, "Model directories (quantized exports or plain checkpoints)")->required()->expected(1, -1);
  bench_cmd->add_option("--base", bench.base, "The 16-bit baseline checkpoint (default: the first model dequantized to bf16)");
  bench_cmd->add_option("--batch", bench.batches, "Batch sizes, comma-separated (default 1,32,64)");
  bench_cmd->add_option("--prompt", bench.prompt, "Prompt tokens per sequence (default 512)");
  bench_cmd->add_option("--gen", bench.gen, "Decode steps (default 128)");
  bench_cmd->add_option("--threads", bench.threads, "Threads (default: MOPT_THREADS, else OMP_NUM_THREADS, else every core)")->check(CLI::Range(1, 4096));
  bench_cmd->add_option("--rounds", bench.rounds, "Rounds over all models; medians are reported (default 3)");
  bench_cmd->add_option("--products", bench.products, "bf16 (default, where the CPU has fast AVX-512 BF16) or f32, as for eval");
  bench_cmd->add_flag("--json", bench.json, "Print a JSON array, one object per (model, batch)");
  bench_cmd->add_flag("--no-rss", bench.no_rss, "Do not measure each model's peak RSS (in a process of its own)");
  bench_cmd->add_flag("--probe-rss", bench.probe_rss)->group("");
  bench_cmd->add_flag("--probe-as-baseline", bench.probe_as_baseline)->group("");

  mopt::cli::CreateRandomOptions create_random;
  auto* random_cmd = app.add_subcommand("create-random", "Write a checkpoint of a real model's shape with random bf16 weights (for speed work)");
  random_cmd->add_option("--like", create_random.like, "llama-3.2-1b, llama-3.2-3b, llama-3-8b, mistral-7b, tiny-kjv")->required();
  random_cmd->add_option("out", create_random.out, "The directory to create")->required();
  random_cmd->add_option("--tokenizer", create_random.tokenizer, "Copy tokenizer.json (and its config) from this model directory");
  random_cmd->add_option("--seed", create_random.seed, "Seed (default 0)");

  mopt::cli::GenerateCliOptions gen;
  auto* gen_cmd = app.add_subcommand("generate", "Continue a prompt, streaming the text");
  gen_cmd->add_option("model", gen.model, "Model directory")->required();
  gen_cmd->add_option("--prompt", gen.prompt, "The prompt")->required();
  gen_cmd->add_option("--max-tokens", gen.max_tokens, "Tokens to generate (default 128)");
  gen_cmd->add_option("--temp", gen.temperature, "Sampling temperature; 0 is greedy (default)");
  gen_cmd->add_option("--top-p", gen.top_p, "Nucleus sampling threshold (default 1)");
  gen_cmd->add_option("--seed", gen.seed, "Random seed for sampling");
  gen_cmd->add_option("--products", gen.products, "bf16 (default, where the CPU has fast AVX-512 BF16) or f32, as for eval");

  mopt::cli::QuantizeOptions quantize;
  auto* quantize_cmd = app.add_subcommand("quantize", "Quantize a model layer by layer and export it (modelopt, compressed-tensors or GGUF)");
  quantize_cmd->add_option("model", quantize.model, "Model directory (Hugging Face checkpoint)")->required();
  quantize_cmd->add_option("--out", quantize.out_dir, "The directory to create")->required();
  quantize_cmd->add_option("--format", quantize.format,
                           "fp8, fp8_pc_pt, fp8_block, int8, int8_sq, int8_wo, int4_rtn, int4_awq, w4a8_awq, nvfp4, nvfp4_awq, mxfp8, mxfp4, "
                           "or none (with --sparsity: prune only)");
  quantize_cmd->add_option("--recipe", quantize.recipe, "A JSON recipe (format, overrides, exclusions, calibration); flags override it");
  quantize_cmd->add_option("--algo", quantize.algo, "max (round-to-nearest), smoothquant, awq_lite, awq_clip, awq_full, gptq, awq_lite+gptq "
                           "(default: the format's: smoothquant for int8_sq, awq_lite for int4_awq, w4a8_awq, nvfp4_awq, else max)");
  quantize_cmd->add_option("--kv-cache", quantize.kv_cache, "Quantize the KV cache too: fp8 or nvfp4");
  quantize_cmd->add_option("--calib", quantize.calib, "Calibration text: .txt files or .jsonl with a \"text\" field")->expected(1, -1);
  quantize_cmd->add_option("--calib-size", quantize.calib_size, "Calibration samples (default 128)");
  quantize_cmd->add_option("--seq-len", quantize.seq_len, "Tokens per calibration sample (default 512)");
  quantize_cmd->add_option("--seed", quantize.seed, "Seed for choosing the samples (default 0)");
  quantize_cmd->add_option("--calib-batch", quantize.calib_batch, "Samples per forward call during calibration (default 1)");
  quantize_cmd->add_option("--calibrator", quantize.calibrator, "Activation amax: max (default), percentile, mse, entropy");
  quantize_cmd->add_option("--percentile", quantize.percentile, "Percentile for --calibrator percentile (default 99.99)");
  quantize_cmd->add_option("--group-size", quantize.group_size, "INT4 group size (default 128)");
  quantize_cmd->add_option("--exclude", quantize.exclude, "Leave modules matching this glob unquantized (repeatable)");
  quantize_cmd->add_option("--override", quantize.overrides, "GLOB=FORMAT: another format (or none) for matching modules (repeatable)");
  quantize_cmd->add_flag("--quantize-lm-head", quantize.quantize_lm_head,
                         "Quantize the lm_head too (default: 16-bit, as the reference) with the same algorithm, its input scale folded into the final norm; modelopt export only");
  quantize_cmd->add_flag("--propagate-quantized", quantize.propagate_quantized,
                         "Feed each layer the quantized previous layer's outputs (default: the unquantized ones, as the reference)");
  quantize_cmd->add_option("--gptq-damp", quantize.gptq_damp, "GPTQ damping as a fraction of the Hessian's mean diagonal (default 0.01)");
  quantize_cmd->add_flag("--gptq-act-order", quantize.gptq_act_order, "GPTQ: columns by decreasing Hessian diagonal (default: natural order, as the reference)");
  quantize_cmd->add_option("--report", quantize.report, "Write a JSON report here");
  quantize_cmd->add_option("--export", quantize.export_format,
                           "Output format: modelopt (default: TensorRT-LLM, vLLM, SGLang), compressed-tensors (vLLM), gguf (llama.cpp; --out is the .gguf file)");
  quantize_cmd->add_option("--sparsity", quantize.sparsity, "2:4: prune every decoder Linear to 2 of each 4 weights before quantizing (lm_head excluded)");
  quantize_cmd->add_option("--sparse-algo", quantize.sparse_algo,
                           "With --sparsity: magnitude (default), sparsegpt (mask and weight update; needs --calib) or sparsegpt-mask (the reference's: mask only)");
  quantize_cmd->add_option("--sparse-exclude", quantize.sparse_exclude, "With --sparsity: leave modules matching this glob dense (repeatable)");
  quantize_cmd->add_option("--auto-bits", quantize.auto_bits,
                           "Mixed precision: a format per group of Linears (q/k/v, o, gate/up, down) from --auto-formats or none, "
                           "least KL divergence with the weights' effective bits at most this many (e.g. 4.8); needs --calib");
  quantize_cmd->add_option("--auto-formats", quantize.auto_formats, "With --auto-bits: the candidate formats, comma-separated (default nvfp4_awq,fp8)");
  quantize_cmd->add_option("--auto-method", quantize.auto_method, "With --auto-bits: how groups are scored: gradient (default, as the reference: loss gradient x each Linear's output change) or kl (KL divergence with one group quantized)");
  quantize_cmd->add_option("--auto-state", quantize.auto_state,
                           "With --auto-bits: a JSON file of the scores; written after scoring, read instead of scoring when it exists "
                           "(another budget re-solves without scoring)");
  quantize_cmd->add_option("--auto-score-size", quantize.auto_score_size, "With --auto-bits: calibration samples the scores are measured on (default 8)");
  quantize_cmd->add_option("--gguf-type", quantize.gguf_type, "With --export gguf: q4_0, q8_0, q4_k_m, q6_k, q5_0 (llama-quantize's mixes), q4_0_pure, q5_0_pure, q4_k, bf16, f16, f32, native (with --auto-bits: each Linear in its own type) (default: nvfp4/mxfp4 for those formats, q4_0 for INT4, else q8_0). INT4 and INT8 weights are quantized in each tensor's blocks of the mix, weighted by the calibration inputs' mean squares when --calib is given (as llama-quantize --imatrix); to q4_0 with --group-size (a multiple of 32) or --algo awq_clip/awq_full, INT4 weights on Q4_0's grid in those groups");

  mopt::cli::TrainCliOptions train;
  auto* train_cmd = app.add_subcommand("train", "Train or fine-tune a model (AdamW, f32 on the CPU) and write it as a Hugging Face checkpoint");
  train_cmd->add_option("model", train.model, "Model directory to fine-tune (Hugging Face checkpoint); omit with --init");
  train_cmd->add_option("--init", train.init, "A config.json: train a model from scratch (weights initialized as transformers does)");
  train_cmd->add_option("--tokenizer", train.tokenizer, "Directory with tokenizer.json (default: the model's)");
  train_cmd->add_option("--data", train.train.data, ".txt (packed into --seq-len pieces) or .jsonl ({\"text\"}, {\"prompt\",\"response\"}: loss on the response, or {\"messages\"} with --chat-template)")
      ->required()->expected(1, -1);
  train_cmd->add_flag("--chat-template", train.train.chat_template,
                      "Render .jsonl {\"prompt\",\"response\"} (and \"system\") and {\"messages\"} records with the tokenizer's chat template "
                      "(chat_template.jinja or tokenizer_config.json), as apply_chat_template does; the loss counts the assistant turns' tokens");
  train_cmd->add_option("--val", train.train.validation, "Validation file (.txt or .jsonl), scored every --eval-every steps and at the end");
  train_cmd->add_option("--steps", train.train.steps, "Optimizer steps (default: from --epochs)")->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--epochs", train.train.epochs, "Passes over the data when --steps is not given (default 1)")->check(CLI::PositiveNumber);
  train_cmd->add_option("--lr", train.train.lr, "Peak learning rate (default 1e-4)")->check(CLI::PositiveNumber);
  train_cmd->add_option("--batch", train.train.batch, "Sequences per micro-batch (default 8)")->check(CLI::Range(1, 1 << 20));
  train_cmd->add_option("--grad-accum", train.train.grad_accum, "Micro-batches per optimizer step (default 1)")->check(CLI::Range(1, 1 << 20));
  train_cmd->add_option("--seq-len", train.train.seq_len, "Tokens per sequence (default 512)")->check(CLI::Range(2, 1 << 24));
  train_cmd->add_option("--warmup", train.train.warmup, "Linear warmup steps (default 0)")->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--schedule", train.schedule, "constant, linear or cosine (default), decaying to --min-lr-ratio x --lr");
  train_cmd->add_option("--min-lr-ratio", train.train.min_lr_ratio, "Where linear and cosine decay end, a fraction of --lr (default 0.1)");
  train_cmd->add_option("--weight-decay", train.train.adam.weight_decay, "AdamW's decoupled weight decay on the Linear and head matrices, not norms, biases or embeddings (default 0)");
  train_cmd->add_option("--beta1", train.train.adam.beta1, "AdamW beta1 (default 0.9)");
  train_cmd->add_option("--beta2", train.train.adam.beta2, "AdamW beta2 (default 0.95)");
  train_cmd->add_option("--clip", train.train.clip, "Global gradient-norm limit (default 1; 0: none)");
  train_cmd->add_option("--seed", train.seed, "Seed of the data order and of --init's weights (default 0)")->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--eval-every", train.train.eval_every, "Score --val every N steps (default: at the end only)")->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--save-every", train.train.save_every, "Save the training state every N steps, for --resume (default: never)")
      ->check(CLI::NonNegativeNumber);
  train_cmd->add_option("--state", train.train.state, "The training state file (default: OUT.train-state.safetensors)");
  train_cmd->add_flag("--resume", train.train.resume, "Continue from the training state");
  train_cmd->add_flag("--recompute", train.train.recompute, "Recompute each layer's activations in the backward pass (less memory)");
  train_cmd->add_option("--log", train.train.log, "Write the JSONL log here as training runs (it is also saved in OUT)");
  train_cmd->add_option("--dtype", train.dtype, "Weights of the written model: bf16 (default) or f32");
  train_cmd->add_option("--out", train.train.out, "The directory to create (with --qat --export gguf: the .gguf file)")->required();
  train_cmd->add_option("--qat", train.qat.format, "Quantization-aware training: calibrate as `mopt quantize --format FORMAT` does, train with its fake quantizers, write what quantize writes");
  train_cmd->add_option("--recipe", train.qat.recipe, "With --qat: a JSON recipe, as for quantize");
  train_cmd->add_option("--algo", train.qat.algo, "With --qat: the calibration algorithm (default: the format's)");
  train_cmd->add_option("--group-size", train.qat.group_size, "With --qat: the INT4 group size (default 128)");
  train_cmd->add_option("--kv-cache", train.qat.kv_cache, "With --qat: fake-quantize the KV cache too: fp8 or nvfp4");
  train_cmd->add_option("--calib", train.qat.calib, "With --qat: calibration text (.txt/.jsonl), as for quantize")->expected(1, -1);
  train_cmd->add_option("--calib-size", train.qat.calib_size, "With --qat: calibration samples (default 128)");
  train_cmd->add_option("--calib-seq-len", train.qat.seq_len, "With --qat: tokens per calibration sample (default 512)");
  train_cmd->add_option("--exclude", train.qat.exclude, "With --qat: modules left unquantized (globs)");
  train_cmd->add_option("--override", train.qat.overrides, "With --qat: GLOB=FORMAT per-module formats");
  train_cmd->add_option("--export", train.qat.export_format, "With --qat: modelopt (default), compressed-tensors or gguf");
  train_cmd->add_option("--gguf-type", train.qat.gguf_type, "With --qat --export gguf: the GGUF type, as for quantize");
  train_cmd->add_option("--sparsity", train.qat.sparsity, "2:4: prune first (as quantize --sparsity does) and train with the masks kept; alone or with --qat");
  train_cmd->add_option("--sparse-algo", train.qat.sparse_algo, "With --sparsity: magnitude (default), sparsegpt or sparsegpt-mask (these two need --calib)");
  train_cmd->add_option("--sparse-exclude", train.qat.sparse_exclude, "With --sparsity: modules left dense (globs)");
  train_cmd->add_option("--ste", train.ste, "With --qat: the gradient through the rounding: pass (default, straight through) or clip (zero outside the amax)");
  train_cmd->add_flag("--learn-scales", train.learn_scales, "With --qat: train each weight block's amax too (LSQ, tied; INT4/INT8 blocks and NVFP4; starts from the reference's MSE search)");
  train_cmd->add_option("--scale-lr", train.train.scale_lr, "With --learn-scales: the learned scales' peak learning rate (default: --lr)")->check(CLI::PositiveNumber);
  train_cmd->add_flag("--distill", train.distill, "With --qat: distill from the unquantized model (QAD) instead of the cross-entropy");
  train_cmd->add_option("--kd-temperature", train.kd_temperature, "With --distill: the softmax temperature T (default 1)");
  train_cmd->add_option("--kd-weight", train.kd_weight, "With --distill: the distillation loss's weight; 1 - it weights the cross-entropy (default 1)");

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
    if (inspect_cmd->parsed()) return mopt::cli::run_inspect(inspect);
    if (quantize_cmd->parsed()) return mopt::cli::run_quantize(quantize);
    if (train_cmd->parsed()) return mopt::cli::run_train(train);
    if (ppl_cmd->parsed()) return mopt::cli::run_eval_ppl(eval);
    if (loss_cmd->parsed()) return mopt::cli::run_eval_loss(eval);
    if (kld_cmd->parsed()) return mopt::cli::run_eval_kld(eval);
    if (mc_cmd->parsed()) return mopt::cli::run_eval_mc(eval);
    if (gen_cmd->parsed()) return mopt::cli::run_generate(gen);
    if (convert_cmd->parsed()) return mopt::cli::run_convert(convert);
    if (export_cmd->parsed()) return mopt::cli::run_export(export_options);
    if (bench_cmd->parsed()) return mopt::cli::run_bench(bench, argv[0]);
    if (random_cmd->parsed()) return mopt::cli::run_create_random(create_random);
    if (tokenize_cmd->parsed()) return mopt::cli::run_tokenize(tokenize);
    if (detokenize_cmd->parsed()) return mopt::cli::run_detokenize(detokenize);
    std::fprintf(stderr, "%s", app.help().c_str());
    return 2;
  } catch (const mopt::Error& e) {
    return report_error(e.what());
  } catch (const std::bad_alloc&) {
    return report_error("out of memory");
  } catch (const std::exception& e) {
    return report_error(e.what());
  }
}
