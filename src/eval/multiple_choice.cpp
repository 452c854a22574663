#include "eval/multiple_choice.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "io/json_util.h"

namespace mopt::eval {

std::vector<McQuestion> parse_mc_csv(std::string_view text, const std::string& label) {
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> row;
  std::string field;
  bool quoted = false, field_started = false;
  std::size_t line = 1;
  auto end_field = [&] {
    row.push_back(std::move(field));
    field.clear();
    field_started = false;
  };
  auto end_row = [&] {
    end_field();
    if (!(row.size() == 1 && row[0].empty())) rows.push_back(std::move(row));
    row.clear();
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char ch = text[i];
    if (quoted) {
      if (ch == '"') {
        if (i + 1 < text.size() && text[i + 1] == '"') {
          field += '"';
          ++i;
        } else {
          quoted = false;
        }
      } else {
        if (ch == '\n') ++line;
        field += ch;
      }
      continue;
    }
    if (ch == '"' && !field_started) {
      quoted = true;
      field_started = true;
    } else if (ch == ',') {
      end_field();
    } else if (ch == '\n') {
      if (!field.empty() && field.back() == '\r') field.pop_back();
      end_row();
      ++line;
    } else {
      field += ch;
      field_started = true;
    }
  }
  if (quoted) fail("{}: a quoted field is not closed (line {})", label, line);
  if (field_started || !row.empty()) end_row();

  std::vector<McQuestion> out;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    const auto& f = rows[r];
    if (f.size() != 6) fail("{}: row {} has {} fields; expected question, A, B, C, D, answer", label, r + 1, f.size());
    std::string answer = f[5];
    answer.erase(std::remove_if(answer.begin(), answer.end(), [](char c) { return c == ' ' || c == '\t' || c == '\r'; }), answer.end());
    if (r == 0 && (answer == "answer" || answer == "Answer")) continue;
    if (answer.size() != 1 || answer[0] < 'A' || answer[0] > 'D') {
      fail("{}: row {}: answer '{}' is not one of A, B, C, D", label, r + 1, io::printable(f[5]));
    }
    out.push_back({f[0], {f[1], f[2], f[3], f[4]}, answer[0] - 'A'});
  }
  if (out.empty()) fail("{}: no questions", label);
  return out;
}

std::string mc_prompt(const std::vector<McQuestion>& shots, const McQuestion& q) {
  static constexpr char kLetters[] = "ABCD";
  auto format = [](const McQuestion& x) {
    std::string s = x.question;
    for (int i = 0; i < 4; ++i) s += "\n" + std::string(1, kLetters[i]) + ". " + x.choices[static_cast<std::size_t>(i)];
    return s + "\nAnswer:";
  };
  std::string prompt = "The following are multiple choice questions (with answers).\n\n";
  for (const auto& s : shots) prompt += format(s) + " " + kLetters[s.answer] + "\n\n";
  return prompt + format(q);
}

McResult multiple_choice(model::Model& m, const std::vector<McQuestion>& questions, std::int64_t shots,
                         const ProgressFn& progress) {
  if (shots < 0 || shots >= static_cast<std::int64_t>(questions.size())) {
    fail("{} shots leave no questions to score ({} in the file)", shots, questions.size());
  }
  const auto& tok = m.require_tokenizer();
  const std::vector<McQuestion> examples(questions.begin(), questions.begin() + shots);
  // The continuation tokens of each answer letter.
  std::array<std::vector<std::int32_t>, 4> letter_ids;
  for (int i = 0; i < 4; ++i) letter_ids[static_cast<std::size_t>(i)] = tok.encode(std::string(" ") + "ABCD"[i], false);
  const bool single_token = std::all_of(letter_ids.begin(), letter_ids.end(), [](const auto& v) { return v.size() == 1; });

  McResult r;
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits;
  std::vector<double> lp;
  const std::int64_t vocab = m.config().vocab_size;
  if (progress) progress(0, questions.size() - static_cast<std::size_t>(shots));
  for (std::size_t qi = static_cast<std::size_t>(shots); qi < questions.size(); ++qi) {
    const auto& q = questions[qi];
    const std::vector<std::int32_t> context = tok.encode(mc_prompt(examples, q), true);
    std::array<double, 4> score{};
    if (single_token) {
      const model::SequenceSpan s{0, static_cast<std::int64_t>(context.size()), 0, 0};
      m.forward(context, std::span(&s, 1), nullptr, model::LogitsFor::last_row_of_each_sequence, logits);
      log_softmax(logits.data(), vocab, lp);
      for (std::size_t i = 0; i < 4; ++i) score[i] = lp[static_cast<std::size_t>(letter_ids[i][0])];
    } else {
      for (std::size_t i = 0; i < 4; ++i) {
        std::vector<std::int32_t> ids = context;
        ids.insert(ids.end(), letter_ids[i].begin(), letter_ids[i].end());
        const model::SequenceSpan s{0, static_cast<std::int64_t>(ids.size()), 0, 0};
        m.forward(ids, std::span(&s, 1), nullptr, model::LogitsFor::all_rows, logits);
        for (std::size_t t = 0; t < letter_ids[i].size(); ++t) {
          log_softmax(logits.data() + static_cast<std::int64_t>(context.size() + t - 1) * vocab, vocab, lp);
          score[i] += lp[static_cast<std::size_t>(letter_ids[i][t])];
        }
      }
    }
    const int predicted = static_cast<int>(std::max_element(score.begin(), score.end()) - score.begin());
    r.predictions.push_back(predicted);
    r.correct += predicted == q.answer;
    ++r.questions;
    if (progress) progress(qi + 1 - static_cast<std::size_t>(shots), questions.size() - static_cast<std::size_t>(shots));
  }
  r.accuracy = static_cast<double>(r.correct) / static_cast<double>(r.questions);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace mopt::eval
