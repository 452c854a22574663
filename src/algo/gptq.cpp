#include "algo/gptq.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "io/ggml_grid.h"
#include "kernels/gemm.h"
#include "kernels/linalg.h"
#include "quant/fake_quant.h"
#include "quant/qtensor.h"

namespace mopt::algo {

namespace {

using quant::Element;
using quant::Scaling;

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// One element of column `col`, row `row` on the grid fixed by the original weight's scales.
class GridQuantizer {
 public:
  GridQuantizer(const quant::QuantizerSpec& spec, const float* w, std::int64_t out, std::int64_t in, std::span<const float> amax,
                std::span<const float> block_amax, std::span<const float> ggml_importance)
      : spec_(spec), amax_(amax.begin(), amax.end()) {
    if (spec.grid == quant::IntGrid::ggml) {
      // llama.cpp's blocks of the weight as it is now fix every sub-block's step and minimum.
      const Tensor b = quant::quantize_weight(spec, w, out, in, {}, 0.0f, {}, {ggml_importance, {}}).weight;
      const auto* bytes = reinterpret_cast<const std::byte*>(b.data<std::uint8_t>());
      blocks_.assign(bytes, bytes + b.numel());
      const std::size_t row_bytes = blocks_.size() / static_cast<std::size_t>(out);
      for (std::int64_t r = 0; r < out; ++r) {
        rows_.push_back(io::ggml_grid(spec.ggml_type, std::span(blocks_).subspan(static_cast<std::size_t>(r) * row_bytes, row_bytes),
                                      static_cast<std::uint64_t>(in)));
      }
      return;
    }
    if (spec.scaling == Scaling::block || spec.scaling == Scaling::nvfp4) nb_ = ceil_div(in, spec.block);
    if (static_cast<std::int64_t>(amax_.size()) != quant::amax_count(spec, out, in)) {
      fail("GPTQ: {} amax values for a [{}, {}] weight quantized {}", amax_.size(), out, in, spec.describe());
    }
    if (spec.scaling == Scaling::nvfp4) {
      if (static_cast<std::int64_t>(block_amax.size()) != out * nb_) fail("GPTQ: {} NVFP4 block maxima for {} blocks", block_amax.size(), out * nb_);
      for (const float m : block_amax) step_.push_back(quant::nvfp4_export_step(m, amax_[0]));
    }
  }

  const std::vector<std::byte>& ggml_blocks() const { return blocks_; }

  float operator()(std::int64_t row, std::int64_t col, float x) const {
    if (spec_.grid == quant::IntGrid::ggml) {
      const io::GgmlGrid& g = rows_[static_cast<std::size_t>(row)];
      return g.round(static_cast<std::size_t>(col / g.sub_block), x);
    }
    if (spec_.scaling == Scaling::nvfp4) {  // the export's grid: E2M1 times the block's fixed step
      const float step = step_[static_cast<std::size_t>(row * nb_ + col / spec_.block)];
      const float q = quant::round_e2m1_magnitude(std::fabs(x) / step) * step;
      return x < 0.0f ? -q : q;
    }
    const float a = amax_for(row, col);
    switch (spec_.element) {
      case Element::int8:
      case Element::int4: return quant::fake_quant_integer(spec_, x, a);
      case Element::e4m3: return quant::fake_quant_e4m3(x, a);
      default: fail("GPTQ: no grid for {}", spec_.describe());
    }
  }

 private:
  float amax_for(std::int64_t row, std::int64_t col) const {
    switch (spec_.scaling) {
      case Scaling::per_tensor: return amax_[0];
      case Scaling::per_row: return amax_[static_cast<std::size_t>(row)];
      case Scaling::block:
        if (spec_.block_rows > 0) return amax_[static_cast<std::size_t>((row / spec_.block_rows) * nb_ + col / spec_.block)];
        return amax_[static_cast<std::size_t>(row * nb_ + col / spec_.block)];
      default: fail("GPTQ: no static scales for {}", spec_.describe());
    }
  }

