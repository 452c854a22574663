#include "kernels/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "core/convert.h"
#include "core/error.h"
#include "core/cpu_features.h"
#include "core/startup_settings.h"
#include "core/thread_pool.h"
#include "kernels/gemm_amx.h"
#include "kernels/gemm_simd.h"

namespace mopt::kernels {

namespace {

constexpr std::int64_t kPanel = avx512::kPanelColumns;
// Input pairs per pass over a packed panel: 128 pairs x 64 columns x 4 bytes = 32 KiB, the L1 data cache.
constexpr std::int64_t kPairsPerPass = 128;
// The same for the int8 panel: 128 quads (512 inputs) x 64 columns x 4 bytes.
constexpr std::int64_t kQuadsPerPass = 128;
// The fewest rows of x gemm_f32_strided gives one block when it splits the rows.
constexpr std::int64_t kMinBlockRows = 32;
// Row blocks of matmul_f32 are multiples of this many rows, column blocks of 64.
constexpr std::int64_t kBlockAlign = 16;

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Rows of x packed in blocks of 6 (gemm_simd.h) once per product, shared by the threads.
template <class PackBlock>
void pack_input(std::int64_t m, std::int64_t block_dwords, std::vector<std::uint32_t>& xp, const PackBlock& pack_block) {
  const std::int64_t blocks = ceil_div(m, avx512::kRowBlock);
  xp.resize(static_cast<std::size_t>(blocks * block_dwords));
  std::uint32_t* dst = xp.data();  // thread_local in the caller: the workers must see this thread's buffer
  auto pack = [&](std::int64_t b) {
    const std::int64_t i0 = b * avx512::kRowBlock;
    pack_block(i0, std::min(avx512::kRowBlock, m - i0), dst + b * block_dwords);
  };
  // In parallel only when it is worth a synchronization of the threads (a few hundred microseconds of work).
  if (blocks * block_dwords > (std::int64_t{1} << 20)) {
    parallel_for(blocks, pack);
  } else {
    for (std::int64_t b = 0; b < blocks; ++b) pack(b);
  }
}

// The bf16 product over packed panels: each thread takes whole panels of 64 weight rows, packs one
// and runs every input row through it, a pass of kPairsPerPass input pairs at a time.
template <class Pack>
void gemm_bf16_panels(const float* x, std::int64_t m, std::int64_t k, std::int64_t n, float* y, const Pack& pack) {
  const std::int64_t pairs = (k + 1) / 2;
  thread_local std::vector<std::uint32_t> xp_buffer;
  pack_input(m, pairs * avx512::kRowBlock, xp_buffer, [&](std::int64_t i0, std::int64_t rows, std::uint32_t* block) {
    avx512::pack_rows_bf16(x + i0 * k, k, rows, k, block);
  });
  const std::uint32_t* xp = xp_buffer.data();
  const std::int64_t panels = ceil_div(n, kPanel);
  parallel_for(panels, [&](std::int64_t p) {
    thread_local std::vector<std::uint32_t> panel;
    panel.resize(static_cast<std::size_t>(pairs * kPanel));
    const std::int64_t r0 = p * kPanel, rows = std::min(kPanel, n - r0);
    pack(r0, rows, panel.data());
    for (std::int64_t q0 = 0; q0 < pairs; q0 += kPairsPerPass) {
      avx512::gemm_bf16_panel(xp, pairs, m, q0, std::min(kPairsPerPass, pairs - q0), panel.data() + q0 * kPanel, rows, y + r0, n, q0 > 0);
    }
  });
}

}  // namespace

bool bf16_gemm_available() {
  const auto& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512_bf16;
}

namespace {

// Precision::bf16 runs our bf16 kernels where their tile outruns an f32 FMA tile by this much
// (bf16_tile_over_fma_tile); below it OpenBLAS's f32 GEMM, which runs at ~85% of the FMA rate, is as
// fast or faster. Measured ratios are far from it on both sides (Zen 4 ~2, Emerald Rapids 0.7), so
// the choice does not flip between runs.
constexpr double kBf16OverFmaMin = 1.25;

struct Bf16Choice {
  bool kernels = false;
  double ratio = 0.0;          // measured; 0 when not measured
  const char* forced = nullptr;  // MOPT_BF16_PRODUCTS, when it decided
};

const Bf16Choice& bf16_choice() {
  static const Bf16Choice choice = [] {
    Bf16Choice c;
    if (!bf16_gemm_available()) return c;
    const char* env = std::getenv("MOPT_BF16_PRODUCTS");
    if (const auto forced = parse_bf16_products(env)) {
      c.kernels = *forced;
      c.forced = env;
      return c;
    }
    c.ratio = avx512::bf16_tile_over_fma_tile();
    c.kernels = c.ratio >= kBf16OverFmaMin;
    return c;
  }();
  return choice;
}

}  // namespace

std::optional<bool> parse_bf16_products(const char* value) {
  if (value == nullptr) return std::nullopt;
  if (std::strcmp(value, "kernels") == 0) return true;
  if (std::strcmp(value, "f32") == 0) return false;
  throw Error(fmt::format("MOPT_BF16_PRODUCTS={}: expected kernels or f32 (or leave it unset)", value));
}

bool bf16_kernels_chosen() { return bf16_choice().kernels; }

bool vnni_gemm_available() {
  const auto& f = cpu_features();
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512_vnni;
}

std::string describe_gemm() {
  std::string s = "bf16 products: ";
  const Bf16Choice& c = bf16_choice();
  if (!bf16_gemm_available()) {
    s += "f32 (no avx512_bf16)";
  } else if (c.forced != nullptr) {
    s += c.kernels ? "avx512_bf16" : "f32";
    s += fmt::format(" (MOPT_BF16_PRODUCTS={})", c.forced);
  } else {
    s += c.kernels ? "avx512_bf16" : "f32";
    s += fmt::format(" (VDPBF16PS tile {:.2f}x the f32 FMA tile{})", c.ratio, c.kernels ? "" : ": the f32 GEMM is faster here");
  }
  s += "; int8: ";
  s += vnni_gemm_available() ? "avx512_vnni" : avx2_kernels_available() ? "avx2" : "plain";
  s += "; f32: OpenBLAS ";
  s += describe_blas_kernels();
  s += "; train --precision bf16: ";
  s += amx_bf16_products() ? "amx_bf16 tiles" : "bf16-rounded operands through the f32 GEMM (no amx_bf16)";
  return s;
}

void gemm_f32_strided(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y,
                      std::int64_t ldy, bool accumulate) {
  matmul_f32(false, true, m, n, k, x, k, w, k, y, ldy, accumulate);
}

namespace {

// How matmul_blocks cuts a product: C in blocks of mt rows by nt columns and, when kt < k, the sum
// over k in chunks of kt (chunk 0 into C, the others into partial products added after, in order).
struct ProductBlocks {
  std::int64_t mt, nt, kt;
};

// Partial products of a split sum are kept below this many elements (16 MiB of f32).
constexpr std::int64_t kMaxPartialElements = std::int64_t{1} << 22;

ProductBlocks choose_blocks(std::int64_t m, std::int64_t n, std::int64_t k) {
  const std::int64_t macs = m * n * k;
  if (macs < (std::int64_t{1} << 21)) return {m, n, k};
  const double target = std::max(static_cast<double>(std::int64_t{1} << 20), static_cast<double>(macs) / 16.0);
  const auto round_up = [](std::int64_t v, std::int64_t to) { return (std::max<std::int64_t>(v, 1) + to - 1) / to * to; };
  // Blocks of C of about `target` multiply-adds over a depth of kt, about square.
  const auto c_blocks = [&](std::int64_t kt) {
    const auto side = static_cast<std::int64_t>(std::sqrt(target / static_cast<double>(kt)));
    const std::int64_t mt = std::min(round_up(m, kBlockAlign), round_up(std::max(side, kMinBlockRows), kBlockAlign));
    const std::int64_t nt = std::min(round_up(n, 64), round_up(static_cast<std::int64_t>(target / static_cast<double>(mt * kt)), 64));
    return ProductBlocks{mt, nt, kt};
  };
  // The same cut evenly (no thin blocks at the edges), for the chunks of a split sum.
  const auto even_blocks = [&](std::int64_t kt) {
    const double area = target / static_cast<double>(kt);  // mt * nt
    const std::int64_t row_blocks = std::max<std::int64_t>(1, std::llround(static_cast<double>(m) / std::sqrt(area)));
    const std::int64_t mt = round_up((m + row_blocks - 1) / row_blocks, kBlockAlign);
    const std::int64_t col_blocks = std::max<std::int64_t>(1, std::llround(static_cast<double>(n) * static_cast<double>(mt) / area));
    return ProductBlocks{mt, round_up((n + col_blocks - 1) / col_blocks, kBlockAlign), kt};
  };
  // A block's OpenBLAS call copies (mt + nt) * kt operands for mt * nt * kt multiply-adds; a chunk of a
  // split sum writes and reads mt * nt partial sums more. Per multiply-add: 1/mt + 1/nt (+ 2/kt).
  const auto cost = [&](const ProductBlocks& b, bool split) {
    return 1.0 / static_cast<double>(std::min(b.mt, m)) + 1.0 / static_cast<double>(std::min(b.nt, n)) +
           (split ? 2.0 / static_cast<double>(b.kt) : 0.0);
  };
  ProductBlocks best = c_blocks(k);
  double best_cost = cost(best, false);
  // A long sum (dW = dYᵀ·X over many tokens) cut into chunks leaves larger blocks of C: its square
  // blocks would be thin (1.1-1.4x slower on the dW products of tiny-kjv and SmolLM2, bench/train_gemm_bench).
  for (std::int64_t chunks = 2; chunks <= 16; chunks *= 2) {
    const std::int64_t kt = round_up((k + chunks - 1) / chunks, kBlockAlign);
    if (kt < 256 || (chunks - 1) * m * n > kMaxPartialElements) break;
    const ProductBlocks split = even_blocks(kt);
    if (const double c = cost(split, true); c < best_cost) {
      best = split;
      best_cost = c;
    }
  }
  return best;
}

// C = op(A) · op(B) (+ C) over the pool in blocks; see matmul_f32 in gemm.h.
template <class T, class Blas>
void matmul_blocks(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const T* a, std::int64_t lda,
                   const T* b, std::int64_t ldb, T* c, std::int64_t ldc, bool accumulate, const Blas& blas) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (std::int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, T{0});
    }
    return;
  }
  // The pool splits C into blocks of rows by blocks of columns (and a long sum into chunks); each block
  // is one single-threaded OpenBLAS call, which packs its rows of op(A) and its columns of op(B):
  // (mt + nt) * k copies for mt * nt * k multiply-adds, so blocks are about square (choose_blocks).
  // OpenBLAS's own threads are not used here: their barriers wait for a descheduled thread
  // (bench/contention.sh) and their spinning takes the pool's cores.
  // The blocks depend on the shape alone, never on the thread count: OpenBLAS sums an element in an
  // order that depends on the block it lies in (its small-matrix kernels, its tails), so blocks chosen
  // by thread count gave other bits under 1, 2 and 3 threads, and a quantized export that changed with
  // the machine's cores. About 16 blocks (at least 2^20 multiply-adds each) keep up to 8 threads busy
  // with a few items each. The chunks of a split sum are added in their order, whatever the threads.
  start_thread_pool();  // OpenBLAS single-threaded
  const ProductBlocks pb = choose_blocks(m, n, k);
  const std::int64_t row_blocks = (m + pb.mt - 1) / pb.mt, col_blocks = (n + pb.nt - 1) / pb.nt, chunks = (k + pb.kt - 1) / pb.kt;
  thread_local std::vector<T> partial_buffer;  // the caller's: the workers must see this thread's buffer
  if (chunks > 1) partial_buffer.resize(static_cast<std::size_t>((chunks - 1) * m * n));
  T* partial = partial_buffer.data();
  parallel_for(chunks * row_blocks * col_blocks, [&](std::int64_t block) {
    const std::int64_t chunk = block / (row_blocks * col_blocks), in_chunk = block % (row_blocks * col_blocks);
    const std::int64_t i0 = in_chunk / col_blocks * pb.mt, j0 = in_chunk % col_blocks * pb.nt, p0 = chunk * pb.kt;
    const std::int64_t rows = std::min(pb.mt, m - i0), cols = std::min(pb.nt, n - j0), depth = std::min(pb.kt, k - p0);
    // Element (i, p) of op(A) is a[i * lda + p] untransposed, a[p * lda + i] transposed; likewise op(B)'s (p, j).
    const T* a_block = transpose_a ? a + p0 * lda + i0 : a + i0 * lda + p0;
    const T* b_block = transpose_b ? b + j0 * ldb + p0 : b + p0 * ldb + j0;
    // Chunk 0 goes into C; chunk q > 0 into its partial product [m, n].
    T* c_block = chunk == 0 ? c + i0 * ldc + j0 : partial + (chunk - 1) * m * n + i0 * n + j0;
    const std::int64_t ld = chunk == 0 ? ldc : n;
    blas(transpose_a ? CblasTrans : CblasNoTrans, transpose_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(rows),
         static_cast<blasint>(cols), static_cast<blasint>(depth), a_block, static_cast<blasint>(lda), b_block, static_cast<blasint>(ldb),
         chunk == 0 && accumulate ? T{1} : T{0}, c_block, static_cast<blasint>(ld));
  });
  if (chunks == 1) return;
  // C += partial 1 + partial 2 + ..., one after another for every element.
  parallel_ranges(m, std::max<std::int64_t>(1, 8192 / n), [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t i = r0; i < r1; ++i) {
      T* row = c + i * ldc;
      for (std::int64_t q = 0; q + 1 < chunks; ++q) {
        const T* p = partial + q * m * n + i * n;
        for (std::int64_t j = 0; j < n; ++j) row[j] += p[j];
      }
    }
  });
}

}  // namespace

