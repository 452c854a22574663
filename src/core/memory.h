// Memory use of this process.
#pragma once

#include <cstdint>

namespace mopt {

// Peak resident set size so far, in bytes (getrusage's ru_maxrss).
std::uint64_t peak_rss_bytes();

}  // namespace mopt
