// Training: the whole model's gradients against PyTorch autograd (fixtures from
// tools/fixtures/make_train_goldens.py), the loss against the inference forward pass, the same
// gradients with recomputation and at every thread count, and AdamW against torch.optim.AdamW.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "io/checkpoint.h"
#include "model/llama.h"
#include "train/model.h"
#include "train/data.h"
#include "train/optimizer.h"
#include "train/trainer.h"
#include "io/chat_template.h"
#include "io/tokenizer.h"
#include "support/temp_dir.h"
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

namespace mopt::train {
namespace {

const std::string kData = MOPT_TEST_DATA_DIR;

std::vector<std::int32_t> ints(const Tensor& t) {
  const auto* p = t.data<std::int32_t>();
  return {p, p + t.numel()};
}

// ||a - b|| / ||b||
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

// The fixture's batch: B sequences of T tokens, packed.
Batch fixture_batch(const io::TensorStore& golden) {
  const Tensor tokens = golden.tensor("tokens");
  Batch b;
  b.tokens = ints(tokens);
  b.targets = ints(golden.tensor("targets"));
  for (std::int64_t s = 0; s <= tokens.dim(0); ++s) b.bounds.push_back(s * tokens.dim(1));
  return b;
}

class Gradients : public ::testing::TestWithParam<std::string> {};

// Every parameter's gradient after one forward/backward of a masked (SFT) batch, against PyTorch
// autograd in f64: Llama with llama3 RoPE, Mistral with a window shorter than the sequence, Qwen2
// with biases and a tied head, Qwen3 with q/k norms and head_dim != hidden / heads.
TEST_P(Gradients, MatchPyTorch) {
  const std::string name = GetParam();
  const auto golden = io::TensorStore::open_file(kData + "/train/grads/" + name + ".safetensors");
  auto model = TrainableModel::from_checkpoint(io::Checkpoint::open(kData + "/hf/" + name));
  const Batch batch = fixture_batch(golden);
  const std::int64_t targets = batch.target_count();
  ASSERT_LT(targets, batch.rows());  // the mask is in the batch
  const LossResult r = model.forward_backward(batch, 1.0f / static_cast<float>(targets));
  EXPECT_EQ(r.targets, targets);
  const double loss = r.loss_sum / static_cast<double>(r.targets);
  const float expected_loss = golden.tensor("loss").data<float>()[0];
  EXPECT_NEAR(loss, expected_loss, 1e-5 * expected_loss);
  std::size_t compared = 0;
  double worst = 0;
  for (const auto& p : model.parameters()) {
    const std::string key = "grad." + p.name;
    ASSERT_TRUE(golden.contains(key)) << key;
    const auto expected = golden.tensor(key).to_f32();
    ASSERT_EQ(expected.size(), p.grad.size()) << p.name;
    const double error = relative_error(p.grad, expected);
    EXPECT_LT(error, 1e-4) << p.name;
    worst = std::max(worst, error);
    ++compared;
  }
  std::printf("%s: loss %.7f (PyTorch %.7f), the largest relative gradient error %.2e\n", name.c_str(), loss, expected_loss, worst);
  EXPECT_EQ(compared, model.parameters().size());
}

// Mixed precision (bf16 operands in every Linear's, attention's and the head's products, f32 sums):
// the same gradients to bf16's rounding (a relative error of about 2^-9 per operand, ~0.5% on average
// here; up to ~2% on a bias whose gradient sums many rounded terms), and not the f32 ones.
TEST_P(Gradients, Bf16ProductsStayCloseToPyTorch) {
  const std::string name = GetParam();
  const auto golden = io::TensorStore::open_file(kData + "/train/grads/" + name + ".safetensors");
  auto model = TrainableModel::from_checkpoint(io::Checkpoint::open(kData + "/hf/" + name));
  model.set_bf16_products(true);
  const Batch batch = fixture_batch(golden);
  const LossResult r = model.forward_backward(batch, 1.0f / static_cast<float>(batch.target_count()));
  const double loss = r.loss_sum / static_cast<double>(r.targets);
  const float expected_loss = golden.tensor("loss").data<float>()[0];
  EXPECT_NEAR(loss, expected_loss, 1e-3 * expected_loss);
  double worst = 0, sum = 0;
  for (const auto& p : model.parameters()) {
    const double error = relative_error(p.grad, golden.tensor("grad." + p.name).to_f32());
    EXPECT_LT(error, 4e-2) << p.name;
    worst = std::max(worst, error);
    sum += error;
  }
  const double mean = sum / static_cast<double>(model.parameters().size());
  std::printf("%s, bf16 products: loss %.7f (PyTorch f64 %.7f), relative gradient error mean %.2e, largest %.2e\n", name.c_str(), loss,
              expected_loss, mean, worst);
  EXPECT_LT(mean, 8e-3);
  EXPECT_GT(worst, 1e-4) << "the products were not rounded to bf16";
}

INSTANTIATE_TEST_SUITE_P(Architectures, Gradients, ::testing::Values("llama", "mistral", "qwen2", "qwen3"));

// The training forward's loss is the inference forward's (model::Model, its own kernels).
TEST(Training, LossEqualsTheInferenceForward) {
  const std::string dir = kData + "/hf/mistral";
  auto trainable = TrainableModel::from_checkpoint(io::Checkpoint::open(dir));
  auto model = model::Model::load(dir);
  const auto golden = io::TensorStore::open_file(kData + "/train/grads/mistral.safetensors");
  const Batch batch = fixture_batch(golden);
  std::vector<model::SequenceSpan> spans;
  for (std::size_t s = 0; s + 1 < batch.bounds.size(); ++s) spans.push_back({batch.bounds[s], batch.bounds[s + 1] - batch.bounds[s], 0, 0});
  std::vector<float> logits;
  model.forward(batch.tokens, spans, nullptr, model::LogitsFor::all_rows, logits);
  const std::int64_t V = model.config().vocab_size;
  double sum = 0;
  for (std::int64_t r = 0; r < batch.rows(); ++r) {
    const std::int32_t t = batch.targets[static_cast<std::size_t>(r)];
    if (t < 0) continue;
    const float* row = logits.data() + r * V;
    double m = -1e30, total = 0;
    for (std::int64_t j = 0; j < V; ++j) m = std::max(m, static_cast<double>(row[j]));
    for (std::int64_t j = 0; j < V; ++j) total += std::exp(row[j] - m);
    sum += m + std::log(total) - row[t];
  }
  const LossResult r = trainable.loss(batch);
  EXPECT_NEAR(r.loss_sum, sum, 1e-5 * sum);
  for (const auto& p : trainable.parameters()) {
    for (const float g : p.grad) ASSERT_EQ(g, 0.0f) << "loss() computed a gradient of " << p.name;
  }
}

// Recomputing each layer in the backward gives the same bits with less memory; the gradients are
// the same bits at 1, 2 and 3 threads, with f32 products and with bf16 ones; a second call adds to
// the first.
TEST(Training, RecomputationAndThreadCountsGiveTheSameBits) {
  const int threads = compute_threads();
  const std::string dir = kData + "/hf/qwen3";
  const auto golden = io::TensorStore::open_file(kData + "/train/grads/qwen3.safetensors");
  const Batch batch = fixture_batch(golden);
  for (const bool bf16 : {false, true}) {
  std::vector<std::vector<float>> first;
  std::uint64_t kept_bytes = 0;
  for (const int t : {1, 2, 3}) {
    for (const bool recompute : {false, true}) {
      set_compute_threads(t);
      auto model = TrainableModel::from_checkpoint(io::Checkpoint::open(dir));
      model.set_recompute(recompute);
      model.set_bf16_products(bf16);
      model.forward_backward(batch, 0.01f);
      if (!recompute) kept_bytes = model.activation_bytes();
      else EXPECT_LT(model.activation_bytes(), kept_bytes);
      std::vector<std::vector<float>> grads;
      for (const auto& p : model.parameters()) grads.push_back(p.grad);
      if (first.empty()) first = grads;
      for (std::size_t i = 0; i < grads.size(); ++i) {
        EXPECT_EQ(grads[i], first[i]) << model.parameters()[i].name << " threads " << t << " recompute " << recompute << " bf16 " << bf16;
      }
      if (t == 1 && !recompute) {
        model.forward_backward(batch, 0.01f);
        for (std::size_t i = 0; i < grads.size(); ++i) {
          // dW += dYᵀ·X sums inside the BLAS call: twice the gradient to rounding.
          std::vector<float> twice = grads[i];
          for (float& g : twice) g *= 2;
          EXPECT_LT(relative_error(model.parameters()[i].grad, twice), 1e-6) << model.parameters()[i].name;
        }
      }
    }
  }
  }
  set_compute_threads(threads);
}

TEST(Training, BadBatchesAreRefused) {
  auto model = TrainableModel::from_checkpoint(io::Checkpoint::open(kData + "/hf/llama"));
  Batch b;
  b.tokens = {1, 2, 3};
  b.targets = {2, 3, -100};
  b.bounds = {0, 3};
  EXPECT_NO_THROW(model.loss(b));
  b.tokens[1] = 256;  // the vocabulary is 256
  EXPECT_THROW(model.loss(b), Error);
  b.tokens[1] = 2;
  b.targets[0] = 999;
  EXPECT_THROW(model.loss(b), Error);
  b.targets[0] = 2;
  b.bounds = {0, 2};
  EXPECT_THROW(model.loss(b), Error);
  b.bounds = {0, 0, 3};
  EXPECT_THROW(model.loss(b), Error);
}

// Initialization: norms one, biases zero, matrices normal with the config's initializer_range, seeded.
TEST(Training, InitializationIsSeededAndScaled) {
  const auto config = io::Checkpoint::open(kData + "/hf/qwen2").config();
  const auto a = TrainableModel::initialize(config, 7), b = TrainableModel::initialize(config, 7), c = TrainableModel::initialize(config, 8);
  const double expected_std = config.raw.value("initializer_range", 0.02);
  for (std::size_t i = 0; i < a.parameters().size(); ++i) {
    const auto& p = a.parameters()[i];
    EXPECT_EQ(p.value, b.parameters()[i].value);
    if (p.name.ends_with("norm.weight")) {
      for (const float v : p.value) ASSERT_EQ(v, 1.0f);
    } else if (p.name.ends_with(".bias")) {
      for (const float v : p.value) ASSERT_EQ(v, 0.0f);
    } else {
      EXPECT_NE(p.value, c.parameters()[i].value);
      double sum = 0, sq = 0;
      for (const float v : p.value) sum += v, sq += static_cast<double>(v) * v;
      const double n = static_cast<double>(p.value.size()), mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
      EXPECT_NEAR(sd, expected_std, 0.1 * expected_std) << p.name;
      EXPECT_NEAR(mean, 0.0, 5 * expected_std / std::sqrt(n)) << p.name;
    }
  }
}

// ---- data ----

std::string write_file(const std::string& dir, const std::string& name, const std::string& text) {
  const std::string path = dir + "/" + name;
  std::ofstream(path) << text;
  return path;
}

// Text is cut into pieces of seq_len with the BOS prefix, every token predicting the next; a
// prompt/response pair predicts the response and EOS only.
TEST(TrainingData, TextPiecesAndResponseOnlyTargets) {
  const testing::TempDir dir;
  const auto tokenizer = io::Tokenizer::load(std::string(MOPT_MODELS_DIR) + "/tiny-kjv");
  const std::string text = "In the beginning God created the heaven and the earth. And the earth was without form, and void.";
  const auto ids = tokenizer.encode(text, false);
  const auto prefix = tokenizer.prefix_special_ids();
  ASSERT_EQ(prefix.size(), 1u);
  const auto txt = read_examples(write_file(dir.path(), "a.txt", text), tokenizer, 8, 1);
  ASSERT_EQ(txt.size(), (ids.size() + 6) / 7);
  std::vector<std::int32_t> joined;
  for (const auto& e : txt) {
    ASSERT_LE(e.tokens.size(), 8u);
    EXPECT_EQ(e.tokens[0], prefix[0]);
    joined.insert(joined.end(), e.tokens.begin() + 1, e.tokens.end());
    for (std::size_t i = 0; i + 1 < e.tokens.size(); ++i) EXPECT_EQ(e.targets[i], e.tokens[i + 1]);
    EXPECT_EQ(e.targets.back(), -1);
  }
  EXPECT_EQ(joined, ids);

  const auto pairs = read_examples(write_file(dir.path(), "b.jsonl", "{\"prompt\": \"Who created?\", \"response\": \" God\"}\n\n{\"text\": \"And God said\"}\n"),
                                   tokenizer, 64, 1);
  ASSERT_EQ(pairs.size(), 2u);
  const auto prompt = tokenizer.encode("Who created?", false), response = tokenizer.encode(" God", false);
  const auto& e = pairs[0];
  ASSERT_EQ(e.tokens.size(), 1 + prompt.size() + response.size() + 1);
  EXPECT_EQ(e.tokens.back(), 1);  // EOS
  for (std::size_t i = 0; i < e.tokens.size(); ++i) {
    const bool predicts_response = i + 1 >= 1 + prompt.size() && i + 1 < e.tokens.size();
    EXPECT_EQ(e.targets[i], predicts_response ? e.tokens[i + 1] : -1) << i;
  }
  // A prompt that fills the sequence leaves nothing to learn: refused, naming the line.
  const std::string long_prompt = write_file(dir.path(), "c.jsonl", "{\"prompt\": \"" + text + "\", \"response\": \" Amen\"}\n");
  try {
    read_examples(long_prompt, tokenizer, 8, 1);
    FAIL() << "no error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("c.jsonl:1: the prompt takes all 8 tokens"), std::string::npos) << err.what();
  }
  EXPECT_THROW(read_examples(write_file(dir.path(), "d.jsonl", "[1, 2]\n"), tokenizer, 8, 1), Error);
  EXPECT_THROW(read_examples(write_file(dir.path(), "e.txt", ""), tokenizer, 8, 1), Error);
}

// --chat-template: examples as the Python reference builds them with the tokenizers library
// (tests/data/chat_templates/sft_goldens.json, tools/fixtures/make_chat_template_goldens.py): pairs,
// a system message, a multi-turn conversation with every assistant turn learned, and a cut one.
void expect_chat_goldens(const nlohmann::json& examples, const io::Tokenizer& tokenizer, const io::ChatTemplate& chat, const testing::TempDir& dir) {
  ASSERT_EQ(examples.size(), 4u);
  for (const auto& g : examples) {
    const std::string path = write_file(dir.path(), "sft.jsonl", g["record"].dump() + "\n");
    const auto got = read_examples(path, tokenizer, g["seq_len"].get<std::int64_t>(), 2, &chat);
    ASSERT_EQ(got.size(), 1u);
    EXPECT_EQ(got[0].tokens, g["tokens"].get<std::vector<std::int32_t>>()) << g["record"];
    EXPECT_EQ(got[0].targets, g["targets"].get<std::vector<std::int32_t>>()) << g["record"];
  }
}

nlohmann::json sft_goldens() {
  std::ifstream in(kData + "/chat_templates/sft_goldens.json");
  return nlohmann::json::parse(in);
}

// With tiny-kjv's tokenizer (in the repository) and Llama-2's template, whose BOS/EOS it holds.
TEST(TrainingData, ChatTemplateExamplesMatchTheReference) {
  const testing::TempDir dir;
  const auto tokenizer = io::Tokenizer::load(std::string(MOPT_MODELS_DIR) + "/tiny-kjv");
  const nlohmann::json golden = sft_goldens()["tiny_kjv"];
  std::ifstream source(kData + "/chat_templates/" + golden["template"].get<std::string>());
  io::ChatTemplate chat(std::string(std::istreambuf_iterator<char>(source), {}), golden["template"].get<std::string>());
  chat.set_special_tokens(golden["special_tokens"]);
  expect_chat_goldens(golden["examples"], tokenizer, chat, dir);
  // The counted tokens of a pair decode to the reply through the end of its turn; no EOS is added.
  const auto pair = read_examples(write_file(dir.path(), "p.jsonl", R"({"prompt": "Hi", "response": "Hello!"})" "\n"), tokenizer, 256, 1, &chat);
  std::vector<std::int32_t> learned;
  for (std::size_t i = 0; i < pair[0].targets.size(); ++i) {
    if (pair[0].targets[i] >= 0) learned.push_back(pair[0].targets[i]);
  }
  EXPECT_EQ(tokenizer.decode(learned), " Hello! <|end_of_text|>");
  EXPECT_EQ(tokenizer.decode(pair[0].tokens), chat.apply(nlohmann::json::parse(R"([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])"), false));

  const auto error_of = [&](const std::string& record, const io::ChatTemplate* t) -> std::string {
    try {
      read_examples(write_file(dir.path(), "bad.jsonl", "{\"text\": \"ok\"}\n" + record + "\n"), tokenizer, 256, 1, t);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(error_of(R"({"messages": [{"role": "user", "content": "x"}]})", nullptr).find("bad.jsonl:2: a \"messages\" record is rendered with the tokenizer's chat template: pass --chat-template"), std::string::npos);
  EXPECT_NE(error_of(R"({"messages": [{"role": "user", "content": "x"}]})", &chat).find("bad.jsonl:2: no assistant message to learn from"), std::string::npos);
  EXPECT_NE(error_of(R"({"messages": [{"content": "x"}]})", &chat).find("bad.jsonl:2: every message needs a string \"role\""), std::string::npos);
  // Llama-2's own check: roles alternate.
  EXPECT_NE(error_of(R"({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})", &chat)
                .find("the template raised an error: Conversation roles must alternate"),
            std::string::npos);
  const io::ChatTemplate raises("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages[0].content }}", "strict.jinja");
  EXPECT_EQ(error_of(R"({"system": "s", "prompt": "p", "response": "r"})", &raises), std::string(dir.file("bad.jsonl")) + ":2: strict.jinja:1:39: the template raised an error: user first");
  // A template that rewrites earlier turns (here: only the last assistant turn is kept) cannot give a turn's span.
  const io::ChatTemplate rewrites("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}", "rewrites.jinja");
  EXPECT_NE(error_of(R"({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]})", &rewrites)
                .find("message 2 (assistant): the chat template writes it differently when later messages follow"),
            std::string::npos);
  // A template whose turn does not continue its generation prompt.
  const io::ChatTemplate unaligned("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}", "unaligned.jinja");
  EXPECT_NE(error_of(R"({"prompt": "p", "response": "r"})", &unaligned).find("bad.jsonl:2: message 2 (assistant): the chat template's text through it does not start with"), std::string::npos);
}

// SmolLM2's own template and tokenizer (its special tokens are added tokens there), where
// scripts/get-smollm2.sh has fetched the model.
TEST(TrainingData, ChatTemplateExamplesMatchTheReferenceOnSmolLM2) {
  const testing::TempDir dir;
  const std::string smollm2 = std::string(MOPT_MODELS_DIR) + "/smollm2-135m";
  if (!std::filesystem::exists(smollm2 + "/tokenizer.json")) GTEST_SKIP() << smollm2 << " not found: run scripts/get-smollm2.sh";
  const auto tokenizer = io::Tokenizer::load(smollm2);
  const io::ChatTemplate chat = io::load_chat_template(smollm2);
  expect_chat_goldens(sft_goldens()["examples"], tokenizer, chat, dir);
  const auto pair = read_examples(write_file(dir.path(), "p.jsonl", R"({"prompt": "Hi", "response": "Hello!"})" "\n"), tokenizer, 512, 2, &chat);
  std::vector<std::int32_t> learned;
  for (std::size_t i = 0; i < pair[0].targets.size(); ++i) {
    if (pair[0].targets[i] >= 0) learned.push_back(pair[0].targets[i]);
  }
  EXPECT_EQ(tokenizer.decode(learned), "Hello!<|im_end|>\n");
}

// Every epoch visits every example once, in a seeded order that differs between epochs; a cursor
// set from a saved state continues the same sequence.
TEST(TrainingData, OrderCoversEveryEpochAndResumes) {
  DataOrder a(10, 3), b(10, 3), c(10, 4);
  const auto first = a.take(25);
  EXPECT_EQ(first, b.take(25));
  EXPECT_NE(first, c.take(25));
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<std::int64_t> seen(first.begin() + epoch * 10, first.begin() + epoch * 10 + 10);
    EXPECT_EQ(seen.size(), 10u);
  }
  EXPECT_NE(std::vector<std::int64_t>(first.begin(), first.begin() + 10), std::vector<std::int64_t>(first.begin() + 10, first.begin() + 20));
  DataOrder resumed(10, 3);
  resumed.set_cursor(7);
  const auto rest = resumed.take(18);
  EXPECT_EQ(rest, std::vector<std::int64_t>(first.begin() + 7, first.end()));
  const std::vector<Example> ex = {{{5, 6, 7}, {6, 7, -1}}, {{8, 9}, {9, -1}}};
  const std::vector<std::int64_t> idx = {1, 0};
  const Batch batch = make_batch(ex, idx);
  EXPECT_EQ(batch.tokens, (std::vector<std::int32_t>{8, 9, 5, 6, 7}));
  EXPECT_EQ(batch.targets, (std::vector<std::int32_t>{9, -1, 6, 7, -1}));
  EXPECT_EQ(batch.bounds, (std::vector<std::int64_t>{0, 2, 5}));
  EXPECT_EQ(batch.target_count(), 3);
}

TEST(TrainingData, LossCurveIsAnSvgWithBothCurves) {
  const std::string svg = loss_curve_svg({{1, 4.0}, {2, 3.5}, {3, 3.2}}, {{3, 3.6}});
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_EQ(std::count(svg.begin(), svg.end(), '\n') > 10, true);
  EXPECT_NE(svg.find(">validation<"), std::string::npos);
  EXPECT_NE(svg.find("<polyline"), svg.rfind("<polyline"));  // two curves
}

// ---- AdamW ----

TEST(AdamW, MatchesTorchWithAccumulationClippingWarmupAndCosine) {
  const auto golden = io::TensorStore::open_file(kData + "/train/adamw.safetensors");
  std::vector<Parameter> params;
  for (const std::string n : {"p0", "p1"}) {
    const Tensor t = golden.tensor("init." + n);
    params.push_back({n, t.shape(), t.to_f32(), std::vector<float>(t.numel())});
  }
  AdamW opt(params, {0.9, 0.95, 1e-8, 0.1}, {true, true});
  const auto lrs = golden.tensor("lr").to_f32();
  const auto norms = golden.tensor("grad_norm").to_f32();
  const std::int64_t steps = 20;
  for (std::int64_t s = 0; s < steps; ++s) {
    for (auto& p : params) std::fill(p.grad.begin(), p.grad.end(), 0.0f);
    for (int a = 0; a < 2; ++a) {
      for (auto& p : params) {
        const auto g = golden.tensor("grad." + std::to_string(s) + "." + std::to_string(a) + "." + p.name).to_f32();
        for (std::size_t i = 0; i < g.size(); ++i) p.grad[i] += 0.5f * g[i];
      }
    }
    const double norm = clip_gradients(params, 1.0);
    EXPECT_NEAR(norm, norms[static_cast<std::size_t>(s)], 1e-5 * norm) << "step " << s;
    const double lr = learning_rate(1e-2, Schedule::cosine, s, steps, 3, 0.1);
    EXPECT_NEAR(lr, lrs[static_cast<std::size_t>(s)], 1e-7) << "step " << s;
    opt.step(params, lr);
    if (s == 0) {
      for (const auto& p : params) EXPECT_LT(relative_error(p.value, golden.tensor("step1." + p.name).to_f32()), 1e-6) << p.name;
    }
  }
  EXPECT_EQ(opt.steps(), steps);
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    EXPECT_LT(relative_error(p.value, golden.tensor("final." + p.name).to_f32()), 1e-5) << p.name;
    EXPECT_LT(relative_error(opt.first_moment(i), golden.tensor("final.exp_avg." + p.name).to_f32()), 1e-5) << p.name;
    EXPECT_LT(relative_error(opt.second_moment(i), golden.tensor("final.exp_avg_sq." + p.name).to_f32()), 1e-5) << p.name;
  }
}

// 200 steps of tests/data/hf/llama on bytes of KJV text, from the same weights and batches as
// PyTorch (float64): the loss of every step within 1%.
TEST(AdamW, TwoHundredStepsFollowPyTorch) {
  const auto golden = io::TensorStore::open_file(kData + "/train/run200.safetensors");
  const Tensor tokens = golden.tensor("tokens");  // [steps, batch, seq + 1]
  const auto expected = golden.tensor("loss").to_f32();
  const std::int64_t steps = tokens.dim(0), batch = tokens.dim(1), seq = tokens.dim(2) - 1;
  const auto all = ints(tokens);
  auto model = TrainableModel::from_checkpoint(io::Checkpoint::open(kData + "/hf/llama"));
  auto& params = model.parameters();
  AdamW opt(params, {0.9, 0.95, 1e-8, 0.1}, weight_decay_mask(params));
  double worst = 0;
  for (std::int64_t s = 0; s < steps; ++s) {
    Batch b;
    b.bounds.push_back(0);
    for (std::int64_t i = 0; i < batch; ++i) {
      const std::int32_t* row = all.data() + (s * batch + i) * (seq + 1);
      b.tokens.insert(b.tokens.end(), row, row + seq);
      b.targets.insert(b.targets.end(), row + 1, row + seq + 1);
      b.bounds.push_back(b.rows());
    }
    model.zero_grad();
    const LossResult r = model.forward_backward(b, 1.0f / static_cast<float>(b.target_count()));
    const double loss = r.loss_sum / static_cast<double>(r.targets);
    const double e = expected[static_cast<std::size_t>(s)];
    worst = std::max(worst, std::fabs(loss - e) / e);
    ASSERT_NEAR(loss, e, 0.01 * e) << "step " << s;
    clip_gradients(params, 1.0);
    opt.step(params, learning_rate(3e-3, Schedule::cosine, s, steps, 10, 0.1));
  }
  EXPECT_LT(expected.back(), 0.8 * expected.front());  // it learned something
  std::printf("200 steps: the largest relative loss difference from PyTorch is %.2e\n", worst);
}

TEST(AdamW, SchedulesAndDecayFlags) {
  // Warmup: the first step already has lr / warmup.
  EXPECT_DOUBLE_EQ(learning_rate(1.0, Schedule::constant, 0, 10, 4, 0.0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(1.0, Schedule::constant, 3, 10, 4, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(1.0, Schedule::constant, 9, 10, 4, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(1.0, Schedule::linear, 4, 10, 4, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(1.0, Schedule::linear, 7, 10, 4, 0.0), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(1.0, Schedule::cosine, 7, 10, 4, 0.2), 0.2 + 0.8 * 0.5);
  EXPECT_EQ(parse_schedule("cosine"), Schedule::cosine);
  EXPECT_THROW(parse_schedule("exponential"), Error);
  // A parameter without decay moves by Adam's step only: with a zero gradient, not at all.
  std::vector<Parameter> params = {{"w", {2}, {1.0f, -2.0f}, {0.0f, 0.0f}}, {"norm", {2}, {1.0f, -2.0f}, {0.0f, 0.0f}}};
  AdamW opt(params, {0.9, 0.999, 1e-8, 0.5}, {true, false});
  opt.step(params, 0.1);
  EXPECT_FLOAT_EQ(params[0].value[0], 1.0f * (1 - 0.05f));
  EXPECT_FLOAT_EQ(params[0].value[1], -2.0f * (1 - 0.05f));
  EXPECT_EQ(params[1].value, (std::vector<float>{1.0f, -2.0f}));
  // Clipping: a norm of 5 clipped to 1.
  params[0].grad = {3.0f, 0.0f};
  params[1].grad = {0.0f, 4.0f};
  EXPECT_DOUBLE_EQ(clip_gradients(params, 1.0), 5.0);
  EXPECT_NEAR(gradient_norm(params), 1.0, 1e-6);
  EXPECT_DOUBLE_EQ(clip_gradients(params, 0.0), gradient_norm(params));  // no clipping
  std::vector<Parameter> named = {{"model.embed_tokens.weight", {4, 2}, {}, {}}, {"model.layers.0.mlp.up_proj.weight", {2, 2}, {}, {}},
                                  {"model.layers.0.self_attn.q_proj.bias", {2}, {}, {}}, {"model.norm.weight", {2}, {}, {}},
                                  {"lm_head.weight", {4, 2}, {}, {}}};
  EXPECT_EQ(weight_decay_mask(named), (std::vector<bool>{false, true, false, false, true}));
}

}  // namespace
}  // namespace mopt::train
