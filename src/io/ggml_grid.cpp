#include "io/ggml_grid.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include "core/convert.h"
#include "core/error.h"

namespace mopt::io {

namespace {

float f16_at(const std::uint8_t* p) { return f16_to_f32(static_cast<std::uint16_t>(p[0] | (p[1] << 8))); }

// Q4_K's 6-bit scale and minimum of sub-block j (0..7) from its 12 packed bytes.
void k4_scale_min(int j, const std::uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

GgmlTypeInfo grid_type_info(GgmlType type) {
  if (!ggml_has_grid(type)) fail("ggml type {} has no integer grid mopt quantizes onto (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K)", static_cast<std::uint32_t>(type));
  return *ggml_type_info(static_cast<std::uint32_t>(type));
}

void check_size(const GgmlTypeInfo& info, std::size_t bytes, std::uint64_t count) {
  if (count % info.block_elements != 0 || bytes != count / info.block_elements * info.block_bytes) {
    fail("{}: {} bytes do not hold {} values", info.name, bytes, count);
  }
}

// Writes the levels of one block's values into its bytes (the scales untouched).
void put_levels(GgmlType type, std::uint8_t* p, const int* level) {
  switch (type) {
    case GgmlType::Q8_0:
      for (int j = 0; j < 32; ++j) p[2 + j] = static_cast<std::uint8_t>(static_cast<std::int8_t>(level[j]));
      return;
    case GgmlType::Q4_0:
      for (int j = 0; j < 16; ++j) p[2 + j] = static_cast<std::uint8_t>((level[j] + 8) | ((level[j + 16] + 8) << 4));
      return;
    case GgmlType::Q5_0: {
      std::uint32_t high = 0;
      for (int j = 0; j < 16; ++j) {
        const int a = level[j] + 16, b = level[j + 16] + 16;
        p[6 + j] = static_cast<std::uint8_t>((a & 0xF) | ((b & 0xF) << 4));
        high |= static_cast<std::uint32_t>((a >> 4) & 1) << j;
        high |= static_cast<std::uint32_t>((b >> 4) & 1) << (j + 16);
      }
      for (int k = 0; k < 4; ++k) p[2 + k] = static_cast<std::uint8_t>(high >> (8 * k));
      return;
    }
    case GgmlType::Q4_K:
      // 4 chunks of 64 values: 32 bytes, the first 32 values in the low nibbles, the next 32 in the high ones.
      for (int chunk = 0; chunk < 4; ++chunk) {
        for (int l = 0; l < 32; ++l) {
          p[16 + 32 * chunk + l] = static_cast<std::uint8_t>(level[64 * chunk + l] | (level[64 * chunk + 32 + l] << 4));
        }
      }
      return;
    case GgmlType::Q6_K:
      // 2 halves of 128 values: ql (64 bytes, low 4 bits), qh (32 bytes, high 2 bits), as dequantization reads them.
      for (int half = 0; half < 2; ++half) {
        std::uint8_t* ql = p + 64 * half;
        std::uint8_t* qh = p + 128 + 32 * half;
        const int* L = level + 128 * half;
        for (int l = 0; l < 32; ++l) {
          const int q1 = L[l] + 32, q2 = L[l + 32] + 32, q3 = L[l + 64] + 32, q4 = L[l + 96] + 32;
          ql[l] = static_cast<std::uint8_t>((q1 & 0xF) | ((q3 & 0xF) << 4));
          ql[l + 32] = static_cast<std::uint8_t>((q2 & 0xF) | ((q4 & 0xF) << 4));
          qh[l] = static_cast<std::uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
        }
      }
      return;
    default: fail("no grid for ggml type {}", static_cast<std::uint32_t>(type));
  }
}

}  // namespace

const std::vector<GgmlType>& ggml_grid_types() {
  static const std::vector<GgmlType> types = {GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K};
  return types;
}

std::string ggml_block_name(GgmlType type) {
  std::string name(ggml_type_info(static_cast<std::uint32_t>(type))->name);
  for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return name;
}

bool ggml_has_grid(GgmlType type) { return std::find(ggml_grid_types().begin(), ggml_grid_types().end(), type) != ggml_grid_types().end(); }

int GgmlGrid::nearest_level(std::size_t sub, float x) const {
  const float s = step[sub];
  if (s == 0.0f) return std::clamp(0, lo, hi);
  const float l = std::nearbyint((x + min[sub]) / s);
  return static_cast<int>(std::clamp(l, static_cast<float>(lo), static_cast<float>(hi)));
}

GgmlGrid ggml_grid(GgmlType type, std::span<const std::byte> blocks, std::uint64_t count) {
  const GgmlTypeInfo info = grid_type_info(type);
  check_size(info, blocks.size(), count);
  GgmlGrid g;
  const auto* p = reinterpret_cast<const std::uint8_t*>(blocks.data());
  const std::uint64_t nblocks = count / info.block_elements;
  switch (type) {
    case GgmlType::Q4_0:
    case GgmlType::Q5_0:
    case GgmlType::Q8_0:
      g.sub_block = 32;
      g.lo = type == GgmlType::Q4_0 ? -8 : type == GgmlType::Q5_0 ? -16 : -128;
      g.hi = -g.lo - 1;
      for (std::uint64_t b = 0; b < nblocks; ++b, p += info.block_bytes) g.step.push_back(f16_at(p));
      g.min.assign(g.step.size(), 0.0f);
      break;
    case GgmlType::Q4_K:
      g.sub_block = 32;
      g.lo = 0;
      g.hi = 15;
      for (std::uint64_t b = 0; b < nblocks; ++b, p += info.block_bytes) {
        const float d = f16_at(p), dmin = f16_at(p + 2);
        for (int j = 0; j < 8; ++j) {
          int sc = 0, m = 0;
          k4_scale_min(j, p + 4, sc, m);
          g.step.push_back(d * static_cast<float>(sc));
          g.min.push_back(dmin * static_cast<float>(m));
        }
      }
      break;
    case GgmlType::Q6_K:
      g.sub_block = 16;
      g.lo = -32;
      g.hi = 31;
      for (std::uint64_t b = 0; b < nblocks; ++b, p += info.block_bytes) {
        const float d = f16_at(p + 208);
        for (int j = 0; j < 16; ++j) g.step.push_back(d * static_cast<float>(static_cast<std::int8_t>(p[192 + j])));
      }
      g.min.assign(g.step.size(), 0.0f);
      break;
    default: break;
  }
  return g;
}

std::vector<std::byte> ggml_requantize(GgmlType type, std::span<const std::byte> blocks, const float* x, std::uint64_t count,
                                       const std::string& label) {
  const GgmlTypeInfo info = grid_type_info(type);
  const GgmlGrid g = ggml_grid(type, blocks, count);
  std::vector<std::byte> out(blocks.begin(), blocks.end());
  std::vector<int> level(info.block_elements);
  auto* p = reinterpret_cast<std::uint8_t*>(out.data());
  for (std::uint64_t b = 0; b < count / info.block_elements; ++b, p += info.block_bytes) {
    for (std::uint32_t i = 0; i < info.block_elements; ++i) {
      const std::uint64_t k = b * info.block_elements + i;
      if (!std::isfinite(x[k])) fail("{}: value {} is {}", label, k, x[k]);
      level[i] = g.nearest_level(static_cast<std::size_t>(k / static_cast<std::uint64_t>(g.sub_block)), x[k]);
    }
    put_levels(type, p, level.data());
  }
  return out;
}

}  // namespace mopt::io
