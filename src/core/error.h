// The one exception type of mopt. Its message says what went wrong and where:
// which file, tensor or layer. The program prints it as `mopt: error: <message>`.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace mopt {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

// Runs `body`; an Error escaping it gets `context: ` put in front of its message.
template <typename F>
decltype(auto) with_context(const std::string& context, F&& body) {
  try {
    return std::forward<F>(body)();
  } catch (const Error& e) {
    throw Error(context + ": " + e.what());
  }
}

}  // namespace mopt
