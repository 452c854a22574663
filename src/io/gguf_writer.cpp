#include "io/gguf_writer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "core/convert.h"
#include "core/error.h"
#include "io/atomic_file.h"

namespace mopt::io {

namespace {

constexpr std::uint32_t kBlock = 32;

void put_bytes(std::vector<std::byte>& out, const void* p, std::size_t n) {
  const auto* b = static_cast<const std::byte*>(p);
  out.insert(out.end(), b, b + n);
}

template <typename T>
void put(std::vector<std::byte>& out, T v) {
  put_bytes(out, &v, sizeof v);
}

void put_string(std::vector<std::byte>& out, const std::string& s) {
  put<std::uint64_t>(out, s.size());
  put_bytes(out, s.data(), s.size());
}

void put_scalar(std::vector<std::byte>& out, GgufValueType type, const nlohmann::json& v, const std::string& key) {
  const auto need_number = [&] {
    if (!v.is_number() && !v.is_boolean()) fail("GGUF metadata {}: {} is not a number", key, v.dump());
  };
  switch (type) {
    case GgufValueType::u8: need_number(); put<std::uint8_t>(out, v.get<std::uint8_t>()); break;
    case GgufValueType::i8: need_number(); put<std::int8_t>(out, v.get<std::int8_t>()); break;
    case GgufValueType::u16: need_number(); put<std::uint16_t>(out, v.get<std::uint16_t>()); break;
    case GgufValueType::i16: need_number(); put<std::int16_t>(out, v.get<std::int16_t>()); break;
    case GgufValueType::u32: need_number(); put<std::uint32_t>(out, v.get<std::uint32_t>()); break;
    case GgufValueType::i32: need_number(); put<std::int32_t>(out, v.get<std::int32_t>()); break;
    case GgufValueType::f32: need_number(); put<float>(out, v.get<float>()); break;
    case GgufValueType::u64: need_number(); put<std::uint64_t>(out, v.get<std::uint64_t>()); break;
    case GgufValueType::i64: need_number(); put<std::int64_t>(out, v.get<std::int64_t>()); break;
    case GgufValueType::f64: need_number(); put<double>(out, v.get<double>()); break;
    case GgufValueType::boolean:
      if (!v.is_boolean()) fail("GGUF metadata {}: {} is not a bool", key, v.dump());
      put<std::uint8_t>(out, v.get<bool>() ? 1 : 0);
      break;
    case GgufValueType::string:
      if (!v.is_string()) fail("GGUF metadata {}: {} is not a string", key, v.dump());
      put_string(out, v.get<std::string>());
      break;
    case GgufValueType::array: fail("GGUF metadata {}: nested arrays are not written", key);
  }
}

std::uint64_t round_up(std::uint64_t n, std::uint64_t a) { return (n + a - 1) / a * a; }

}  // namespace

std::vector<std::byte> ggml_quantize(GgmlType type, const float* x, std::uint64_t count, const std::string& label) {
  for (std::uint64_t i = 0; i < count; ++i) {
    if (!std::isfinite(x[i])) fail("{}: non-finite value {} at element {}", label, x[i], i);
  }
  std::vector<std::byte> out;
  switch (type) {
    case GgmlType::F32: put_bytes(out, x, count * 4); return out;
    case GgmlType::F16:
    case GgmlType::BF16: {
      out.resize(count * 2);
      auto* dst = reinterpret_cast<std::uint16_t*>(out.data());
      for (std::uint64_t i = 0; i < count; ++i) dst[i] = type == GgmlType::F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
      return out;
    }
    case GgmlType::Q8_0:
    case GgmlType::Q4_0: break;
    default: fail("{}: writing ggml type {} is not supported (F32, F16, BF16, Q8_0, Q4_0)", label, static_cast<std::uint32_t>(type));
  }
  if (count % kBlock != 0) fail("{}: {} values are not whole blocks of {}", label, count, kBlock);
  const bool q8 = type == GgmlType::Q8_0;
  out.reserve(count / kBlock * (q8 ? 34 : 18));
  for (std::uint64_t b = 0; b < count; b += kBlock) {
    const float* v = x + b;
    if (q8) {
      float amax = 0.0f;
      for (std::uint32_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.0f;
      const float id = d == 0.0f ? 0.0f : 1.0f / d;
      put<std::uint16_t>(out, f32_to_f16(d));
      for (std::uint32_t i = 0; i < kBlock; ++i) put<std::int8_t>(out, static_cast<std::int8_t>(std::round(v[i] * id)));
    } else {
      // The value of largest magnitude, the first of equals, with its sign.
      float m = 0.0f, am = -1.0f;
      for (std::uint32_t i = 0; i < kBlock; ++i) {
        if (std::fabs(v[i]) > am) am = std::fabs(v[i]), m = v[i];
      }
      const float d = m / -8.0f;
      const float id = d == 0.0f ? 0.0f : 1.0f / d;
      put<std::uint16_t>(out, f32_to_f16(d));
      std::uint8_t q[kBlock];
      for (std::uint32_t i = 0; i < kBlock; ++i) q[i] = static_cast<std::uint8_t>(std::min(15.0f, std::trunc(v[i] * id + 8.5f)));
      for (std::uint32_t i = 0; i < kBlock / 2; ++i) put<std::uint8_t>(out, static_cast<std::uint8_t>(q[i] | (q[i + kBlock / 2] << 4)));
    }
  }
  return out;
}

void GgufWriter::add(const std::string& key, GgufValue value) {
  for (const auto& [k, v] : metadata_) {
    if (k == key) fail("GGUF metadata key {} added twice", key);
  }
  metadata_.emplace_back(key, std::move(value));
}

void GgufWriter::add_string(const std::string& key, const std::string& value) { add(key, {GgufValueType::string, GgufValueType::u8, value}); }
void GgufWriter::add_u32(const std::string& key, std::uint32_t value) { add(key, {GgufValueType::u32, GgufValueType::u8, value}); }
void GgufWriter::add_f32(const std::string& key, float value) { add(key, {GgufValueType::f32, GgufValueType::u8, value}); }

GgmlTypeInfo GgufWriter::check_tensor(const std::string& name, const Shape& shape, GgmlType type, std::uint64_t& bytes) const {
  const auto info = ggml_type_info(static_cast<std::uint32_t>(type));
  if (!info) fail("GGUF tensor {}: unknown ggml type {}", name, static_cast<std::uint32_t>(type));
  if (shape.empty()) fail("GGUF tensor {}: no dimensions", name);
  for (const auto& t : tensors_) {
    if (t.name == name) fail("GGUF tensor {} added twice", name);
  }
  std::uint64_t n = 1;
  for (const auto d : shape) {
    if (d <= 0) fail("GGUF tensor {}: dimension {} is not positive", name, d);
    n *= static_cast<std::uint64_t>(d);
  }
  if (static_cast<std::uint64_t>(shape.back()) % info->block_elements != 0) {
    fail("GGUF tensor {}: its rows of {} are not whole {} blocks of {}", name, shape.back(), info->name, info->block_elements);
  }
  bytes = n / info->block_elements * info->block_bytes;
  return *info;
}

void GgufWriter::add_tensor(const std::string& name, const Shape& shape, GgmlType type, std::vector<std::byte> data) {
  std::uint64_t bytes = 0;
  const GgmlTypeInfo info = check_tensor(name, shape, type, bytes);
  if (data.size() != bytes) fail("GGUF tensor {}: {} bytes for {} of {} bytes", name, data.size(), info.name, bytes);
  tensors_.push_back({name, shape, info, bytes, std::move(data), {}});
}

void GgufWriter::add_tensor(const std::string& name, const Shape& shape, GgmlType type, std::function<std::vector<std::byte>()> produce) {
  std::uint64_t bytes = 0;
  const GgmlTypeInfo info = check_tensor(name, shape, type, bytes);
  tensors_.push_back({name, shape, info, bytes, {}, std::move(produce)});
}

std::vector<std::byte> GgufWriter::Entry::contents() const {
  if (!produce) return data;
  std::vector<std::byte> d = produce();
  if (d.size() != bytes) fail("GGUF tensor {}: {} bytes produced for {} of {} bytes", name, d.size(), type.name, bytes);
  return d;
}

std::uint64_t GgufWriter::alignment() const {
  for (const auto& [k, v] : metadata_) {
    if (k == "general.alignment") {
      const auto a = v.value.get<std::uint64_t>();
      if (a == 0 || (a & (a - 1)) != 0) fail("GGUF general.alignment {} is not a power of two", a);
      return a;
    }
  }
  return 32;
}

std::vector<std::byte> GgufWriter::bytes() const {
  std::vector<std::byte> out = header_bytes();
  const std::uint64_t align = alignment();
  for (const auto& t : tensors_) {
    const std::vector<std::byte> d = t.contents();
    put_bytes(out, d.data(), d.size());
    out.resize(round_up(out.size(), align), std::byte{0});
  }
  return out;
}

std::vector<std::byte> GgufWriter::header_bytes() const {
  const std::uint64_t align = alignment();
  std::vector<std::byte> out;
  put_bytes(out, "GGUF", 4);
  put<std::uint32_t>(out, 3);
  put<std::uint64_t>(out, tensors_.size());
  put<std::uint64_t>(out, metadata_.size());
  for (const auto& [key, v] : metadata_) {
    put_string(out, key);
    put<std::uint32_t>(out, static_cast<std::uint32_t>(v.type));
    if (v.type == GgufValueType::array) {
      if (!v.value.is_array()) fail("GGUF metadata {}: an array type with a non-array value", key);
      put<std::uint32_t>(out, static_cast<std::uint32_t>(v.element_type));
      put<std::uint64_t>(out, v.value.size());
      for (const auto& e : v.value) put_scalar(out, v.element_type, e, key);
    } else {
      put_scalar(out, v.type, v.value, key);
    }
  }
  std::uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_string(out, t.name);
    put<std::uint32_t>(out, static_cast<std::uint32_t>(t.shape.size()));
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) put<std::uint64_t>(out, static_cast<std::uint64_t>(*it));
    put<std::uint32_t>(out, static_cast<std::uint32_t>(t.type.type));
    put<std::uint64_t>(out, offset);
    offset = round_up(offset + t.bytes, align);
  }
  out.resize(round_up(out.size(), align), std::byte{0});
  return out;
}

void GgufWriter::write(const std::string& path) const {
  const std::uint64_t align = alignment();
  AtomicFileWriter w(path);
  const std::vector<std::byte> header = header_bytes();
  w.write(header);
  static const std::byte zeros[256] = {};
  for (const auto& t : tensors_) {
    w.write(t.contents());
    const std::uint64_t pad = round_up(t.bytes, align) - t.bytes;
    for (std::uint64_t left = pad; left > 0;) {
      const std::uint64_t n = std::min<std::uint64_t>(left, sizeof zeros);
      w.write(std::span<const std::byte>(zeros, n));
      left -= n;
    }
  }
  w.commit();
}

}  // namespace mopt::io