  quant::QuantizerSpec spec_;
  std::int64_t nb_ = 0;
  std::vector<float> amax_;
  std::vector<float> step_;  // NVFP4: per block
  std::vector<std::byte> blocks_;    // ggml blocks: the ones the grid was fixed from
  std::vector<io::GgmlGrid> rows_;  // ... and each row's grid from them
};

}  // namespace

// tr(D H D^T) for D [out, n] (f64) and symmetric H [n, n].
double weighted_norm(const std::vector<double>& d, std::int64_t out, std::int64_t n, const std::vector<double>& h) {
  std::vector<double> dh(static_cast<std::size_t>(out * n));
  kernels::matmul_f64(false, false, out, n, n, d.data(), n, h.data(), n, dh.data(), n, false);
  double s = 0.0;
  for (std::size_t i = 0; i < dh.size(); ++i) s += dh[i] * d[i];
  return s;
}

// The upper Cholesky factor U of (H + damp I)^-1 (H^-1 = U^T U), row-major; false when H is not positive definite.
bool inverse_cholesky_upper(std::vector<double> h, std::int64_t n, double damp, std::vector<double>& u) {
  for (std::int64_t i = 0; i < n; ++i) h[i * n + i] += damp;
  // H^-1 = L^-T L^-1 from H = L L^T, then H^-1 = M M^T; U = M^T.
  if (!kernels::cholesky_lower(h.data(), n)) return false;
  std::vector<double> inverse(h.size());
  kernels::inverse_from_cholesky(h.data(), n, inverse.data());
  if (!kernels::cholesky_lower(inverse.data(), n)) return false;
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t c = 0; c < n; ++c) h[r * n + c] = inverse[c * n + r];
  }
  u = std::move(h);
  return true;
}

DampedInverse damped_inverse_cholesky(const std::vector<double>& h, std::int64_t n, double damp_fraction) {
  double mean_diag = 0.0;
  for (std::int64_t i = 0; i < n; ++i) mean_diag += h[i * n + i];
  mean_diag /= static_cast<double>(n);
  DampedInverse r;
  double damp = damp_fraction * mean_diag;
  bool ok = inverse_cholesky_upper(h, n, damp, r.u);
  while (!ok && r.retries < 4) {
    ++r.retries;
    damp *= 10.0;
    ok = inverse_cholesky_upper(h, n, damp, r.u);
  }
  if (!ok) {
    r.fell_back = true;
    r.u.assign(static_cast<std::size_t>(n * n), 0.0);
    for (std::int64_t i = 0; i < n; ++i) r.u[i * n + i] = 1.0;
  }
  return r;
}

void GramAccumulator::add(const float* x, std::int64_t rows, std::int64_t cols, double weight) {
  if (rows <= 0) return;
  if (sum_.empty()) {
    cols_ = cols;
    sum_.assign(static_cast<std::size_t>(cols * cols), 0.0);
    batch_.assign(static_cast<std::size_t>(cols * cols), 0.0f);
  }
  if (cols != cols_) fail("Gram matrix: inputs of {} columns after {}", cols, cols_);
  kernels::gram_upper_f32(x, rows, cols, batch_.data());
  for (std::int64_t r = 0; r < cols; ++r) {
    for (std::int64_t c = r; c < cols; ++c) sum_[r * cols + c] += weight * batch_[r * cols + c];
  }
  samples_ += rows;
}

std::vector<double> GramAccumulator::full(double factor) const {
  if (samples_ == 0) return {};
  std::vector<double> h(sum_.size());
  for (std::int64_t r = 0; r < cols_; ++r) {
    for (std::int64_t c = r; c < cols_; ++c) h[r * cols_ + c] = h[c * cols_ + r] = factor * sum_[r * cols_ + c];
  }
  return h;
}

void obs_sweep(std::vector<double>& wd, std::int64_t out, std::int64_t in, const std::vector<double>& u, std::int64_t block,
               const std::function<void(std::int64_t i)>& before_column,
               const std::function<double(std::int64_t r, std::int64_t i, double x)>& target) {
  if (block <= 0) fail("the OBS sweep's block size must be positive (got {})", block);
  std::vector<double> err(static_cast<std::size_t>(out * block));
  for (std::int64_t b0 = 0; b0 < in; b0 += block) {
    const std::int64_t b1 = std::min(b0 + block, in), nb = b1 - b0;
    for (std::int64_t i = b0; i < b1; ++i) {
      if (before_column) before_column(i);
      const double d = u[i * in + i];
      for (std::int64_t r = 0; r < out; ++r) {
        double* row = wd.data() + r * in;
        const double x = row[i];
        const double q = target(r, i, x);
        const double e = (x - q) / d;
        row[i] = q;
        for (std::int64_t j = i + 1; j < b1; ++j) row[j] -= e * u[i * in + j];
        err[r * block + (i - b0)] = e;
      }
    }
    if (b1 < in) {
      // wd[:, b1:] -= err [out, nb] · U[b0:b1, b1:]
      // (err is negated so the product accumulates.)
      for (double& e : err) e = -e;
      kernels::matmul_f64(false, false, out, in - b1, nb, err.data(), block, u.data() + b0 * in + b1, in, wd.data() + b1, in, true);
    }
  }
}

std::vector<double> gptq_hessian(const GramAccumulator& gram) { return gram.full(2.0 / static_cast<double>(std::max<std::int64_t>(1, gram.samples()))); }

