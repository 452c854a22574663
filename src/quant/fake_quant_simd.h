// Vectorized pieces of quant/fake_quant (AVX2), for the NVFP4 activation rounding every forward
// pass of an NVFP4 model runs. Called only after the CPU check; each gives what the scalar steps in
// fake_quant.h give, bit for bit.
#pragma once

#include <cstdint>

namespace mopt::quant::avx2 {

// out[b] = the largest |x| of x[16 b, 16 b + 16) for b < blocks, NaN skipped (as block_abs_max).
void block16_abs_max(const float* x, std::int64_t blocks, float* out);

// y = with_sign_of(x, round_e2m1_magnitude(|x| / s) * s) over x[0, 16 blocks), s = scales[b] for block b.
void round_e2m1_blocks16(const float* x, const float* scales, std::int64_t blocks, float* y);

}  // namespace mopt::quant::avx2
