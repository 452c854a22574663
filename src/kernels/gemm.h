// Matrix products of the shape of a Linear layer: y[m, n] (+)= x[m, k] · w[n, k]ᵀ
// (PyTorch stores weights [out, in]), and the run-time choice of how they run.
//
//  - f32: exact f32 products through the BLAS (OpenBLAS picks its kernels for the
//    CPU at run time). What calibration, the algorithms and the tests' definitions
//    use, so that an export does not depend on the machine it was made on.
//  - bf16 products: both operands rounded to bf16 (round to nearest even), products
//    summed in f32, as the serving engines compute a 16-bit model. Our own AVX-512
//    BF16 kernels (gemm_simd.h) where they are the faster way: the CPU has AVX-512
//    BF16 and its VDPBF16PS outruns its f32 FMAs (bf16_kernels_chosen); elsewhere the
//    f32 path runs (exact products, at least as accurate).
//  - int8 products (W8A8): exact int32 sums; AVX-512 VNNI where present (gemm_simd.h),
//    else AVX2 (qlinear_simd.h).
// The reference (ref::) is the plain triple loop the fast versions are tested against.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace mopt::kernels {

// How the products of a forward pass with 16-bit or quantized weights are computed.
enum class Precision {
  f32,   // exact f32 products (the default of the library)
  bf16,  // bf16 operands, f32 sums, where bf16_kernels_chosen(); f32 elsewhere
};

// Whether this CPU can run the bf16 kernels (AVX-512 BF16), and the int8 product on AVX-512 VNNI.
bool bf16_gemm_available();
bool vnni_gemm_available();

// Whether Precision::bf16 runs the bf16 kernels: they are available and, measured once per process
// on the first call (about 2 ms), their tile runs at least 1.25x an f32 FMA tile (on some CPUs
// VDPBF16PS is slower than FMAs and the f32 GEMM is faster). MOPT_BF16_PRODUCTS=kernels or f32
// decides instead of the measurement.
bool bf16_kernels_chosen();

// MOPT_BF16_PRODUCTS's value: kernels -> true, f32 -> false, unset (nullptr) -> nullopt; anything
// else throws Error naming the variable.
std::optional<bool> parse_bf16_products(const char* value);

// "bf16: avx512_bf16 tiles; int8: avx512_vnni; f32: OpenBLAS Cooperlake; train --precision bf16: amx_bf16
// tiles" — for --version and bench headers.
std::string describe_gemm();

void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate = false);

// The same product with a leading dimension for y (columns [0, n) of rows of ldy floats).
void gemm_f32_strided(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y,
                      std::int64_t ldy, bool accumulate);

// C[m, n] = op(A) · op(B), plus C when `accumulate`: row-major with leading dimensions lda, ldb, ldc;
// op(A) is A [m, k] or, transposed, Aᵀ of A [k, m] (op(B) likewise: B [k, n] or Bᵀ of B [n, k]). The pool
// splits C into blocks (and a long sum into chunks, matmul_sum_chunks), one single-threaded OpenBLAS
// call each, so every element's sum is the same whatever the thread count. gemm_f32_strided is
// op(A) = x, op(B) = wᵀ; the backward pass takes dX = dY · W and dW += dYᵀ · X.
void matmul_f32(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate);

// How many chunks matmul_f32 (and matmul_f64) cut the sum over k of an [m, n] product into: 1, or more
// for a long sum into a small C (the weight gradients, summed over a step's tokens), whose chunks are
// summed separately and added to C in their order. Depends on the shape alone.
std::int64_t matmul_sum_chunks(std::int64_t m, std::int64_t n, std::int64_t k);

// Mixed-precision training's products (`mopt train --precision bf16`): matmul_f32 with every element
// of op(A) and op(B) first rounded to bf16 (nearest even) and the products summed in f32, as PyTorch's
// bf16 autocast multiplies (which then rounds the result to bf16 too; these keep it f32). AMX tiles
// where amx_bf16_products() holds (kernels/gemm_amx.h); elsewhere the rounded operands go through
// matmul_f32: the same products summed in another order, and no faster than the f32 product. One
// more difference: AMX's rounding (VCVTNE2PS2BF16) flushes f32 denormal operands (below 1.2e-38) to
// zero, where the other path and ref:: keep them as bf16 denormals.
bool amx_bf16_products();

