// libFuzzer target: the GGUF parser on arbitrary file contents, and the
// dequantization of every tensor it accepts.
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "core/error.h"
#include "io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  try {
    const auto header = mopt::io::parse_gguf(file, "fuzz.gguf");
    for (const auto& t : header.tensors) {
      if (header.data_offset + t.offset + t.bytes > size) __builtin_trap();  // validated ranges must be real
      if (t.elements() > (1u << 20)) continue;
      std::vector<float> out(t.elements());
      try {
        mopt::io::ggml_dequantize(t.type.type, file.subspan(header.data_offset + t.offset, t.bytes), out.data(), t.elements());
      } catch (const mopt::Error&) {
      }
    }
  } catch (const mopt::Error&) {
  }
  return 0;
}