std::int64_t matmul_sum_chunks(std::int64_t m, std::int64_t n, std::int64_t k) {
  if (m <= 0 || n <= 0 || k <= 0) return 1;
  const ProductBlocks pb = choose_blocks(m, n, k);
  return (k + pb.kt - 1) / pb.kt;
}

void matmul_f32(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  matmul_blocks(transpose_a, transpose_b, m, n, k, a, lda, b, ldb, c, ldc, accumulate,
                [](CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint rows, blasint cols, blasint depth, const float* ab, blasint la,
                   const float* bb, blasint lb, float beta, float* cb, blasint lc) {
                  cblas_sgemm(CblasRowMajor, ta, tb, rows, cols, depth, 1.0f, ab, la, bb, lb, beta, cb, lc);
                });
}

void matmul_f64(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
                std::int64_t lda, const double* b, std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate) {
  matmul_blocks(transpose_a, transpose_b, m, n, k, a, lda, b, ldb, c, ldc, accumulate,
                [](CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, blasint rows, blasint cols, blasint depth, const double* ab, blasint la,
                   const double* bb, blasint lb, double beta, double* cb, blasint lc) {
                  cblas_dgemm(CblasRowMajor, ta, tb, rows, cols, depth, 1.0, ab, la, bb, lb, beta, cb, lc);
                });
}

