#include "io/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <set>

#include "core/convert.h"
#include "core/error.h"
#include "io/json_util.h"

namespace mopt::io {

using nlohmann::json;

namespace {

constexpr std::uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr std::size_t kMaxNameBytes = 63;     // ggml's GGML_MAX_NAME is 64 with the NUL
constexpr int kMaxArrayDepth = 4;

constexpr GgmlTypeInfo kTypes[] = {
    {GgmlType::F32, "F32", 1, 4},       {GgmlType::F16, "F16", 1, 2},       {GgmlType::Q4_0, "Q4_0", 32, 18},
    {GgmlType::Q4_1, "Q4_1", 32, 20},   {GgmlType::Q5_0, "Q5_0", 32, 22},   {GgmlType::Q5_1, "Q5_1", 32, 24},
    {GgmlType::Q8_0, "Q8_0", 32, 34},   {GgmlType::Q8_1, "Q8_1", 32, 36},   {GgmlType::Q2_K, "Q2_K", 256, 84},
    {GgmlType::Q3_K, "Q3_K", 256, 110}, {GgmlType::Q4_K, "Q4_K", 256, 144}, {GgmlType::Q5_K, "Q5_K", 256, 176},
    {GgmlType::Q6_K, "Q6_K", 256, 210}, {GgmlType::Q8_K, "Q8_K", 256, 292}, {GgmlType::I8, "I8", 1, 1},
    {GgmlType::I16, "I16", 1, 2},       {GgmlType::I32, "I32", 1, 4},       {GgmlType::I64, "I64", 1, 8},
    {GgmlType::F64, "F64", 1, 8},       {GgmlType::BF16, "BF16", 1, 2},     {GgmlType::MXFP4, "MXFP4", 32, 17},
    {GgmlType::NVFP4, "NVFP4", 64, 36},
};

// Reads little-endian values from the file, refusing to run past its end.
class Cursor {
 public:
  explicit Cursor(std::span<const std::byte> data) : data_(data) {}
  std::size_t position() const { return pos_; }
  std::size_t remaining() const { return data_.size() - pos_; }

