#include "algo/smoothing.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/convert.h"
#include "core/dtype.h"
#include "core/error.h"
#include "kernels/gemm.h"
#include "quant/fake_quant.h"

namespace mopt::algo {

namespace {

constexpr float kTiny = std::numeric_limits<float>::min();  // torch.finfo(torch.float32).tiny

// torch's pow(tensor, scalar) special cases: x^0 = 1, x^1 = x, x^0.5 = sqrt(x).
float torch_pow(float x, float e) {
  if (e == 0.0f) return 1.0f;
  if (e == 1.0f) return x;
  if (e == 0.5f) return std::sqrt(x);
  if (e == 2.0f) return x * x;
  return std::pow(x, e);
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

}  // namespace

void round_to_dtype(DType dtype, std::span<float> values) {
  if (dtype == DType::F32 || values.empty()) return;
  std::vector<std::uint8_t> buf(values.size() * 8);
  convert_from_f32(dtype, values.data(), buf.data(), values.size());
  convert_to_f32(dtype, buf.data(), values.data(), values.size());
}

std::vector<float> smoothquant_scale(std::span<const float> act_amax, const float* w, std::int64_t out, std::int64_t in,
                                     float alpha) {
  if (static_cast<std::int64_t>(act_amax.size()) != in) fail("SmoothQuant: {} activation maxima for {} input channels", act_amax.size(), in);
  std::vector<float> wmax(static_cast<std::size_t>(in), 0.0f);
  for (std::int64_t r = 0; r < out; ++r) {
    const float* row = w + r * in;
    for (std::int64_t j = 0; j < in; ++j) wmax[j] = std::max(wmax[j], std::fabs(row[j]));
  }
  const float e_w = static_cast<float>(1.0 - static_cast<double>(alpha));
  std::vector<float> s(static_cast<std::size_t>(in));
  constexpr float kEpsilon = 1.0f / static_cast<float>(1u << 31);
  for (std::int64_t j = 0; j < in; ++j) {
    float v = torch_pow(wmax[j], e_w) / torch_pow(act_amax[j], alpha);
    if (act_amax[j] <= kEpsilon) v = 1.0f;  // a dead channel: leave it alone
    s[j] = std::clamp(v, 1e-4f, 1e4f);
  }
  return s;
}

std::vector<float> awq_alphas() {
  std::vector<float> a;
  for (int k = 0; k <= 10; ++k) a.push_back(static_cast<float>(k / 10.0));
  return a;
}

std::vector<float> awq_weight_scale(const float* w, std::int64_t out, std::int64_t in, std::int64_t block) {
  if (block <= 0) block = in;
  std::vector<double> sum(static_cast<std::size_t>(in), 0.0);
  for (std::int64_t r = 0; r < out; ++r) {
    const float* row = w + r * in;
    for (std::int64_t c0 = 0; c0 < in; c0 += block) {
      const std::int64_t len = std::min(block, in - c0);
      float m = 0.0f;
      for (std::int64_t j = 0; j < len; ++j) m = std::max(m, std::fabs(row[c0 + j]));
      const float d = m + kTiny;
      for (std::int64_t j = 0; j < len; ++j) sum[c0 + j] += std::fabs(row[c0 + j]) / d;
    }
  }
  std::vector<float> s(static_cast<std::size_t>(in));
  for (std::int64_t j = 0; j < in; ++j) s[j] = static_cast<float>(sum[j] / static_cast<double>(out));
  return s;
}

std::vector<float> awq_scale(std::span<const float> act_scale, std::span<const float> weight_scale, float alpha) {
  if (act_scale.size() != weight_scale.size()) fail("AWQ: {} activation scales for {} weight scales", act_scale.size(), weight_scale.size());
  const float e_w = static_cast<float>(1.0 - static_cast<double>(alpha));
  std::vector<float> s(act_scale.size());
  float lo = std::numeric_limits<float>::infinity(), hi = 0.0f;
  for (std::size_t j = 0; j < s.size(); ++j) {
    s[j] = std::clamp(torch_pow(act_scale[j], alpha) / (torch_pow(weight_scale[j], e_w) + kTiny), 1e-4f, 1e4f);
    lo = std::min(lo, s[j]);
    hi = std::max(hi, s[j]);
  }
  const float norm = std::sqrt(hi * lo);
  for (float& v : s) v = v / norm;
  return s;
}

void MeanAbsAccumulator::add(const float* x, std::int64_t rows, std::int64_t cols) {
  if (rows <= 0) return;
  if (sum_.empty()) sum_.assign(static_cast<std::size_t>(cols), 0.0f);
  std::vector<double> s(static_cast<std::size_t>(cols), 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * cols;
    for (std::int64_t j = 0; j < cols; ++j) s[j] += std::fabs(row[j]);
  }
  for (std::int64_t j = 0; j < cols; ++j) sum_[j] += static_cast<float>(s[j] / static_cast<double>(rows));
  ++batches_;
}

std::vector<float> MeanAbsAccumulator::mean() const {
  std::vector<float> m = sum_;
  for (float& v : m) v = v / static_cast<float>(batches_);
  return m;
}

AwqLiteSearch::AwqLiteSearch(const quant::QuantizerSpec& weight_spec, const float* w, std::int64_t out, std::int64_t in,
                             std::span<const float> act_scale, const std::vector<double>& gram, DType dtype,
                             std::span<const float> ggml_importance)
    : alphas_(awq_alphas()), act_scale_(act_scale.begin(), act_scale.end()) {
  if (!ggml_importance.empty() && static_cast<std::int64_t>(ggml_importance.size()) != in) {
    fail("AWQ: {} importance values for {} input columns", ggml_importance.size(), in);
  }
  // W4A8's FP8 second stage is left out of the search, as the reference searches with the INT4 stage alone.
  quant::QuantizerSpec spec = weight_spec;
  spec.fp8_second_stage = false;
  if (static_cast<std::int64_t>(gram.size()) != in * in) fail("AWQ: a Gram matrix of {} values for {} input columns", gram.size(), in);
  const bool blocked = spec.scaling == quant::Scaling::block || spec.scaling == quant::Scaling::nvfp4 || spec.scaling == quant::Scaling::mx;
  weight_scale_ = awq_weight_scale(w, out, in, blocked && spec.block_rows == 0 ? spec.block : 0);
  loss_.assign(alphas_.size(), 0.0);
  std::vector<float> ws(static_cast<std::size_t>(out * in));
  std::vector<double> e(ws.size()), eg(ws.size());
  for (std::size_t a = 0; a < alphas_.size(); ++a) {
    std::vector<float> s = awq_scale(act_scale_, weight_scale_, alphas_[a]);
    std::vector<float> inv(s.size());
    for (std::size_t j = 0; j < s.size(); ++j) inv[j] = 1.0f / s[j];
    round_to_dtype(dtype, inv);
    round_to_dtype(dtype, s);
    for (std::int64_t r = 0; r < out; ++r) {
      for (std::int64_t j = 0; j < in; ++j) ws[r * in + j] = w[r * in + j] * s[j];
    }
    if (spec.grid == quant::IntGrid::ggml) {
      std::vector<float> importance(ggml_importance.begin(), ggml_importance.end());
      for (std::size_t j = 0; j < importance.size(); ++j) importance[j] = importance[j] * inv[j] * inv[j];
      quant::fake_quantize_ggml(spec, ws.data(), out, in, importance, ws.data());
    } else {
      // An uncalibrated quantizer takes its amax from what it quantizes.
      const std::vector<float> amax = quant::compute_amax(spec, ws.data(), out, in);
      quant::fake_quantize(spec, ws.data(), out, in, amax, ws.data());
    }
    for (std::int64_t r = 0; r < out; ++r) {
      for (std::int64_t j = 0; j < in; ++j) e[r * in + j] = static_cast<double>(ws[r * in + j]) * inv[j] - w[r * in + j];
    }
    kernels::matmul_f64(false, false, out, in, in, e.data(), in, gram.data(), in, eg.data(), in, false);
    double sum = 0.0;
    for (std::size_t i = 0; i < e.size(); ++i) sum += e[i] * eg[i];
    loss_[a] = sum / static_cast<double>(out);
  }
}

float AwqLiteSearch::best_alpha() const {
  std::size_t best = 0;
  for (std::size_t a = 1; a < loss_.size(); ++a) {
    if (loss_[a] < loss_[best]) best = a;
  }
  return alphas_[best];
}

std::vector<float> AwqLiteSearch::scale(float alpha) const { return awq_scale(act_scale_, weight_scale_, alpha); }

std::vector<float> awq_clip_ratios() {
  std::vector<float> r;
  for (int k = 0; k < 10; ++k) r.push_back(static_cast<float>((50 + 5 * k) / 100.0));
  r.push_back(1.0f);
  return r;
}

void ClipSampler::add(const float* x, std::int64_t rows, std::int64_t cols) {
  if (rows <= 0) return;
  cols_ = cols;
  const std::int64_t step = std::max<std::int64_t>(1, rows / 64);
  std::int64_t n = 0;
  for (std::int64_t r = 0; r < rows; r += step, ++n) rows_.insert(rows_.end(), x + r * cols, x + (r + 1) * cols);
  batch_rows_.push_back(n);
}

std::vector<float> awq_clip_search(const quant::QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in,
                                   const ClipSampler& inputs, std::span<const float> input_scale) {
  if (spec.scaling != quant::Scaling::block || spec.block_rows != 0) {
    fail("awq_clip searches per-block clip ratios of block-quantized weights; {} has no such blocks", spec.describe());
  }
  if (inputs.cols() != in) fail("awq_clip: sampled inputs have {} columns for a weight with {}", inputs.cols(), in);
  const std::int64_t B = spec.block, nb = ceil_div(in, B);
  const std::vector<float> w_amax = quant::compute_amax(spec, w, out, in);
  const std::vector<float> ratios = awq_clip_ratios();
  const std::int64_t T = static_cast<std::int64_t>(inputs.rows().size()) / std::max<std::int64_t>(1, in);

  // The sampled inputs, scaled, one contiguous [T, B] panel per block (zero-padded).
  std::vector<float> xb(static_cast<std::size_t>(nb * T * B), 0.0f);
  for (std::int64_t t = 0; t < T; ++t) {
    const float* row = inputs.rows().data() + t * in;
    for (std::int64_t j = 0; j < in; ++j) {
      const float v = input_scale.empty() ? row[j] : row[j] * input_scale[j];
      xb[((j / B) * T + t) * B + j % B] = v;
    }
  }
  std::vector<double> best_loss(static_cast<std::size_t>(out * nb), std::numeric_limits<double>::infinity());
  std::vector<float> best(static_cast<std::size_t>(out * nb), 0.0f);
  std::vector<float> dw(static_cast<std::size_t>(out * B)), d(static_cast<std::size_t>(T * out)), amax(w_amax.size());
  std::vector<double> loss(static_cast<std::size_t>(out));
  for (const float r : ratios) {
    for (std::size_t i = 0; i < amax.size(); ++i) amax[i] = w_amax[i] * r;
    for (std::int64_t b = 0; b < nb; ++b) {
      const std::int64_t c0 = b * B, len = std::min(B, in - c0);
      // dW = Q(W) - W on this block, [out, B] zero-padded.
      for (std::int64_t o = 0; o < out; ++o) {
        const float a = amax[o * nb + b];
        for (std::int64_t j = 0; j < B; ++j) {
          float v = 0.0f;
          if (j < len) {
            const float x = w[o * in + c0 + j];
            v = quant::fake_quant_integer(spec, x, a) - x;
          }
          dw[o * B + j] = v;
        }
      }
      // The error of the block's partial dot product for every sampled input: [T, out].
      kernels::matmul_f32(false, true, T, out, B, xb.data() + b * T * B, B, dw.data(), B, d.data(), out, false);
      std::fill(loss.begin(), loss.end(), 0.0);
      std::int64_t t0 = 0;
      for (const std::int64_t n : inputs.batch_rows()) {
        for (std::int64_t o = 0; o < out; ++o) {
          double s = 0.0;
          for (std::int64_t t = t0; t < t0 + n; ++t) s += static_cast<double>(d[t * out + o]) * d[t * out + o];
          loss[o] += s / static_cast<double>(n);
        }
        t0 += n;
      }
      for (std::int64_t o = 0; o < out; ++o) {
        const std::size_t k = static_cast<std::size_t>(o * nb + b);
        if (loss[o] < best_loss[k]) {
          best_loss[k] = loss[o];
          best[k] = amax[k];
        }
      }
    }
  }
  return best;
}

}  // namespace mopt::algo
