#include "io/chat_template.h"

#include <gtest/gtest.h>

#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/json_util.h"
#include "support/temp_dir.h"

namespace mopt::io {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;
using testing::data_path;

json goldens() { return json::parse(read_text_file(data_path("chat_templates/goldens.json"))); }

void write(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// The message of the Error `body` throws ("" when it throws none).
template <typename F>
std::string error_of(F&& body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// Real templates (Llama-2/3.1/3.2, Mistral, Qwen2.5, Qwen3, SmolLM2) rendered as transformers'
// render_jinja_template renders them (tools/fixtures/make_chat_template_goldens.py).
TEST(ChatTemplate, RendersRealTemplatesAsTransformers) {
  const json g = goldens();
  int rendered = 0;
  int raised = 0;
  for (const auto& c : g["renders"]) {
    const auto& info = g["templates"][c["template"].get<std::string>()];
    const std::string path = data_path("chat_templates/" + info["file"].get<std::string>());
    ChatTemplate t(read_text_file(path), path);
    t.set_special_tokens(info["special_tokens"]);
    json variables = c["variables"];
    variables["messages"] = c["messages"];
    variables["add_generation_prompt"] = c["add_generation_prompt"];
    SCOPED_TRACE(c.dump());
    if (c.contains("expected")) {
      EXPECT_EQ(t.render(variables), c["expected"].get<std::string>());
      ++rendered;
    } else {
      const std::string message = error_of([&] { t.render(variables); });
      EXPECT_NE(message.find(c["error"].get<std::string>()), std::string::npos) << message;
      EXPECT_EQ(message.rfind(path + ":1:", 0), 0u) << message;  // where the template raised
      ++raised;
    }
  }
  EXPECT_GE(rendered, 100);
  EXPECT_GE(raised, 10);
}

// Expressions, filters, tests, statements and whitespace control against jinja2 in transformers'
// environment; where jinja2 refuses a template, mopt refuses it too (with its own message).
TEST(ChatTemplate, ExpressionsAsJinja2) {
  const json g = goldens();
  for (const auto& c : g["expressions"]) {
    const std::string source = c["source"].get<std::string>();
    SCOPED_TRACE(source.substr(0, 200));
    if (c.contains("expected")) {
      try {
        EXPECT_EQ(ChatTemplate(source, "expr.jinja").render(c["variables"]), c["expected"].get<std::string>());
      } catch (const Error& e) {
        ADD_FAILURE() << e.what();
      }
    } else {
      const std::string message = error_of([&] { ChatTemplate(source, "expr.jinja").render(c["variables"]); });
      EXPECT_EQ(message.rfind("expr.jinja:", 0), 0u) << "jinja2: " << c["error"] << "; mopt: " << message;
    }
  }
}

TEST(ChatTemplate, ErrorsNameTheTemplateAndPlace) {
  EXPECT_EQ(error_of([] { ChatTemplate("a\n  {% if x %}b", "t.jinja"); }),
            "t.jinja:2:3: unclosed {% if %}: no {% endif %} before the end of the template");
  EXPECT_EQ(error_of([] { ChatTemplate("{{ x ", "t.jinja"); }), "t.jinja:1:1: unclosed tag: no }}");
  EXPECT_EQ(error_of([] { ChatTemplate("{{ [1]|nosuch }}", "t.jinja").render(json::object()); }), "t.jinja:1:8: unknown filter 'nosuch'");
  EXPECT_EQ(error_of([] { ChatTemplate("x{{ raise_exception('Roles must alternate') }}", "t.jinja").render(json::object()); }),
            "t.jinja:1:5: the template raised an error: Roles must alternate");
  EXPECT_EQ(error_of([] { ChatTemplate("{% macro m() %}{% endmacro %}", "t.jinja"); }),
            "t.jinja:1:4: the {% macro %} tag is not supported in chat templates");
  EXPECT_EQ(error_of([] { ChatTemplate("{{ m.a.b }}", "t.jinja").render(json{{"m", json::object()}}); }),
            "t.jinja:1:7: 'dict object' has no attribute 'a'");
}

TEST(ChatTemplate, HostileTemplatesStopWithAnError) {
  const auto throws = [](const std::string& source) {
    const std::string message = error_of([&] { ChatTemplate(source, "h.jinja").render(json::object()); });
    EXPECT_EQ(message.rfind("h.jinja:", 0), 0u) << source.substr(0, 80) << ": " << message;
  };
  throws("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}");
  throws("{% set s = 'abcdefgh' * 1000000 %}{{ s ~ s ~ s }}");
  throws("{% set s = 'abcdefgh' * 1000000 %}{% for i in range(100) %}{{ s }}{% endfor %}");
  throws("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}");
  throws("{{ " + std::string(5000, '[') + std::string(5000, ']') + " }}");
  throws("{{ " + [] {
    std::string s;
    for (int k = 0; k < 5000; ++k) s += "not -";
    return s;
  }() + "1 }}");
  throws([] {
    std::string s;
    for (int k = 0; k < 1000; ++k) s += "{% if true %}";
    return s;
  }());
  // A long chain nests as it is evaluated, without brackets.
  throws("{{ " + [] {
    std::string s;
    for (int k = 0; k < 5000; ++k) s += "1 + ";
    return s;
  }() + "1 }}");
  throws("{{ x" + [] {
    std::string s;
    for (int k = 0; k < 5000; ++k) s += " | string";
    return s;
  }() + " }}");
  throws("{{ 9223372036854775807 + 1 }}");
  throws("{{ 2 ** 64 }}");
}

TEST(ChatTemplate, StrftimeNowIsTheLocalTime) {
  const std::time_t now = std::time(nullptr);
  std::tm local{};
  localtime_r(&now, &local);
  EXPECT_EQ(ChatTemplate("{{ strftime_now('%Y') }}", "t.jinja").render(json::object()), std::to_string(local.tm_year + 1900));
}

// SmolLM2's template, from its tokenizer_config.json (scripts/get-smollm2.sh fetches the model).
TEST(ChatTemplate, LoadsSmolLM2sTemplate) {
  const std::string smollm2 = std::string(MOPT_MODELS_DIR) + "/smollm2-135m";
  if (!fs::exists(smollm2 + "/tokenizer_config.json")) GTEST_SKIP() << smollm2 << " not found: run scripts/get-smollm2.sh";
  const ChatTemplate t = load_chat_template(smollm2);
  EXPECT_EQ(t.label(), smollm2 + "/tokenizer_config.json");
  const json messages = json::array({{{"role", "user"}, {"content", "Hi"}}});
  EXPECT_EQ(t.apply(messages, true),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, LoadsFromAModelDirectory) {
  const json messages = json::array({{{"role", "user"}, {"content", "Hi"}}});
  // Without special tokens they are undefined; tools is none, as transformers passes it.
  EXPECT_EQ(ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ tools }}|{{ sep_token is defined }}", "x")
                .render(json::object()),
            "||||None|False");

  testing::TempDir dir;
  write(dir.path() / "tokenizer_config.json",
        R"({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>", "pad_token": null,
            "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"}]})");
  EXPECT_EQ(load_chat_template(dir.path().string()).apply(messages, false), "<s>Hi</s>");
  write(dir.path() / "chat_template.json", R"({"chat_template": "json {{ messages|length }}"})");
  EXPECT_EQ(load_chat_template(dir.path().string()).apply(messages, false), "<s>Hi</s>");  // tokenizer_config.json's comes first
  write(dir.path() / "chat_template.jinja", "jinja {{ bos_token }}\n");
  EXPECT_EQ(load_chat_template(dir.path().string()).apply(messages, false), "jinja <s>");  // chat_template.jinja before both

  testing::TempDir json_only;
  write(json_only.path() / "chat_template.json", R"({"chat_template": "json {{ messages|length }}"})");
  EXPECT_EQ(load_chat_template(json_only.path().string()).apply(messages, false), "json 1");

  testing::TempDir none;
  write(none.path() / "tokenizer_config.json", R"({"eos_token": "</s>"})");
  EXPECT_EQ(error_of([&] { load_chat_template(none.path().string()); }),
            none.path().string() +
                ": no chat template (looked for chat_template.jinja, tokenizer_config.json's \"chat_template\" and chat_template.json)");
  write(none.path() / "tokenizer_config.json", R"({"chat_template": [{"name": "rag", "template": "x"}]})");
  EXPECT_NE(error_of([&] { load_chat_template(none.path().string()); }).find("without a \"default\" template"), std::string::npos);
}

}  // namespace
}  // namespace mopt::io
