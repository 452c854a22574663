#include "train/data.h"

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/random.h"
#include "io/dataset.h"
#include "io/json_util.h"

namespace mopt::train {

namespace {

void add_document(const std::string& text, const io::Tokenizer& tokenizer, std::int64_t seq_len, std::vector<Example>& out) {
  const std::vector<std::int32_t> prefix = tokenizer.prefix_special_ids();
  const auto piece = seq_len - static_cast<std::int64_t>(prefix.size());
  if (piece < 1) fail("sequence length {} leaves no room after the tokenizer's {} prefix tokens", seq_len, prefix.size());
  const std::vector<std::int32_t> ids = tokenizer.encode(text, false);
  for (std::size_t start = 0; start < ids.size(); start += static_cast<std::size_t>(piece)) {
    const std::size_t end = std::min(ids.size(), start + static_cast<std::size_t>(piece));
    Example e;
    e.tokens = prefix;
    e.tokens.insert(e.tokens.end(), ids.begin() + static_cast<std::ptrdiff_t>(start), ids.begin() + static_cast<std::ptrdiff_t>(end));
    if (e.tokens.size() < 2) continue;
    e.targets.assign(e.tokens.begin() + 1, e.tokens.end());
    e.targets.push_back(-1);
    out.push_back(std::move(e));
  }
}

// Targets for `e.tokens` cut to seq_len: row i predicts token i + 1 where `counted[i + 1]`.
void set_targets(Example& e, std::vector<bool> counted, std::int64_t seq_len, const std::string& label) {
  if (static_cast<std::int64_t>(e.tokens.size()) > seq_len) {
    e.tokens.resize(static_cast<std::size_t>(seq_len));
    counted.resize(static_cast<std::size_t>(seq_len));
  }
  e.targets.assign(e.tokens.size(), -1);
  std::int64_t n = 0;
  for (std::size_t i = 0; i + 1 < e.tokens.size(); ++i) {
    if (!counted[i + 1]) continue;
    e.targets[i] = e.tokens[i + 1];
    ++n;
  }
  if (n == 0) fail("{}: the prompt takes all {} tokens of the sequence length: no response token is left to learn", label, seq_len);
}

// A conversation in the chat template (read_examples says how its pieces are found and encoded).
Example chat_example(const nlohmann::json& messages, const io::ChatTemplate& chat, const io::Tokenizer& tokenizer, std::int64_t seq_len,
                     const std::string& label) {
  if (!messages.is_array() || messages.empty()) fail("{}: \"messages\" must be a non-empty array", label);
  for (const auto& m : messages) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) fail("{}: every message needs a string \"role\"", label);
  }
  const auto render = [&](std::size_t count, bool add_generation_prompt) {
    const nlohmann::json part(messages.begin(), messages.begin() + static_cast<std::ptrdiff_t>(count));
    return with_context(label, [&] { return chat.apply(part, add_generation_prompt); });
  };
  const std::string full = render(messages.size(), false);
  std::vector<std::pair<std::size_t, bool>> pieces;  // (end in `full`, counted)
  std::size_t done = 0;
  for (std::size_t j = 0; j < messages.size(); ++j) {
    if (messages[j]["role"] != "assistant") continue;
    const std::string prompt = render(j, true);
    const std::string through = render(j + 1, false);
    if (!through.starts_with(prompt) || prompt.size() < done) {
      fail("{}: message {} (assistant): the chat template's text through it does not start with the text before it with the generation "
           "prompt, so the reply's tokens cannot be told from the prompt's",
           label, j + 1);
    }
    if (!full.starts_with(through)) {
      fail("{}: message {} (assistant): the chat template writes it differently when later messages follow (it changes earlier turns), "
           "so its tokens cannot be found in the conversation",
           label, j + 1);
    }
    pieces.emplace_back(prompt.size(), false);
    pieces.emplace_back(through.size(), true);
    done = through.size();
  }
  if (pieces.empty()) fail("{}: no assistant message to learn from", label);
  pieces.emplace_back(full.size(), false);
  Example e;
  std::vector<bool> counted;
  std::size_t begin = 0;
  for (const auto& [end, count] : pieces) {
    const auto ids = tokenizer.encode(std::string_view(full).substr(begin, end - begin), false);
    e.tokens.insert(e.tokens.end(), ids.begin(), ids.end());
    counted.insert(counted.end(), ids.size(), count);
    begin = end;
  }
  set_targets(e, std::move(counted), seq_len, label);
  return e;
}

}  // namespace

std::vector<Example> read_examples(const std::string& path, const io::Tokenizer& tokenizer, std::int64_t seq_len, std::int32_t eos_id,
                                   const io::ChatTemplate* chat_template) {
  return parse_examples(io::read_text_file(path), path, path.ends_with(".jsonl"), tokenizer, seq_len, eos_id, chat_template);
}