  template <typename T>
  T read(const char* what) {
    if (remaining() < sizeof(T)) fail("truncated: the file ends inside {} (at byte {})", what, pos_);
    T v;
    std::memcpy(&v, data_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  std::string string(const std::string& what) {
    const auto n = read<std::uint64_t>(what.c_str());
    if (n > remaining()) fail("{}: string length {} runs past the end of the file", what, n);
    std::string s(reinterpret_cast<const char*>(data_.data() + pos_), static_cast<std::size_t>(n));
    pos_ += static_cast<std::size_t>(n);
    return s;
  }

 private:
  std::span<const std::byte> data_;
  std::size_t pos_ = 0;
};

// The fewest bytes one value of `t` takes, to bound counts before allocating.
std::size_t min_value_bytes(GgufValueType t) {
  switch (t) {
    case GgufValueType::u8: case GgufValueType::i8: case GgufValueType::boolean: return 1;
    case GgufValueType::u16: case GgufValueType::i16: return 2;
    case GgufValueType::u32: case GgufValueType::i32: case GgufValueType::f32: return 4;
    case GgufValueType::u64: case GgufValueType::i64: case GgufValueType::f64: case GgufValueType::string: return 8;
    case GgufValueType::array: return 12;
  }
  return 1;
}

GgufValueType value_type(std::uint32_t code, const std::string& what) {
  if (code > 12) fail("{}: unknown value type {}", what, code);
  return static_cast<GgufValueType>(code);
}

json read_value(Cursor& c, GgufValueType t, const std::string& what, int depth, GgufValueType* element_type) {
  switch (t) {
    case GgufValueType::u8: return c.read<std::uint8_t>(what.c_str());
    case GgufValueType::i8: return c.read<std::int8_t>(what.c_str());
    case GgufValueType::u16: return c.read<std::uint16_t>(what.c_str());
    case GgufValueType::i16: return c.read<std::int16_t>(what.c_str());
    case GgufValueType::u32: return c.read<std::uint32_t>(what.c_str());
    case GgufValueType::i32: return c.read<std::int32_t>(what.c_str());
    case GgufValueType::f32: return c.read<float>(what.c_str());
    case GgufValueType::u64: return c.read<std::uint64_t>(what.c_str());
    case GgufValueType::i64: return c.read<std::int64_t>(what.c_str());
    case GgufValueType::f64: return c.read<double>(what.c_str());
    case GgufValueType::boolean: {
      const auto b = c.read<std::uint8_t>(what.c_str());
      if (b > 1) fail("{}: boolean byte {} is neither 0 nor 1", what, b);
      return b == 1;
    }
    case GgufValueType::string: return c.string(what);
    case GgufValueType::array: {
      if (depth >= kMaxArrayDepth) fail("{}: arrays nested deeper than {}", what, kMaxArrayDepth);
      const GgufValueType et = value_type(c.read<std::uint32_t>(what.c_str()), what + " (array element type)");
      if (element_type != nullptr) *element_type = et;
      const auto n = c.read<std::uint64_t>(what.c_str());
      if (n > c.remaining() / min_value_bytes(et)) fail("{}: array of {} elements runs past the end of the file", what, n);
      json a = json::array();
      a.get_ref<json::array_t&>().reserve(static_cast<std::size_t>(n));
      for (std::uint64_t i = 0; i < n; ++i) a.push_back(read_value(c, et, what, depth + 1, nullptr));
      return a;
    }
  }
  fail("{}: unknown value type", what);
}

std::uint64_t checked_mul(std::uint64_t a, std::uint64_t b, const std::string& what) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) fail("{}: size overflows 64 bits", what);
  return a * b;
}

}  // namespace

std::string_view gguf_value_type_name(GgufValueType t) {
  static constexpr std::string_view kNames[] = {"uint8", "int8",  "uint16", "int16",  "uint32", "int32", "float32",
                                                "bool",  "string", "array", "uint64", "int64",  "float64"};
  const auto i = static_cast<std::size_t>(t);
  return i < std::size(kNames) ? kNames[i] : "unknown";
}

std::optional<GgmlTypeInfo> ggml_type_info(std::uint32_t id) {
  for (const auto& t : kTypes) {
    if (static_cast<std::uint32_t>(t.type) == id) return t;
  }
  return std::nullopt;
}

Shape GgufTensorInfo::shape() const {
  Shape s;
  for (auto it = ne.rbegin(); it != ne.rend(); ++it) s.push_back(static_cast<std::int64_t>(*it));
  return s;
}

std::uint64_t GgufTensorInfo::elements() const {
  std::uint64_t n = 1;
  for (const auto d : ne) n *= d;
  return n;
}

GgufHeader parse_gguf(std::span<const std::byte> file, const std::string& label) {
  return with_context(label, [&] {
    Cursor c(file);
    GgufHeader h;
    if (file.size() < 4) fail("{} bytes is too short for a GGUF file", file.size());
    const auto magic = c.read<std::uint32_t>("the magic");
    if (magic != kMagic) fail("not a GGUF file (magic 0x{:08x}, expected 0x{:08x} \"GGUF\")", magic, kMagic);
    h.version = c.read<std::uint32_t>("the version");
    if (h.version != 2 && h.version != 3) {
      const bool swapped = h.version != 0 && (h.version & 0xFFFF) == 0;
      fail("GGUF version {} is not supported (2 and 3 are){}", h.version, swapped ? "; the file looks big-endian" : "");
    }
    const auto n_tensors = c.read<std::uint64_t>("the tensor count");
    const auto n_kv = c.read<std::uint64_t>("the metadata count");
    // Each entry needs at least a length-prefixed name and a type: bound the counts first.
    if (n_kv > c.remaining() / 12) fail("metadata count {} is larger than the file can hold", n_kv);
    if (n_tensors > c.remaining() / 24) fail("tensor count {} is larger than the file can hold", n_tensors);

    std::set<std::string, std::less<>> keys;
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      const std::string key = c.string(fmt::format("metadata key {}", i));
      const std::string what = "metadata '" + printable(key) + "'";
      if (!keys.insert(key).second) fail("{} appears twice", what);
      GgufValue v;
      v.type = value_type(c.read<std::uint32_t>(what.c_str()), what);
      v.value = read_value(c, v.type, what, 0, &v.element_type);
      h.metadata.emplace_back(key, std::move(v));
    }
    for (const auto& [key, v] : h.metadata) {
      if (key != "general.alignment") continue;
      if (v.type != GgufValueType::u32) fail("general.alignment must be uint32, got {}", gguf_value_type_name(v.type));
      const auto a = v.value.get<std::uint32_t>();
      if (a == 0 || (a & (a - 1)) != 0) fail("general.alignment {} is not a power of two", a);
      h.alignment = a;
    }

    std::set<std::string, std::less<>> names;
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.name = c.string(fmt::format("tensor name {}", i));
      const std::string what = "tensor '" + printable(t.name) + "'";
      if (t.name.size() > kMaxNameBytes) fail("{}: name is longer than {} bytes", what, kMaxNameBytes);
      if (!names.insert(t.name).second) fail("{} appears twice", what);
      const auto n_dims = c.read<std::uint32_t>(what.c_str());
      if (n_dims == 0 || n_dims > 4) fail("{}: {} dimensions (1 to 4 allowed)", what, n_dims);
      std::uint64_t elements = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto ne = c.read<std::uint64_t>(what.c_str());
        if (ne == 0 || ne > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
          fail("{}: dimension {} has size {}", what, d, ne);
        }
        elements = checked_mul(elements, ne, what);
        t.ne.push_back(ne);
      }
      const auto type_id = c.read<std::uint32_t>(what.c_str());
      const auto info = ggml_type_info(type_id);
      if (!info) fail("{}: unknown ggml type {}", what, type_id);
      t.type = *info;
      if (t.ne[0] % t.type.block_elements != 0) {
        fail("{}: row length {} is not a multiple of the {} block size {}", what, t.ne[0], t.type.name, t.type.block_elements);
      }
      t.bytes = checked_mul(elements / t.type.block_elements, t.type.block_bytes, what);
      t.offset = c.read<std::uint64_t>(what.c_str());
      h.tensors.push_back(std::move(t));
    }

