// Hugging Face chat templates: the Jinja subset that real templates (Llama-2/3, Mistral, Qwen2.5/3,
// SmolLM2, ...) are written in, rendered as transformers' apply_chat_template renders them: jinja2
// with trim_blocks and lstrip_blocks, the loopcontrols extension, `{% generation %}` blocks
// (transparent), the globals raise_exception, strftime_now, namespace, dict and range, and a tojson
// filter that writes JSON as Python's json.dumps(ensure_ascii=False) does.
//
// Supported: text, {{ }}, {% %}, {# #}, whitespace control (- and +); if/elif/else, for (tuple
// targets, `if` filter, else, loop.*), set (also `ns.attr` and {% set x %}...{% endset %}),
// break/continue, generation; literals, arithmetic, comparisons, and/or/not, in, is-tests,
// conditional expressions, attributes, subscripts, slices, filters, and the string and dict methods
// templates call. Anything else (macros, call blocks, includes, ...) is refused by name. Undefined
// values render as "" and are falsy, as jinja2's default Undefined; using one (an attribute, `+`)
// is an error, as there.
//
// Strings are UTF-8; lengths, indices and slices count code points, as Python does. lower, upper,
// title and capitalize change ASCII letters only.
//
// Every error is an Error whose message starts with `label:line:column:` of the template. A
// hostile template cannot crash or hang the process: nesting depth, loop iterations and the size of
// every string and of the output are bounded.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace mopt::io {

class ChatTemplate {
 public:
  // Parses `source`; `label` (its file) starts every error message. Throws Error for a syntax error.
  ChatTemplate(std::string_view source, std::string label);
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // Renders with `variables` (a JSON object: messages, add_generation_prompt, bos_token, ...) on top
  // of the defaults (the special tokens given to set_special_tokens, tools and documents none).
  std::string render(const nlohmann::json& variables) const;
  // Renders a conversation as apply_chat_template(messages, add_generation_prompt=...) does (a
  // message's null-valued keys are dropped first, as there).
  std::string apply(const nlohmann::json& messages, bool add_generation_prompt) const;

  // Variables every render sees unless `variables` overrides them: a JSON object of strings such as
  // {"bos_token": "<s>", "eos_token": "</s>"}.
  void set_special_tokens(const nlohmann::json& tokens);
  const std::string& label() const { return label_; }

 private:
  struct Program;
  std::shared_ptr<const Program> program_;
  std::string label_;
  nlohmann::json defaults_ = nlohmann::json::object();
};

// The chat template of a model or tokenizer directory, with the special tokens of its
// tokenizer_config.json (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token,
// mask_token: strings or {"content": ...}). The template comes from chat_template.jinja (newer
// transformers), else tokenizer_config.json's "chat_template" (a string, or a list of
// {"name", "template"} of which "default" is taken), else chat_template.json's "chat_template".
// Throws Error naming the directory when it has none, or naming the file that is malformed.
ChatTemplate load_chat_template(const std::string& dir);

}  // namespace mopt::io
