// Number formatting for people: 1,234,567 / 1.23M / 4.5 MiB.
#pragma once

#include <cstdint>
#include <string>

namespace mopt::cli {

std::string with_thousands(std::uint64_t n);
std::string short_count(std::uint64_t n);  // 950, 12.3K, 134.5M, 8.03B
std::string byte_size(std::uint64_t bytes);  // 512 B, 12.0 KiB, 256.5 MiB, 15.0 GiB

}  // namespace mopt::cli