    const std::uint64_t end_of_infos = c.position();
    h.data_offset = (end_of_infos + h.alignment - 1) / h.alignment * h.alignment;
    if (h.data_offset > file.size() && !h.tensors.empty()) fail("the data section starts beyond the end of the file");
    const std::uint64_t data_bytes = file.size() > h.data_offset ? file.size() - h.data_offset : 0;
    std::vector<const GgufTensorInfo*> by_offset;
    for (const auto& t : h.tensors) {
      if (t.offset % h.alignment != 0) fail("tensor '{}': offset {} is not a multiple of the alignment {}", printable(t.name), t.offset, h.alignment);
      if (t.offset > data_bytes || t.bytes > data_bytes - t.offset) {
        fail("tensor '{}': {} bytes at offset {} run past the end of the file (data section {} bytes)", printable(t.name),
             t.bytes, t.offset, data_bytes);
      }
      by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const auto* a = by_offset[i - 1];
      const auto* b = by_offset[i];
      if (b->offset < a->offset + a->bytes) fail("tensors '{}' and '{}' overlap", printable(a->name), printable(b->name));
    }
    // As llama.cpp requires: the data of each tensor follows the previous one
    // in tensor-info order, padded to the alignment, with nothing in between.
    std::uint64_t expected = 0;
    for (const auto& t : h.tensors) {
      if (t.offset != expected) {
        fail("tensor '{}': offset {} where the previous tensors end at {} (tensor data must be contiguous)",
             printable(t.name), t.offset, expected);
      }
      expected = (t.offset + t.bytes + h.alignment - 1) / h.alignment * h.alignment;
    }
    return h;
  });
}

