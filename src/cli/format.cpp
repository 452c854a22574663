#include "cli/format.h"

#include <fmt/format.h>

namespace mopt::cli {

std::string with_thousands(std::uint64_t n) {
  std::string digits = std::to_string(n);
  std::string out;
  const std::size_t first = digits.size() % 3 == 0 ? 3 : digits.size() % 3;
  out += digits.substr(0, first);
  for (std::size_t i = first; i < digits.size(); i += 3) out += "," + digits.substr(i, 3);
  return out;
}

std::string short_count(std::uint64_t n) {
  const auto v = static_cast<double>(n);
  if (n >= 1'000'000'000ULL) return fmt::format("{:.2f}B", v / 1e9);
  if (n >= 1'000'000ULL) return fmt::format("{:.1f}M", v / 1e6);
  if (n >= 1'000ULL) return fmt::format("{:.1f}K", v / 1e3);
  return std::to_string(n);
}

std::string byte_size(std::uint64_t bytes) {
  const auto v = static_cast<double>(bytes);
  if (bytes >= (1ULL << 30)) return fmt::format("{:.2f} GiB", v / static_cast<double>(1ULL << 30));
  if (bytes >= (1ULL << 20)) return fmt::format("{:.1f} MiB", v / static_cast<double>(1ULL << 20));
  if (bytes >= (1ULL << 10)) return fmt::format("{:.1f} KiB", v / static_cast<double>(1ULL << 10));
  return fmt::format("{} B", bytes);
}

}  // namespace mopt::cli
