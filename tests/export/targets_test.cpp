#include "export/targets.h"

#include <gtest/gtest.h>

#include <string>

#include "core/error.h"

namespace mopt::exporter {
namespace {

// The rows `--export` reads: only modelopt keeps pre_quant_scale tensors and a quantized lm_head;
// the others are converted from a modelopt export (what the pipeline folds for them is tested in
// CompressedTensors.QuantizingForATargetWithoutPreQuantScalesExportsExactly).
TEST(ExportTargets, RowsAndUnknownNames) {
  ASSERT_EQ(export_targets().size(), 3u);
  const ExportTarget& m = export_target("modelopt");
  EXPECT_TRUE(m.stores_pre_quant_scale);
  EXPECT_TRUE(m.holds_quantized_lm_head);
  EXPECT_FALSE(m.converted_from_modelopt);
  for (const char* name : {"compressed-tensors", "gguf"}) {
    const ExportTarget& t = export_target(name);
    EXPECT_EQ(t.name, name);
    EXPECT_FALSE(t.stores_pre_quant_scale) << name;
    EXPECT_FALSE(t.holds_quantized_lm_head) << name;
    EXPECT_TRUE(t.converted_from_modelopt) << name;
  }
  try {
    export_target("onnx");
    ADD_FAILURE() << "an unknown target was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "--export onnx: one of modelopt, compressed-tensors, gguf");
  }
}

}  // namespace
}  // namespace mopt::exporter