GgufFile::GgufFile(std::shared_ptr<const MappedFile> file, GgufHeader header)
    : file_(std::move(file)), header_(std::move(header)) {
  for (std::size_t i = 0; i < header_.metadata.size(); ++i) metadata_index_.emplace(header_.metadata[i].first, i);
  for (std::size_t i = 0; i < header_.tensors.size(); ++i) tensor_index_.emplace(header_.tensors[i].name, i);
}

GgufFile GgufFile::open(const std::string& path) {
  auto file = MappedFile::open(path);
  auto header = parse_gguf(file->bytes(), path);
  return GgufFile(std::move(file), std::move(header));
}

const GgufValue* GgufFile::find(std::string_view key) const {
  const auto it = metadata_index_.find(key);
  return it == metadata_index_.end() ? nullptr : &header_.metadata[it->second].second;
}

std::optional<std::string> GgufFile::find_string(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type != GgufValueType::string) fail("{}: metadata '{}' is {}, expected a string", path(), key, gguf_value_type_name(v->type));
  return v->value.get<std::string>();
}

std::optional<std::uint64_t> GgufFile::find_uint(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (v->value.is_number_unsigned()) return v->value.get<std::uint64_t>();
  if (v->value.is_number_integer() && v->value.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v->value.get<std::int64_t>());
  fail("{}: metadata '{}' is {}, expected a non-negative integer", path(), key, gguf_value_type_name(v->type));
}

std::optional<double> GgufFile::find_float(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) return std::nullopt;
  if (!v->value.is_number()) fail("{}: metadata '{}' is {}, expected a number", path(), key, gguf_value_type_name(v->type));
  return v->value.get<double>();
}

std::string GgufFile::get_string(std::string_view key) const {
  auto v = find_string(key);
  if (!v) fail("{}: missing metadata '{}'", path(), key);
  return *v;
}

std::uint64_t GgufFile::get_uint(std::string_view key) const {
  auto v = find_uint(key);
  if (!v) fail("{}: missing metadata '{}'", path(), key);
  return *v;
}

double GgufFile::get_float(std::string_view key) const {
  auto v = find_float(key);
  if (!v) fail("{}: missing metadata '{}'", path(), key);
  return *v;
}

bool GgufFile::get_bool(std::string_view key) const {
  const GgufValue* v = find(key);
  if (v == nullptr) fail("{}: missing metadata '{}'", path(), key);
  if (v->type != GgufValueType::boolean) fail("{}: metadata '{}' is {}, expected bool", path(), key, gguf_value_type_name(v->type));
  return v->value.get<bool>();
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  const auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &header_.tensors[it->second];
}

std::span<const std::byte> GgufFile::raw(const GgufTensorInfo& info) const {
  return file_->bytes().subspan(static_cast<std::size_t>(header_.data_offset + info.offset), static_cast<std::size_t>(info.bytes));
}

Tensor GgufFile::dequantize(const GgufTensorInfo& info) const {
  return with_context(path() + ": tensor '" + printable(info.name) + "'", [&] {
    Tensor out = Tensor::zeros(DType::F32, info.shape());
    float* y = out.mutable_data<float>();
    ggml_dequantize(info.type.type, raw(info), y, info.elements());
    for (std::uint64_t i = 0; i < info.elements(); ++i) {
      if (!std::isfinite(y[i])) fail("non-finite value {} at element {}", y[i], i);
    }
    return out;
  });
}

// ---------------------------------------------------------------------------
// Block dequantization, following ggml's reference layouts (FORMATS.md 7.5).

