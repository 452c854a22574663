#include "quant/calibrator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "quant/fake_quant.h"

namespace mopt::quant {

namespace {

// torch.histc(x, bins, min=lo, max=hi) on the CPU: position
// int((x - lo) * bins / (hi - lo)) in f32, values outside [lo, hi] skipped,
// x == hi in the last bin.
std::vector<double> histc(const float* x, std::int64_t n, std::int64_t bins, float lo, float hi) {
  if (lo == hi) {
    lo -= 1.0f;
    hi += 1.0f;
  }
  std::vector<double> counts(static_cast<std::size_t>(bins), 0.0);
  const float range = hi - lo;
  const auto fbins = static_cast<float>(bins);
  for (std::int64_t i = 0; i < n; ++i) {
    const float e = std::fabs(x[i]);
    if (!(e >= lo && e <= hi)) continue;
    auto pos = static_cast<std::int64_t>(((e - lo) * fbins) / range);
    if (pos == bins) pos -= 1;
    counts[static_cast<std::size_t>(pos)] += 1.0;
  }
  return counts;
}

// torch.arange(0, end, step) in f32 on the CPU: the count is
// ceil(end / step) in f64; values come 8 at a time from a base rounded to f32
// (16 per iteration), the tail one by one, all accumulated in f64.
std::vector<float> torch_arange_from_zero(float end, float step) {
  const auto n = static_cast<std::int64_t>(std::ceil(static_cast<double>(end) / static_cast<double>(step)));
  std::vector<float> v(static_cast<std::size_t>(std::max<std::int64_t>(n, 0)));
  const double s = step;
  const std::int64_t vector_end = n - n % 16;
  for (std::int64_t i0 = 0; i0 < vector_end; i0 += 8) {
    const auto base = static_cast<float>(s * static_cast<double>(i0));
    for (std::int64_t i = 0; i < 8; ++i) v[static_cast<std::size_t>(i0 + i)] = static_cast<float>(static_cast<double>(base) + static_cast<double>(i) * s);
  }
  for (std::int64_t i = vector_end; i < n; ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(s * static_cast<double>(i));
  return v;
}

}  // namespace

std::vector<float> torch_linspace(float start, float end, std::int64_t steps) {
  std::vector<float> v(static_cast<std::size_t>(steps));
  if (steps == 1) {
    v[0] = start;
    return v;
  }
  // PyTorch's CPU kernel: the first half counts up from start, the second down
  // from end, each value rounded once (its build fuses the multiply-add).
  const float step = (end - start) / static_cast<float>(steps - 1);
  const std::int64_t halfway = steps / 2;
  for (std::int64_t i = 0; i < steps; ++i) {
    const double value = i < halfway ? static_cast<double>(start) + static_cast<double>(step) * static_cast<double>(i)
                                     : static_cast<double>(end) - static_cast<double>(step) * static_cast<double>(steps - i - 1);
    v[static_cast<std::size_t>(i)] = static_cast<float>(value);
  }
  return v;
}

CalibMethod parse_calib_method(const std::string& name) {
  if (name == "max") return CalibMethod::max;
  if (name == "percentile") return CalibMethod::percentile;
  if (name == "mse") return CalibMethod::mse;
  if (name == "entropy") return CalibMethod::entropy;
  fail("unknown calibrator '{}' (known: max, percentile, mse, entropy)", name);
}

const char* calib_method_name(CalibMethod method) {
  switch (method) {
    case CalibMethod::max: return "max";
    case CalibMethod::percentile: return "percentile";
    case CalibMethod::mse: return "mse";
    case CalibMethod::entropy: return "entropy";
  }
  return "?";
}

void HistogramCalibrator::collect(const float* x, std::int64_t n) {
  float x_max = 0.0f;
  for (std::int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(x[i])) fail("non-finite value {} at element {}", x[i], i);
    x_max = std::max(x_max, std::fabs(x[i]));
  }
  if (n == 0) return;
  if (counts_.empty()) {
    counts_ = histc(x, n, num_bins_, 0.0f, x_max);
    edges_ = torch_linspace(0.0f, x_max, num_bins_ + 1);
    return;
  }
  if (x_max > edges_.back()) {
    const float width = edges_[1] - edges_[0];
    if (!(width > 0.0f)) {
      // Every earlier value was zero (a zero-width histogram): start again from this batch, keeping their count.
      const double zeros = std::accumulate(counts_.begin(), counts_.end(), 0.0);
      counts_.clear();
      collect(x, n);
      counts_[0] += zeros;
      return;
    }
    num_bins_ = static_cast<std::int64_t>(std::ceil(x_max / width));
    edges_ = torch_arange_from_zero(x_max + width, width);
  }
  std::vector<double> h = histc(x, n, num_bins_, 0.0f, edges_.back());
  for (std::size_t i = 0; i < counts_.size() && i < h.size(); ++i) h[i] += counts_[i];
  counts_ = std::move(h);
}

float HistogramCalibrator::percentile_amax(double percentile) const {
  if (!(percentile >= 0.0 && percentile <= 100.0)) fail("percentile {} is outside [0, 100]", percentile);
  if (counts_.empty()) fail("the calibrator saw no data");
  double total = 0.0;
  for (double c : counts_) total += c;
  // numpy: cdf = cumsum(hist / total); idx = searchsorted(cdf, p / 100) (first cdf >= target).
  const double target = percentile / 100.0;
  double cdf = 0.0;
  std::size_t idx = counts_.size();
  for (std::size_t i = 0; i < counts_.size(); ++i) {
    cdf += counts_[i] / total;
    if (cdf >= target) {
      idx = i;
      break;
    }
  }
  return edges_[std::min(idx, edges_.size() - 1)];
}

float HistogramCalibrator::mse_amax(Element element, std::int64_t start_bin) const {
  if (counts_.empty()) fail("the calibrator saw no data");
  const std::size_t nc = std::min(counts_.size(), edges_.size() - 1);
  std::vector<float> centers(nc);
  for (std::size_t i = 0; i < nc; ++i) centers[i] = (edges_[i + 1] + edges_[i]) / 2.0f;
  float best_amax = 0.0f;
  float best = std::numeric_limits<float>::infinity();
  for (auto i = static_cast<std::size_t>(start_bin); i < nc; ++i) {
    const float amax = centers[i];
    double sum = 0.0;
    for (std::size_t j = 0; j < nc; ++j) {
      float q = 0.0f;
      switch (element) {
        case Element::int8:
        case Element::int4: {
          // The reference calls fake_tensor_quant with its default narrow range: [-bound, bound].
          const float bound = element == Element::int8 ? 127.0f : 7.0f;
          q = amax > 0.0f ? std::clamp(std::nearbyint(centers[j] * (bound / amax)), -bound, bound) / (bound / amax) : 0.0f;
          break;
        }
        case Element::e4m3: q = fake_quant_e4m3(centers[j], amax); break;
        case Element::e2m1: fail("MSE calibration is defined for integer and FP8 quantizers");
      }
      const float d = q - centers[j];
      sum += static_cast<double>(d * d * static_cast<float>(counts_[j]));
    }
    const auto mse = static_cast<float>(sum / static_cast<double>(nc));
    if (mse < best) {
      best = mse;
      best_amax = amax;
    }
  }
  return best_amax;
}

float HistogramCalibrator::entropy_amax(Element element, std::int64_t start_bin) const {
  if (element != Element::int8 && element != Element::int4) fail("entropy calibration is defined for integer quantizers");
  if (counts_.empty()) fail("the calibrator saw no data");
  const std::int64_t nbins = element == Element::int8 ? 128 : 8;
  std::vector<double> bins = counts_;
  if (bins.size() > 1) bins[0] = bins[1];
  const auto stop = static_cast<std::int64_t>(bins.size());
  double best = std::numeric_limits<double>::infinity();
  std::int64_t best_i = start_bin;
  std::vector<double> level_sum(static_cast<std::size_t>(nbins)), level_n(static_cast<std::size_t>(nbins));
  std::vector<double> suffix(static_cast<std::size_t>(stop + 1), 0.0);
  for (std::int64_t j = stop - 1; j >= 0; --j) suffix[static_cast<std::size_t>(j)] = suffix[static_cast<std::size_t>(j + 1)] + bins[static_cast<std::size_t>(j)];
  for (std::int64_t i = start_bin; i <= stop; ++i) {
    // Bin j < i falls in level floor(j * nbins / i) (numpy's digitize over linspace(0, i, nbins + 1)
    // is exact here); empty bins take no part. Each non-empty bin of a level gets the level's mean.
    std::fill(level_sum.begin(), level_sum.end(), 0.0);
    std::fill(level_n.begin(), level_n.end(), 0.0);
    for (std::int64_t j = 0; j < i; ++j) {
      if (bins[static_cast<std::size_t>(j)] == 0.0) continue;
      const auto level = static_cast<std::size_t>(j * nbins / i);
      level_sum[level] += bins[static_cast<std::size_t>(j)];
      level_n[level] += 1.0;
    }
    double sum_p = 0.0, sum_q = 0.0;
    for (std::int64_t j = 0; j < i; ++j) {
      double p = bins[static_cast<std::size_t>(j)];
      if (j == i - 1) p += suffix[static_cast<std::size_t>(i)];
      sum_p += p;
      if (bins[static_cast<std::size_t>(j)] != 0.0) {
        const auto level = static_cast<std::size_t>(j * nbins / i);
        sum_q += level_sum[level] / level_n[level];
      }
    }
    // scipy.stats.entropy(p, q): both normalized, sum p*log(p/q); infinite where q = 0 < p.
    double kl = 0.0;
    for (std::int64_t j = 0; j < i && std::isfinite(kl); ++j) {
      double p = bins[static_cast<std::size_t>(j)];
      if (j == i - 1) p += suffix[static_cast<std::size_t>(i)];
      if (p == 0.0) continue;
      double q = 0.0;
      if (bins[static_cast<std::size_t>(j)] != 0.0) {
        const auto level = static_cast<std::size_t>(j * nbins / i);
        q = level_sum[level] / level_n[level];
      }
      if (q == 0.0) {
        kl = std::numeric_limits<double>::infinity();
        break;
      }
      const double pn = p / sum_p, qn = q / sum_q;
      kl += pn * std::log(pn / qn);
    }
    if (kl <= best) {  // the last minimum
      best = kl;
      best_i = i;
    }
  }
  return edges_[static_cast<std::size_t>(std::min<std::int64_t>(best_i, static_cast<std::int64_t>(edges_.size()) - 1))];
}

float HistogramCalibrator::compute(CalibMethod method, Element element, double percentile) const {
  switch (method) {
    case CalibMethod::percentile: return percentile_amax(percentile);
    case CalibMethod::mse: return mse_amax(element);
    case CalibMethod::entropy: return entropy_amax(element);
    case CalibMethod::max: break;
  }
  fail("the max calibrator needs no histogram");
}

}  // namespace mopt::quant
