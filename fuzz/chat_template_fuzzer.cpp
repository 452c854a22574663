// libFuzzer target: chat template parsing and rendering. The input is the template's text; it is
// rendered with a fixed conversation, with and without the generation prompt. Any input must end
// in a rendered text or an Error, within the interpreter's bounds on depth, steps and size.
#include <cstddef>
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string_view>

#include "core/error.h"
#include "io/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const nlohmann::json messages = nlohmann::json::parse(R"([
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "  Hi there 👋\n"},
    {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHello!", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
    {"role": "user", "content": "Bye"}
  ])");
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    mopt::io::ChatTemplate t(text, "fuzz.jinja");
    t.set_special_tokens({{"bos_token", "<s>"}, {"eos_token", "</s>"}});
    t.apply(messages, true);
    t.apply(messages, false);
  } catch (const mopt::Error&) {
  }
  return 0;
}