namespace {

float f16_at(const std::uint8_t* p) { return f16_to_f32(static_cast<std::uint16_t>(p[0] | (p[1] << 8))); }

void get_scale_min_k4(int j, const std::uint8_t* q, std::uint8_t& sc, std::uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = static_cast<std::uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<std::uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

}  // namespace

void ggml_dequantize(GgmlType type, std::span<const std::byte> blocks, float* y, std::uint64_t count) {
  const auto info = ggml_type_info(static_cast<std::uint32_t>(type));
  if (!info) fail("unknown ggml type {}", static_cast<std::uint32_t>(type));
  if (count % info->block_elements != 0 || blocks.size() != count / info->block_elements * info->block_bytes) {
    fail("{}: {} bytes do not hold {} elements", info->name, blocks.size(), count);
  }
  const auto* p = reinterpret_cast<const std::uint8_t*>(blocks.data());
  const std::uint64_t nblocks = count / info->block_elements;
  switch (type) {
    case GgmlType::F32:
      std::memcpy(y, p, count * 4);
      return;
    case GgmlType::F16:
      for (std::uint64_t i = 0; i < count; ++i) y[i] = f16_at(p + 2 * i);
      return;
    case GgmlType::BF16:
      for (std::uint64_t i = 0; i < count; ++i) y[i] = bf16_to_f32(static_cast<std::uint16_t>(p[2 * i] | (p[2 * i + 1] << 8)));
      return;
    case GgmlType::Q8_0:
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 34, y += 32) {
        const float d = f16_at(p);
        for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<std::int8_t>(p[2 + j]));
      }
      return;
    case GgmlType::Q4_0:
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 18, y += 32) {
        const float d = f16_at(p);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * static_cast<float>((p[2 + j] & 0xF) - 8);
          y[j + 16] = d * static_cast<float>((p[2 + j] >> 4) - 8);
        }
      }
      return;
    case GgmlType::Q5_0:
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 22, y += 32) {
        const float d = f16_at(p);
        const std::uint32_t high = static_cast<std::uint32_t>(p[2]) | (static_cast<std::uint32_t>(p[3]) << 8) |
                                   (static_cast<std::uint32_t>(p[4]) << 16) | (static_cast<std::uint32_t>(p[5]) << 24);
        for (int j = 0; j < 16; ++j) {
          const int lo = (p[6 + j] & 0xF) | static_cast<int>(((high >> j) & 1u) << 4);
          const int hi = (p[6 + j] >> 4) | static_cast<int>(((high >> (j + 16)) & 1u) << 4);
          y[j] = d * static_cast<float>(lo - 16);
          y[j + 16] = d * static_cast<float>(hi - 16);
        }
      }
      return;
    case GgmlType::MXFP4:
      // One E8M0 exponent, then 16 bytes: element j in the low nibble of byte j, element j+16 in its high one.
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 17, y += 32) {
        const float d = std::ldexp(1.0f, static_cast<int>(p[0]) - 127);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * e2m1_to_f32(static_cast<std::uint8_t>(p[1 + j] & 0xF));
          y[j + 16] = d * e2m1_to_f32(static_cast<std::uint8_t>(p[1 + j] >> 4));
        }
      }
      return;
    case GgmlType::NVFP4:
      // Four unsigned E4M3 scales (one per 16 values), then per 16 values 8 bytes: element j low, j+8 high.
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 36, y += 64) {
        for (int s = 0; s < 4; ++s) {
          const std::uint8_t code = p[s];
          // llama.cpp's unsigned E4M3: the top bit is ignored, 0 and 0x7F are zero.
          const int e = (code >> 3) & 0xF, m = code & 7;
          const float d = code == 0 || code == 0x7F ? 0.0f
                          : e == 0                  ? std::ldexp(static_cast<float>(m), -9)
                                                    : std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
          const std::uint8_t* q = p + 4 + 8 * s;
          for (int j = 0; j < 8; ++j) {
            y[16 * s + j] = d * e2m1_to_f32(static_cast<std::uint8_t>(q[j] & 0xF));
            y[16 * s + j + 8] = d * e2m1_to_f32(static_cast<std::uint8_t>(q[j] >> 4));
          }
        }
      }
      return;
    case GgmlType::Q4_1:
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 20, y += 32) {
        const float d = f16_at(p);
        const float m = f16_at(p + 2);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * static_cast<float>(p[4 + j] & 0xF) + m;
          y[j + 16] = d * static_cast<float>(p[4 + j] >> 4) + m;
        }
      }
      return;
    case GgmlType::Q4_K:
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 144) {
        const float d = f16_at(p);
        const float dmin = f16_at(p + 2);
        const std::uint8_t* scales = p + 4;
        const std::uint8_t* q = p + 16;
        for (int chunk = 0; chunk < 4; ++chunk, q += 32) {
          std::uint8_t sc, m;
          get_scale_min_k4(2 * chunk, scales, sc, m);
          const float d1 = d * sc, m1 = dmin * m;
          get_scale_min_k4(2 * chunk + 1, scales, sc, m);
          const float d2 = d * sc, m2 = dmin * m;
          for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
          for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
        }
      }
      return;
    case GgmlType::Q6_K:
      for (std::uint64_t b = 0; b < nblocks; ++b, p += 210) {
        const std::uint8_t* ql = p;
        const std::uint8_t* qh = p + 128;
        const auto* sc = reinterpret_cast<const std::int8_t*>(p + 192);
        const float d = f16_at(p + 208);
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * static_cast<float>(sc[is + 0]) * static_cast<float>(q1);
            y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
            y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
            y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
          }
        }
      }
      return;
    default:
      fail("dequantizing {} is not supported (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K are)", info->name);
  }
}