void gram_upper_f32(const float* x, std::int64_t rows, std::int64_t cols, float* g) {
  if (cols == 0) return;
  // Tiles of the upper triangle, fixed by the shape (never the thread count, as in matmul_blocks):
  // one single-threaded OpenBLAS call each, ssyrk on the diagonal, sgemm above it.
  start_thread_pool();
  const std::int64_t tile = cols <= 1024 ? 128 : 256;
  const std::int64_t tiles = (cols + tile - 1) / tile;
  std::vector<std::pair<std::int64_t, std::int64_t>> pairs;
  for (std::int64_t ti = 0; ti < tiles; ++ti) {
    for (std::int64_t tj = ti; tj < tiles; ++tj) pairs.emplace_back(ti, tj);
  }
  parallel_for(static_cast<std::int64_t>(pairs.size()), [&](std::int64_t p) {
    const auto [ti, tj] = pairs[static_cast<std::size_t>(p)];
    const std::int64_t i0 = ti * tile, j0 = tj * tile;
    const auto ni = static_cast<blasint>(std::min(tile, cols - i0)), nj = static_cast<blasint>(std::min(tile, cols - j0));
    const auto ld = static_cast<blasint>(cols), k = static_cast<blasint>(rows);
    if (rows == 0) {
      for (std::int64_t i = i0; i < i0 + ni; ++i) std::fill(g + i * cols + j0, g + i * cols + j0 + nj, 0.0f);
    } else if (ti == tj) {
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, ni, k, 1.0f, x + i0, ld, 0.0f, g + i0 * cols + i0, ld);
    } else {
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, ni, nj, k, 1.0f, x + i0, ld, x + j0, ld, 0.0f, g + i0 * cols + j0, ld);
    }
  });
}