bool gptq_supports(const quant::QuantizerSpec& spec) {
  if (spec.fp8_second_stage) return false;
  if (spec.element == Element::e2m1 && spec.scaling == Scaling::nvfp4) return true;
  const bool grid = spec.element == Element::int8 || spec.element == Element::int4 || spec.element == Element::e4m3;
  const bool scales = spec.scaling == Scaling::per_tensor || spec.scaling == Scaling::per_row || spec.scaling == Scaling::block;
  return grid && scales;
}

GptqResult gptq_quantize(const quant::QuantizerSpec& spec, float* w, std::int64_t out, std::int64_t in, std::span<const float> amax,
                         std::vector<double> h, const GptqOptions& options, std::span<const float> nvfp4_block_amax) {
  if (!gptq_supports(spec)) fail("GPTQ is not implemented for weights quantized {}", spec.describe());
  if (static_cast<std::int64_t>(h.size()) != in * in) fail("GPTQ: a Hessian of {} values for {} input columns", h.size(), in);
  if (options.block <= 0) fail("GPTQ block size must be positive");
  std::vector<float> own_block_amax;
  if (spec.scaling == Scaling::nvfp4 && nvfp4_block_amax.empty()) {
    own_block_amax = quant::nvfp4_block_amax(spec, w, out, in);
    nvfp4_block_amax = own_block_amax;
  }
  const GridQuantizer grid(spec, w, out, in, amax, nvfp4_block_amax, options.ggml_importance);
  GptqResult result;
  result.ggml_grid_blocks = grid.ggml_blocks();

  // Dead columns (all-zero weight columns): their Hessian row and column become those of the identity.
  for (std::int64_t c = 0; c < in; ++c) {
    bool dead = true;
    for (std::int64_t r = 0; r < out && dead; ++r) dead = w[r * in + c] == 0.0f;
    if (!dead) continue;
    for (std::int64_t i = 0; i < in; ++i) h[c * in + i] = h[i * in + c] = 0.0;
    h[c * in + c] = 1.0;
  }
  const std::vector<double> h_undamped = h;

  // Column order.
  std::vector<std::int64_t> perm(static_cast<std::size_t>(in));
  std::iota(perm.begin(), perm.end(), 0);
  if (options.act_order) {
    std::stable_sort(perm.begin(), perm.end(), [&](std::int64_t a, std::int64_t b) { return h[a * in + a] > h[b * in + b]; });
    std::vector<double> hp(h.size());
    for (std::int64_t i = 0; i < in; ++i) {
      for (std::int64_t j = 0; j < in; ++j) hp[i * in + j] = h[perm[i] * in + perm[j]];
    }
    h.swap(hp);
  }

  // A Hessian that stays indefinite gives the identity, as the reference does: plain rounding.
  DampedInverse inv = damped_inverse_cholesky(h, in, options.damp);
  const std::vector<double>& u = inv.u;
  result.damp_retries = inv.retries;
  result.fell_back = inv.fell_back;

  // Working copy in the permuted column order, f64.
  std::vector<double> wd(static_cast<std::size_t>(out * in)), orig(static_cast<std::size_t>(out * in));
  for (std::int64_t r = 0; r < out; ++r) {
    for (std::int64_t j = 0; j < in; ++j) wd[r * in + j] = w[r * in + perm[j]];
  }
  // Plain rounding's error, for the report.
  {
    std::vector<double> d(static_cast<std::size_t>(out * in));
    for (std::int64_t r = 0; r < out; ++r) {
      for (std::int64_t c = 0; c < in; ++c) {
        orig[r * in + c] = w[r * in + c];
        const bool pruned = options.mask != nullptr && options.mask[r * in + c] == 0;
        d[r * in + c] = (pruned ? 0.0 : static_cast<double>(grid(r, c, w[r * in + c]))) - w[r * in + c];
      }
    }
    const double base = weighted_norm(orig, out, in, h_undamped);
    result.error_rtn = base > 0.0 ? weighted_norm(d, out, in, h_undamped) / base : 0.0;
  }

  obs_sweep(wd, out, in, u, options.block, nullptr, [&](std::int64_t r, std::int64_t i, double x) {
    const std::int64_t col = perm[i];
    const bool pruned = options.mask != nullptr && options.mask[r * in + col] == 0;
    return pruned ? 0.0 : static_cast<double>(grid(r, col, static_cast<float>(x)));
  });
  std::vector<double> d(static_cast<std::size_t>(out * in));
  for (std::int64_t r = 0; r < out; ++r) {
    for (std::int64_t j = 0; j < in; ++j) {
      const float q = static_cast<float>(wd[r * in + j]);
      w[r * in + perm[j]] = q;
      d[r * in + perm[j]] = static_cast<double>(q) - orig[r * in + perm[j]];
    }
  }
  const double base = weighted_norm(orig, out, in, h_undamped);
  result.error_gptq = base > 0.0 ? weighted_norm(d, out, in, h_undamped) / base : 0.0;
  return result;
}

}  // namespace mopt::algo