namespace {

struct NamePair {
  std::string_view hf, gguf;
};
constexpr NamePair kGlobalNames[] = {
    {"model.embed_tokens.weight", "token_embd.weight"}, {"model.norm.weight", "output_norm.weight"}, {"lm_head.weight", "output.weight"}};
// A layer's tensors without "model.layers.N." / "blk.N." and without ".weight" / ".bias".
constexpr NamePair kLayerNames[] = {
    {"input_layernorm", "attn_norm"}, {"post_attention_layernorm", "ffn_norm"}, {"self_attn.q_proj", "attn_q"},
    {"self_attn.k_proj", "attn_k"},   {"self_attn.v_proj", "attn_v"},           {"self_attn.o_proj", "attn_output"},
    {"self_attn.q_norm", "attn_q_norm"}, {"self_attn.k_norm", "attn_k_norm"}, {"mlp.gate_proj", "ffn_gate"},
    {"mlp.up_proj", "ffn_up"},        {"mlp.down_proj", "ffn_down"}};

// `name` as prefix + decimal layer + "." + middle + ("." + weight|bias) in the from side's naming, into
// the other side's; nullopt when it is not of that shape or the middle is not in the table.
std::optional<std::string> translate(std::string_view name, std::string_view from_prefix, std::string_view to_prefix, bool from_hf) {
  for (const NamePair& p : kGlobalNames) {
    if (name == (from_hf ? p.hf : p.gguf)) return std::string(from_hf ? p.gguf : p.hf);
  }
  if (!name.starts_with(from_prefix)) return std::nullopt;
  std::string_view rest = name.substr(from_prefix.size());
  std::size_t digits = 0;
  while (digits < rest.size() && rest[digits] >= '0' && rest[digits] <= '9') ++digits;
  if (digits == 0 || digits > 9 || digits >= rest.size() || rest[digits] != '.') return std::nullopt;
  const std::string_view layer = rest.substr(0, digits);
  rest = rest.substr(digits + 1);
  for (const std::string_view suffix : {std::string_view(".weight"), std::string_view(".bias")}) {
    if (!rest.ends_with(suffix)) continue;
    const std::string_view middle = rest.substr(0, rest.size() - suffix.size());
    for (const NamePair& p : kLayerNames) {
      if (middle == (from_hf ? p.hf : p.gguf)) {
        return std::string(to_prefix) + std::string(layer) + "." + std::string(from_hf ? p.gguf : p.hf) + std::string(suffix);
      }
    }
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> gguf_tensor_name(std::string_view hf_name) { return translate(hf_name, "model.layers.", "blk.", true); }

std::optional<std::string> hf_tensor_name(std::string_view gguf_name) {
  if (gguf_name == "rope_freqs.weight") return std::string();
  return translate(gguf_name, "blk.", "model.layers.", false);
}

}  // namespace mopt::io
