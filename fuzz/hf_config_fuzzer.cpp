// libFuzzer target: config.json parsing and the tensor list derived from it.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/error.h"
#include "io/hf_config.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    const auto config = mopt::io::parse_model_config(text, "config.json");
    // Derived sizes must be computable (or refused) for any accepted config.
    if (config.num_layers <= 4096 && config.hidden_size <= (1 << 20)) mopt::io::parameter_count(config);
  } catch (const mopt::Error&) {
  }
  return 0;
}