void gemm_f32_rows(const float* x, std::int64_t m, std::int64_t k, const WeightRowsF32& rows_f32, std::int64_t n, float* y) {
  if (m == 0 || n == 0) return;
  start_thread_pool();  // OpenBLAS single-threaded
  // Blocks of whole 64s of weight rows, about 16 (whatever the thread count, as in matmul_f32), at most
  // ~4 MiB of f32 each.
  const std::int64_t most = std::max<std::int64_t>(64, (std::int64_t{1} << 20) / std::max<std::int64_t>(k, 1) / 64 * 64);
  const std::int64_t even = ((n + 15) / 16 + 63) / 64 * 64;
  const std::int64_t block = std::min(most, even);
  parallel_for((n + block - 1) / block, [&](std::int64_t b) {
    thread_local std::vector<float> buffer;
    const std::int64_t j0 = b * block, rows = std::min(block, n - j0);
    buffer.resize(static_cast<std::size_t>(rows * k));
    for (std::int64_t r = 0; r < rows; r += 64) rows_f32(j0 + r, std::min<std::int64_t>(64, rows - r), buffer.data() + r * k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(rows), static_cast<blasint>(k), 1.0f, x,
                static_cast<blasint>(k), buffer.data(), static_cast<blasint>(k), 0.0f, y + j0, static_cast<blasint>(n));
  });
}

