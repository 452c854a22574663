// libFuzzer target: quantization recipes (JSON), and the schemes they give modules.
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "quant/recipe.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto recipe = mopt::quant::parse_recipe(text, "recipe.json");
    recipe.scheme_for("model.layers.0.self_attn.q_proj");
    recipe.scheme_for("model.layers.17.mlp.down_proj");
    recipe.scheme_for("lm_head");
  } catch (const mopt::Error&) {
  }
  return 0;
}
