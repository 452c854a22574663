#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"
#include "io/atomic_file.h"
#include "io/json_util.h"

namespace mopt::io {

using nlohmann::json;

namespace {

std::uint64_t read_u64_le(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

std::uint64_t as_u64(const json& value, const std::string& what) {
  if (!value.is_number_unsigned()) fail("{} must be a non-negative integer, got {}", what, json_summary(value));
  return value.get<std::uint64_t>();
}

SafetensorsEntry parse_entry(const std::string& name, const json& value) {
  if (!value.is_object()) fail("tensor '{}': expected an object, got {}", name, json_summary(value));
  const auto dtype_it = value.find("dtype");
  const auto shape_it = value.find("shape");
  const auto offsets_it = value.find("data_offsets");
  if (dtype_it == value.end()) fail("tensor '{}': missing \"dtype\"", name);
  if (shape_it == value.end()) fail("tensor '{}': missing \"shape\"", name);
  if (offsets_it == value.end()) fail("tensor '{}': missing \"data_offsets\"", name);
  if (!dtype_it->is_string()) fail("tensor '{}': dtype must be a string", name);
  const auto dtype_name = dtype_it->get<std::string>();
  const auto dtype = dtype_from_safetensors_name(dtype_name);
  if (!dtype) fail("tensor '{}': unknown or unsupported dtype '{}'", name, printable(dtype_name));
  if (!shape_it->is_array()) fail("tensor '{}': shape must be an array", name);
  SafetensorsEntry e{name, *dtype, {}, 0, 0};
  for (const auto& d : *shape_it) {
    const std::uint64_t v = as_u64(d, "tensor '" + name + "': shape dimension");
    if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      fail("tensor '{}': shape dimension {} is too large", name, v);
    }
    e.shape.push_back(static_cast<std::int64_t>(v));
  }
  if (!offsets_it->is_array() || offsets_it->size() != 2) fail("tensor '{}': data_offsets must be [begin, end]", name);
  e.begin = as_u64((*offsets_it)[0], "tensor '" + name + "': data_offsets begin");
  e.end = as_u64((*offsets_it)[1], "tensor '" + name + "': data_offsets end");
  if (e.end < e.begin) fail("tensor '{}': data_offsets [{}, {}] end before they begin", name, e.begin, e.end);
  const std::uint64_t numel = with_context("tensor '" + name + "'", [&] { return shape_numel(e.shape); });
  if (dtype_is_packed(*dtype) && numel % 2 != 0) {
    fail("tensor '{}': {} elements of {} do not fill whole bytes", name, numel, dtype_name);
  }
  const std::uint64_t bits = static_cast<std::uint64_t>(dtype_bits(*dtype));
  if (numel > std::numeric_limits<std::uint64_t>::max() / bits) fail("tensor '{}': shape {} overflows", name, shape_string(e.shape));
  const std::uint64_t nbytes = numel * bits / 8;
  if (e.end - e.begin != nbytes) {
    fail("tensor '{}': shape {} of {} needs {} bytes but data_offsets [{}, {}] hold {}", name, shape_string(e.shape),
         dtype_name, nbytes, e.begin, e.end, e.end - e.begin);
  }
  return e;
}

}  // namespace

SafetensorsHeader parse_safetensors_header(std::span<const std::byte> file, const std::string& label) {
  return with_context(label, [&] {
    if (file.size() < 8) fail("{} bytes is too short for a safetensors file (8-byte header length)", file.size());
    const std::uint64_t n = read_u64_le(file.data());
    if (n > kSafetensorsMaxHeaderBytes) {
      fail("header length {} exceeds the safetensors limit of {} bytes", n, kSafetensorsMaxHeaderBytes);
    }
    if (n > file.size() - 8) fail("header length {} runs past the end of the file ({} bytes)", n, file.size());
    const auto* text = reinterpret_cast<const char*>(file.data() + 8);
    const json header = parse_json_unique_keys(std::string_view(text, static_cast<std::size_t>(n)), "header");
    if (!header.is_object()) fail("header must be a JSON object, got {}", json_summary(header));

    SafetensorsHeader result;
    result.data_offset = 8 + n;
    for (const auto& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object()) fail("__metadata__ must be an object of strings");
        for (const auto& [mk, mv] : value.items()) {
          if (!mv.is_string()) fail("__metadata__ value of '{}' must be a string", printable(mk));
          result.metadata[mk] = mv.get<std::string>();
        }
        continue;
      }
      result.entries.push_back(parse_entry(printable(key), value));
    }

    std::sort(result.entries.begin(), result.entries.end(), [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const std::uint64_t buffer = file.size() - result.data_offset;
    std::uint64_t expected = 0;
    const SafetensorsEntry* previous = nullptr;
    for (const auto& e : result.entries) {
      if (e.end > buffer) {
        fail("tensor '{}': data_offsets [{}, {}] lie beyond the data buffer ({} bytes)", e.name, e.begin, e.end, buffer);
      }
      if (e.begin < expected) {
        fail("tensor '{}': data_offsets [{}, {}] overlap tensor '{}' [{}, {}]", e.name, e.begin, e.end, previous->name,
             previous->begin, previous->end);
      }
      if (e.begin > expected) {
        fail("tensor '{}': data_offsets [{}, {}] leave a gap of {} bytes before it", e.name, e.begin, e.end,
             e.begin - expected);
      }
      expected = e.end;
      previous = &e;
    }
    if (expected != buffer) fail("{} bytes after the last tensor are not covered by the header", buffer - expected);
    return result;
  });
}

SafetensorsFile::SafetensorsFile(std::shared_ptr<const MappedFile> file, SafetensorsHeader header)
    : file_(std::move(file)), header_(std::move(header)) {
  for (std::size_t i = 0; i < header_.entries.size(); ++i) by_name_.emplace(header_.entries[i].name, i);
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto file = MappedFile::open(path);
  auto header = parse_safetensors_header(file->bytes(), path);
  return SafetensorsFile(std::move(file), std::move(header));
}

const SafetensorsEntry* SafetensorsFile::find(std::string_view name) const {
  const auto it = by_name_.find(std::string(name));
  return it == by_name_.end() ? nullptr : &header_.entries[it->second];
}

Tensor SafetensorsFile::tensor(std::string_view name) const {
  const SafetensorsEntry* e = find(name);
  if (e == nullptr) fail("{}: no tensor named '{}'", path(), name);
  return Tensor::view(file_, static_cast<std::size_t>(header_.data_offset + e->begin), e->dtype, e->shape);
}

// ---------------------------------------------------------------------------
namespace {

std::string safetensors_dtype(const NamedTensor& t) {
  const auto name = dtype_safetensors_name(t.tensor.dtype());
  if (!name) fail("tensor '{}': {} has no safetensors dtype", t.name, dtype_name(t.tensor.dtype()));
  return std::string(*name);
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<const NamedTensor*> order;
  std::set<std::string_view> names;
  for (const auto& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") fail("{}: invalid tensor name '{}'", path, t.name);
    if (!names.insert(t.name).second) fail("{}: tensor '{}' given twice", path, t.name);
    order.push_back(&t);
  }
  // Largest alignment first, sub-byte types last, then by name: with no holes
  // allowed between tensors this is what keeps each one naturally aligned.
  auto rank = [](const NamedTensor* t) {
    return dtype_is_packed(t->tensor.dtype()) ? 0 : dtype_alignment(t->tensor.dtype());
  };
  std::sort(order.begin(), order.end(), [&](const NamedTensor* a, const NamedTensor* b) {
    return rank(a) != rank(b) ? rank(a) > rank(b) : a->name < b->name;
  });

  json header = json::object();
  json meta = json::object();
  meta["format"] = "pt";
  for (const auto& [k, v] : metadata) meta[k] = v;
  header["__metadata__"] = meta;
  std::uint64_t offset = 0;
  for (const NamedTensor* t : order) {
    const std::uint64_t size = t->tensor.nbytes();
    header[t->name] = {{"dtype", safetensors_dtype(*t)}, {"shape", t->tensor.shape()}, {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');

  AtomicFileWriter out(path);
  std::byte length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xFF);
  out.write(std::span<const std::byte>(length, 8));
  out.write(text);
  for (const NamedTensor* t : order) out.write(t->tensor.bytes());
  out.commit();
}

StreamingSafetensorsWriter::StreamingSafetensorsWriter() = default;

StreamingSafetensorsWriter::~StreamingSafetensorsWriter() {
  for (auto*& f : groups_) {
    if (f) std::fclose(f);
  }
}

std::vector<std::string> StreamingSafetensorsWriter::names() const {
  std::vector<std::string> n;
  for (const auto& e : entries_) n.push_back(e.name);
  return n;
}

void StreamingSafetensorsWriter::add(const std::string& name, const Tensor& tensor) {
  if (name.empty() || name == "__metadata__") fail("invalid tensor name '{}'", name);
  for (const auto& e : entries_) {
    if (e.name == name) fail("tensor '{}' given twice", name);
  }
  const NamedTensor nt{name, tensor};
  const std::string dtype = safetensors_dtype(nt);
  const std::size_t align = dtype_is_packed(tensor.dtype()) ? 1 : dtype_alignment(tensor.dtype());
  const int group = align >= 8 ? 0 : align == 4 ? 1 : align == 2 ? 2 : 3;
  auto*& f = groups_[group];
  if (f == nullptr) {
    f = std::tmpfile();
    if (f == nullptr) fail("cannot create a temporary file: {}", std::strerror(errno));
  }
  const auto bytes = tensor.bytes();
  if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) {
    fail("writing tensor '{}' to a temporary file: {}", name, std::strerror(errno));
  }
  entries_.push_back({name, dtype, tensor.shape(), bytes.size(), group});
  bytes_ += bytes.size();
}

void StreamingSafetensorsWriter::write(const std::string& path, const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  json meta = json::object();
  meta["format"] = "pt";
  for (const auto& [k, v] : metadata) meta[k] = v;
  header["__metadata__"] = meta;
  std::uint64_t offset = 0;
  for (int g = 0; g < 4; ++g) {
    for (const auto& e : entries_) {
      if (e.group != g) continue;
      header[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {offset, offset + e.size}}};
      offset += e.size;
    }
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  AtomicFileWriter out(path);
  std::byte length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xFF);
  out.write(std::span<const std::byte>(length, 8));
  out.write(text);
  std::vector<std::byte> buffer(8 << 20);
  for (auto*& f : groups_) {
    if (f == nullptr) continue;
    if (std::fflush(f) != 0 || std::fseek(f, 0, SEEK_SET) != 0) fail("{}: reading back a temporary file: {}", path, std::strerror(errno));
    for (;;) {
      const std::size_t n = std::fread(buffer.data(), 1, buffer.size(), f);
      if (n > 0) out.write(std::span<const std::byte>(buffer.data(), n));
      if (n < buffer.size()) {
        if (std::ferror(f)) fail("{}: reading back a temporary file: {}", path, std::strerror(errno));
        break;
      }
    }
    std::fclose(f);
    f = nullptr;
  }
  out.commit();
  entries_.clear();
  bytes_ = 0;
}

std::vector<std::string> write_safetensors_sharded(const std::string& dir, const std::vector<NamedTensor>& tensors,
                                                   std::uint64_t max_shard_bytes,
                                                   const std::map<std::string, std::string>& metadata) {
  std::vector<std::vector<NamedTensor>> shards;
  std::uint64_t current = 0;
  std::uint64_t total = 0;
  for (const auto& t : tensors) {
    const std::uint64_t size = t.tensor.nbytes();
    if (shards.empty() || (current > 0 && current + size > max_shard_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(t);
    current += size;
    total += size;
  }
  if (shards.empty()) shards.emplace_back();

  namespace fs = std::filesystem;
  std::vector<std::string> written;
  if (shards.size() == 1) {
    write_safetensors((fs::path(dir) / "model.safetensors").string(), shards[0], metadata);
    written.push_back("model.safetensors");
    return written;
  }
  json weight_map = json::object();
  for (std::size_t i = 0; i < shards.size(); ++i) {
    const std::string name = fmt::format("model-{:05}-of-{:05}.safetensors", i + 1, shards.size());
    write_safetensors((fs::path(dir) / name).string(), shards[i], metadata);
    for (const auto& t : shards[i]) weight_map[t.name] = name;
    written.push_back(name);
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_atomically((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
  written.push_back("model.safetensors.index.json");
  return written;
}

}  // namespace mopt::io