void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate) {
  gemm_f32_strided(x, m, k, w, n, y, n, accumulate);
}

void gemm_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w_bf16, std::int64_t ldw, std::int64_t n, float* y) {
  if (m == 0 || n == 0) return;
  gemm_bf16_panels(x, m, k, n, y, [&](std::int64_t r0, std::int64_t rows, std::uint32_t* panel) {
    avx512::pack_panel_bf16(w_bf16 + r0 * ldw, ldw, rows, k, panel);
  });
}

void gemm_bf16(const float* x, std::int64_t m, std::int64_t k, const WeightRowsF32& rows_f32, std::int64_t n, float* y) {
  if (m == 0 || n == 0) return;
  gemm_bf16_panels(x, m, k, n, y, [&](std::int64_t r0, std::int64_t rows, std::uint32_t* panel) {
    thread_local std::vector<float> widened;
    widened.resize(static_cast<std::size_t>(kPanel * k));
    rows_f32(r0, rows, widened.data());
    avx512::pack_panel_f32(widened.data(), k, rows, k, panel);
  });
}

Int8Panels::Int8Panels(const std::int8_t* codes, std::int64_t ldw, std::int64_t n, std::int64_t k)
    : n_(n), k_(k), quads_(ceil_div(k, 4)) {
  const std::int64_t panels = ceil_div(n, kPanel);
  panels_.assign(static_cast<std::size_t>(panels * quads_ * kPanel), 0);
  offsets_.assign(static_cast<std::size_t>(panels * kPanel), 0);
  for (std::int64_t p = 0; p < panels; ++p) {
    const std::int64_t r0 = p * kPanel;
    avx512::pack_panel_int8(codes + r0 * ldw, ldw, std::min(kPanel, n - r0), k, panels_.data() + p * quads_ * kPanel,
                            offsets_.data() + p * kPanel);
  }
}