std::vector<Example> parse_examples(const std::string& text, const std::string& path, bool jsonl, const io::Tokenizer& tokenizer,
                                    std::int64_t seq_len, std::int32_t eos_id, const io::ChatTemplate* chat_template) {
  if (seq_len < 2) fail("sequence length {}: at least 2 tokens", seq_len);
  std::vector<Example> out;
  if (!jsonl) {
    add_document(text, tokenizer, seq_len, out);
    if (out.empty()) fail("{}: no text to train on", path);
    return out;
  }
  io::for_each_jsonl_record(text, path, [&](const nlohmann::json& j, const std::string& label) {
    if (!j.is_object()) fail("{}: a record must be a JSON object", label);
    if (j.contains("text")) {
      if (!j["text"].is_string()) fail("{}: \"text\" must be a string", label);
      add_document(j["text"].get<std::string>(), tokenizer, seq_len, out);
      return;
    }
    if (j.contains("messages")) {
      if (!chat_template) fail("{}: a \"messages\" record is rendered with the tokenizer's chat template: pass --chat-template", label);
      out.push_back(chat_example(j["messages"], *chat_template, tokenizer, seq_len, label));
      return;
    }
    if (!j.contains("prompt") || !j.contains("response") || !j["prompt"].is_string() || !j["response"].is_string()) {
      fail("{}: a record needs a string \"text\", string \"prompt\" and \"response\" fields, or \"messages\"", label);
    }
    if (chat_template) {
      nlohmann::json messages = nlohmann::json::array();
      if (j.contains("system")) {
        if (!j["system"].is_string()) fail("{}: \"system\" must be a string", label);
        messages.push_back({{"role", "system"}, {"content", j["system"]}});
      }
      messages.push_back({{"role", "user"}, {"content", j["prompt"]}});
      messages.push_back({{"role", "assistant"}, {"content", j["response"]}});
      out.push_back(chat_example(messages, *chat_template, tokenizer, seq_len, label));
      return;
    }
    Example e;
    e.tokens = tokenizer.prefix_special_ids();
    const auto prompt = tokenizer.encode(j["prompt"].get<std::string>(), false);
    e.tokens.insert(e.tokens.end(), prompt.begin(), prompt.end());
    const auto first_response = static_cast<std::int64_t>(e.tokens.size());
    const auto response = tokenizer.encode(j["response"].get<std::string>(), false);
    e.tokens.insert(e.tokens.end(), response.begin(), response.end());
    if (eos_id >= 0) e.tokens.push_back(eos_id);
    if (static_cast<std::int64_t>(e.tokens.size()) > seq_len) e.tokens.resize(static_cast<std::size_t>(seq_len));
    // Row i predicts token i + 1: a target where that token belongs to the response (or is the EOS).
    e.targets.assign(e.tokens.size(), -1);
    std::int64_t counted = 0;
    for (std::int64_t i = std::max<std::int64_t>(0, first_response - 1); i + 1 < static_cast<std::int64_t>(e.tokens.size()); ++i) {
      e.targets[static_cast<std::size_t>(i)] = e.tokens[static_cast<std::size_t>(i + 1)];
      ++counted;
    }
    if (counted == 0) fail("{}: the prompt takes all {} tokens of the sequence length: no response token is left to learn", label, seq_len);
    out.push_back(std::move(e));
  });
  if (out.empty()) fail("{}: no examples", path);
  return out;
}

DataOrder::DataOrder(std::int64_t examples, std::uint64_t seed) : examples_(examples), seed_(seed) {
  if (examples <= 0) fail("training needs at least one example");
}

const std::vector<std::int64_t>& DataOrder::order(std::int64_t epoch) {
  if (epoch == cached_epoch_) return cached_;
  cached_.resize(static_cast<std::size_t>(examples_));
  for (std::int64_t i = 0; i < examples_; ++i) cached_[static_cast<std::size_t>(i)] = i;
  seeded_shuffle(cached_, seed_ ^ (0xD1B54A32D192ED03ull * static_cast<std::uint64_t>(epoch + 1)));
  cached_epoch_ = epoch;
  return cached_;
}

std::vector<std::int64_t> DataOrder::take(std::int64_t count) {
  std::vector<std::int64_t> out;
  for (std::int64_t i = 0; i < count; ++i, ++cursor_) out.push_back(order(cursor_ / examples_)[static_cast<std::size_t>(cursor_ % examples_)]);
  return out;
}

Batch make_batch(const std::vector<Example>& examples, std::span<const std::int64_t> indices) {
  Batch b;
  b.bounds.push_back(0);
  for (const std::int64_t i : indices) {
    const Example& e = examples.at(static_cast<std::size_t>(i));
    b.tokens.insert(b.tokens.end(), e.tokens.begin(), e.tokens.end());
    b.targets.insert(b.targets.end(), e.targets.begin(), e.targets.end());
    b.bounds.push_back(static_cast<std::int64_t>(b.tokens.size()));
  }
  return b;
}

}  // namespace mopt::train
