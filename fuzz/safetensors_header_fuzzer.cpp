// libFuzzer target: the safetensors header parser on arbitrary file contents.
// Every input must either parse or raise mopt::Error; anything else (a crash,
// a sanitizer report, another exception type) is a bug.
#include <cstddef>
#include <cstdint>
#include <span>

#include "core/error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto header = mopt::io::parse_safetensors_header(file, "fuzz.safetensors");
    // A header that validates must describe bytes that are really there.
    for (const auto& e : header.entries) {
      if (header.data_offset + e.end > size) __builtin_trap();
    }
  } catch (const mopt::Error&) {
  }
  return 0;
}