std::int8_t Int8Panels::code(std::int64_t r, std::int64_t c) const {
  const std::uint32_t d = panels_[static_cast<std::size_t>(((r / kPanel) * quads_ + c / 4) * kPanel + r % kPanel)];
  return static_cast<std::int8_t>(static_cast<std::uint8_t>(d >> (8 * (c % 4))));
}

namespace {

// The int8 product over panels of 64 weight rows: x packed once, then each thread takes whole panels
// (panel_of(p, r0, rows) gives the packed panel and its offsets) and runs every input row through it.
template <class PanelOf>
void gemm_int8_panels(const std::int8_t* x_codes, std::int64_t m, std::int64_t k, std::int64_t n, const float* factor, float* y,
                      const PanelOf& panel_of) {
  const std::int64_t quads = ceil_div(k, 4);
  thread_local std::vector<std::uint32_t> xp_buffer;
  pack_input(m, quads * avx512::kRowBlock, xp_buffer, [&](std::int64_t i0, std::int64_t rows, std::uint32_t* block) {
    avx512::pack_rows_uint8(x_codes + i0 * k, k, rows, k, block);
  });
  const std::uint32_t* xp = xp_buffer.data();
  parallel_for(ceil_div(n, kPanel), [&](std::int64_t p) {
    const std::int64_t r0 = p * kPanel, rows = std::min(kPanel, n - r0);
    const auto [panel, offsets] = panel_of(p, r0, rows);
    for (std::int64_t q0 = 0; q0 < quads; q0 += kQuadsPerPass) {
      avx512::gemm_int8_panel(xp, quads, m, q0, std::min(kQuadsPerPass, quads - q0), panel + q0 * kPanel, offsets, factor + r0, rows, y + r0, n);
    }
  });
}

}  // namespace

void Int8Panels::multiply(const std::int8_t* x_codes, std::int64_t m, const float* factor, float* y) const {
  if (m == 0 || n_ == 0) return;
  gemm_int8_panels(x_codes, m, k_, n_, factor, y, [this](std::int64_t p, std::int64_t, std::int64_t) {
    return std::pair<const std::uint32_t*, const std::int32_t*>(panels_.data() + p * quads_ * kPanel, offsets_.data() + p * kPanel);
  });
}

bool amx_bf16_products() { return amx::amx_bf16_ready(); }

namespace {
// op(X) [rows, cols] rounded to bf16 into out [rows, cols].
void round_to_bf16(bool transpose, std::int64_t rows, std::int64_t cols, const float* x, std::int64_t ldx, float* out) {
  parallel_each(rows, 64, rows * cols >= (std::int64_t{1} << 16), [&](std::int64_t i) {
    for (std::int64_t j = 0; j < cols; ++j) out[i * cols + j] = bf16_to_f32(f32_to_bf16(transpose ? x[j * ldx + i] : x[i * ldx + j]));
  });
}
}  // namespace

void Bf16Operand::assign(bool transpose_b, std::int64_t k, std::int64_t n, const float* b, std::int64_t ldb) {
  k_ = k;
  n_ = n;
  if (amx_bf16_products()) {
    // Grown, never shrunk nor cleared (resize() would zero what it adds on every assign).
    if (packed_.size() < static_cast<std::size_t>(amx::packed_b_dwords(k, n))) packed_.resize(static_cast<std::size_t>(amx::packed_b_dwords(k, n)));
    if (k > 0 && n > 0) amx::pack_b(transpose_b, k, n, b, ldb, packed_.data());
    return;
  }
  if (rounded_.size() < static_cast<std::size_t>(k * n)) rounded_.resize(static_cast<std::size_t>(k * n));
  round_to_bf16(transpose_b, k, n, b, ldb, rounded_.data());
}

