// Dense symmetric linear algebra in double for GPTQ and SparseGPT: a Cholesky factorization and the
// inverse from it, blocked, the blocks' products split over the pool.
//
// Every block and every BLAS call is fixed by the matrix size alone, never by the thread count, and
// each call runs single-threaded on one thread: the results are the same bits under 1, 2 or 64
// threads (LAPACK's dpotrf/dpotri through OpenBLAS's own threads are not: they cut the work by
// thread count, and GPTQ's codes followed the machine's cores).
#pragma once

#include <cstdint>

namespace mopt::kernels {

// The lower Cholesky factor L of the symmetric matrix a [n, n] (row-major; its lower triangle is
// read), in place: a = L L^T, the strict upper triangle set to zero. False, with `a` in an unspecified
// state, when a is not positive definite (or holds a NaN).
bool cholesky_lower(double* a, std::int64_t n);

// inverse[n, n] = (L L^T)^-1 for the lower Cholesky factor l (as cholesky_lower leaves it), full and
// symmetric.
void inverse_from_cholesky(const double* l, std::int64_t n, double* inverse);

namespace ref {
// Column by column, unblocked, sums in long double.
bool cholesky_lower(double* a, std::int64_t n);
// Solves L L^T X = I column by column by substitution, sums in long double.
void inverse_from_cholesky(const double* l, std::int64_t n, double* inverse);
}  // namespace ref

}  // namespace mopt::kernels