// op(B) [k, n] (B [k, n] with rows ldb apart, or transposed: Bᵀ of B [n, k]) rounded and laid out once,
// for several products with it (the LM head's, one per chunk of tokens).
class Bf16Operand {
 public:
  void assign(bool transpose_b, std::int64_t k, std::int64_t n, const float* b, std::int64_t ldb);
  // C[m, n] = op(A) · op(B), plus C when `accumulate`; op(A) is A [m, k] or, transposed, Aᵀ of A [k, m].
  void multiply(bool transpose_a, std::int64_t m, const float* a, std::int64_t lda, float* c, std::int64_t ldc, bool accumulate) const {
    multiply_leading(transpose_a, m, k_, n_, a, lda, c, ldc, accumulate);
  }
  // The same with op(B)'s leading k_used x n_used block (k_used <= k(), n_used <= n(); op(A) [m, k_used]):
  // one operand for products over growing prefixes (attention's keys, block by block). The rows of
  // op(B) past k_used must be finite.
  void multiply_leading(bool transpose_a, std::int64_t m, std::int64_t k_used, std::int64_t n_used, const float* a, std::int64_t lda, float* c,
                        std::int64_t ldc, bool accumulate) const;
  std::int64_t k() const { return k_; }
  std::int64_t n() const { return n_; }

 private:
  std::int64_t k_ = 0, n_ = 0;
  std::vector<std::uint32_t> packed_;  // AMX: bf16 pairs in TDPBF16PS's B layout
  std::vector<float> rounded_;         // elsewhere: op(B) rounded, [k, n]
};

// matmul_f32's product on bf16 operands (Bf16Operand, assigned for this one product).
void matmul_bf16_operands(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                          std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate);

// matmul_f32 in double, split the same way (GPTQ's and SparseGPT's updates, AWQ's losses).
void matmul_f64(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
                std::int64_t lda, const double* b, std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate);

// The upper triangle (diagonal included) of g[cols, cols] = xᵀ · x for x [rows, cols], in tiles fixed
// by the shape, so every element is the same whatever the thread count; below the diagonal g is not
// written. The Gram matrices of GPTQ's and SparseGPT's Hessians.
void gram_upper_f32(const float* x, std::int64_t rows, std::int64_t cols, float* g);

// Writes weight rows [row0, row0 + rows) (rows <= 64), inputs [0, k), as f32 into out [rows, k].
using WeightRowsF32 = std::function<void(std::int64_t row0, std::int64_t rows, float* out)>;

// f32 products for a weight given through `rows_f32` (called for up to 64 rows at a time): each task
// writes a block of weight rows as f32 into a buffer of its own and multiplies all of x with it in
// one OpenBLAS call, so the weight is widened once and the rows of x are packed once per block.
void gemm_f32_rows(const float* x, std::int64_t m, std::int64_t k, const WeightRowsF32& rows_f32, std::int64_t n, float* y);

// bf16 products (needs bf16_gemm_available()): y[m, n] = x[m, k] · Wᵀ for a weight given as bf16
// rows (ldw elements apart) or through `rows_f32`, which are rounded to bf16.
void gemm_bf16(const float* x, std::int64_t m, std::int64_t k, const std::uint16_t* w_bf16, std::int64_t ldw, std::int64_t n, float* y);
void gemm_bf16(const float* x, std::int64_t m, std::int64_t k, const WeightRowsF32& rows_f32, std::int64_t n, float* y);

// int8 weight rows packed once for the VNNI product (needs vnni_gemm_available()).
class Int8Panels {
 public:
  Int8Panels() = default;
  // codes [n, k] row-major (ldw bytes apart).
  Int8Panels(const std::int8_t* codes, std::int64_t ldw, std::int64_t n, std::int64_t k);
  std::int64_t rows() const { return n_; }
  std::int64_t bytes() const { return static_cast<std::int64_t>(panels_.size() * sizeof(std::uint32_t) + offsets_.size() * sizeof(std::int32_t)); }
  // The code at row r, input c.
  std::int8_t code(std::int64_t r, std::int64_t c) const;
  // y[m, n] = (x_codes[m, k] · codesᵀ) * factor[n], exactly (int32 sums).
  void multiply(const std::int8_t* x_codes, std::int64_t m, const float* factor, float* y) const;

 private:
  std::int64_t n_ = 0, k_ = 0, quads_ = 0;
  std::vector<std::uint32_t> panels_;  // [n/64][quads][64], see gemm_simd.h
  std::vector<std::int32_t> offsets_;  // [n/64 * 64]
};

namespace ref {
// matmul_f32 as plain loops, sums in double.
void matmul_f32(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate);
// matmul_bf16_operands's definition: op(A) and op(B) rounded to bf16, products summed in double.
void matmul_bf16_operands(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                          std::int64_t lda, const float* b, std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate);
// The same in double (sums in long double).
void matmul_f64(bool transpose_a, bool transpose_b, std::int64_t m, std::int64_t n, std::int64_t k, const double* a,
                std::int64_t lda, const double* b, std::int64_t ldb, double* c, std::int64_t ldc, bool accumulate);
void gemm_f32(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y, bool accumulate = false);
// The bf16-products definition: x and w rounded to bf16 (nearest even), products summed in double.
void gemm_bf16_products(const float* x, std::int64_t m, std::int64_t k, const float* w, std::int64_t n, float* y);
}

}  // namespace mopt::kernels