void Bf16Operand::multiply_leading(bool transpose_a, std::int64_t m, std::int64_t k_used, std::int64_t n_used, const float* a, std::int64_t lda,
                                   float* c, std::int64_t ldc, bool accumulate) const {
  if (k_used < 0 || k_used > k_ || n_used < 0 || n_used > n_) fail("Bf16Operand: a {}x{} block of a {}x{} operand", k_used, n_used, k_, n_);
  if (m == 0 || n_used == 0) return;
  if (k_used == 0) {
    for (std::int64_t i = 0; i < m && !accumulate; ++i) std::fill(c + i * ldc, c + i * ldc + n_used, 0.0f);
    return;
  }
  if (amx_bf16_products()) {
    amx::multiply(transpose_a, m, n_used, k_used, a, lda, packed_.data(), amx::round_up_32(k_) / 2, c, ldc, accumulate);
    return;
  }
  thread_local std::vector<float> rounded_a;
  if (rounded_a.size() < static_cast<std::size_t>(m * k_used)) rounded_a.resize(static_cast<std::size_t>(m * k_used));
  float* ra = rounded_a.data();
  round_to_bf16(transpose_a, m, k_used, a, lda, ra);
  matmul_f32(false, false, m, n_used, k_used, ra, k_used, rounded_.data(), n_, c, ldc, accumulate);
}

void matmul_bf16_operands(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                          std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  thread_local Bf16Operand operand;
  operand.assign(transpose_b, k, n, b, ldb);
  operand.multiply(transpose_a, m, a, lda, c, ldc, accumulate);
}

namespace ref {

void matmul_f32(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = accumulate ? c[i * ldc + j] : 0.0;
      for (std::int64_t t = 0; t < k; ++t) {
        const float av = transpose_a ? a[t * lda + i] : a[i * lda + t];
        const float bv = transpose_b ? b[j * ldb + t] : b[t * ldb + j];
        sum += static_cast<double>(av) * bv;
      }
      c[i * ldc + j] = static_cast<float>(sum);
    }
  }
}

void matmul_bf16_operands(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                          std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate) {
  const auto round = [](float v) { return bf16_to_f32(f32_to_bf16(v)); };
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double sum = accumulate ? c[i * ldc + j] : 0.0;
      for (std::int64_t t = 0; t < k; ++t) {
        const float av = round(transpose_a ? a[t * lda + i] : a[i * lda + t]);
        const float bv = round(transpose_b ? b[j * ldb + t] : b[t * ldb + j]);
        sum += static_cast<double>(av) * bv;
      }
      c[i * ldc + j] = static_cast<float>(sum);
    }
  }
}

void matmul_f64(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
                std::int64_t lda, const double* b, std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate) {
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      long double sum = accumulate ? c[i * ldc + j] : 0.0L;
      for (std::int64_t t = 0; t < k; ++t) {
        const double av = transpose_a ? a[t * lda + i] : a[i * lda + t];
        const double bv = transpose_b ? b[j * ldb + t] : b[t * ldb + j];
        sum += static_cast<long double>(av) * bv;
      }
      c[i * ldc + j] = static_cast<double>(sum);
    }
  }
}

void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate) {
  for (std::int64_t i = 0; i < m; ++i) {
    for (std::int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < k; ++p) s += static_cast<double>(x[i * k + p]) * static_cast<double>(w[j * k + p]);
      y[i * n + j] = static_cast<float>(accumulate ? y[i * n + j] + s : s);
    }
  }
}

void gemm_bf16_products(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y) {
  const auto round = [](float v) { return bf16_to_f32(f32_to_bf16(v)); };
  std::vector<float> xr(static_cast<std::size_t>(m * k)), wr(static_cast<std::size_t>(n * k));
  for (std::size_t i = 0; i < xr.size(); ++i) xr[i] = round(x[i]);
  for (std::size_t i = 0; i < wr.size(); ++i) wr[i] = round(w[i]);
  gemm_f32(xr.data(), m, k, wr.data(), n, y, false);
}
}  // namespace ref

}  // namespace mopt::kernels
