// Calibrators: how a static per-tensor amax is chosen from the values a
// quantizer sees during calibration, as NVIDIA Model Optimizer defines them.
//  - max: the largest |x| over every batch.
//  - histogram (2048 bins of |x|, grown with the same bin width when a later
//    batch goes further), then one of
//      percentile: the edge where the cumulative share first reaches p/100;
//      mse: the bin centre (from bin 128 on) whose use as amax minimises the
//           count-weighted squared error of fake-quantizing the bin centres;
//      entropy: TensorRT's KL-divergence search over the first i bins folded
//           into 2^(bits-1) levels, the last i with the smallest divergence.
// The histogram reproduces torch.histc's binning in f32 (first batch:
// linspace(0, max, 2049) edges; growth: arange(0, max + width, width)).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quant/spec.h"

namespace mopt::quant {

enum class CalibMethod { max, percentile, mse, entropy };
CalibMethod parse_calib_method(const std::string& name);  // throws Error on an unknown name
const char* calib_method_name(CalibMethod method);

class HistogramCalibrator {
 public:
  explicit HistogramCalibrator(std::int64_t num_bins = 2048) : num_bins_(num_bins) {}

  // Adds one batch (the values' magnitudes). NaN/Inf is an error.
  void collect(const float* x, std::int64_t n);
  bool empty() const { return counts_.empty(); }

  float percentile_amax(double percentile) const;
  // `element`: int8/int4 (integer fake quant, narrow range) or e4m3.
  float mse_amax(Element element, std::int64_t start_bin = 128) const;
  // Integer elements only.
  float entropy_amax(Element element, std::int64_t start_bin = 128) const;
  float compute(CalibMethod method, Element element, double percentile) const;

  const std::vector<double>& counts() const { return counts_; }
  const std::vector<float>& edges() const { return edges_; }

 private:
  std::int64_t num_bins_;
  std::vector<double> counts_;  // exact small integers
  std::vector<float> edges_;
};

// torch.linspace(start, end, steps) in f32, computed the way PyTorch's CPU kernel does.
std::vector<float> torch_linspace(float start, float end, std::int64_t steps);

}  // namespace mopt::quant
