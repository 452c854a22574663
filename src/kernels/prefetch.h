// How far ahead the decode GEMVs ask for their weight streams. One row of a batch-1 product is short
// (a few KB), and the hardware prefetcher restarts at each row's end; a software prefetch must run
// ahead by at least memory latency x one core's bandwidth (~120 ns x ~12 GB/s = 1.5 KB) to hide the
// latency. 4 KB keeps a margin and stays far inside L1 (48 KB; a stream or two in flight). Measured
// on a Sapphire Rapids Xeon (bench/sparse24_bench, decode of [8192, 2048]): 1 KB left the int8 and FP8
// GEMVs at 76-86% of the bandwidth; 4 KB made them 1.3x faster (docs/BENCHMARKS.md).
#pragma once

#include <cstdint>

namespace mopt::kernels {

inline constexpr std::int64_t kPrefetchAhead = 4096;  // bytes of the stream being read

}  // namespace mopt::kernels
