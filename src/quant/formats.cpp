#include "quant/formats.h"

#include <algorithm>
#include <cctype>
#include <deque>
#include <mutex>

#include "core/error.h"

namespace mopt::quant {

namespace {

QuantizerSpec spec(Element e, Scaling s, std::int64_t block = 0, std::int64_t block_rows = 0, bool fp8_second_stage = false) {
  QuantizerSpec q;
  q.element = e;
  q.scaling = s;
  q.block = block;
  q.block_rows = block_rows;
  q.fp8_second_stage = fp8_second_stage;
  return q;
}

std::vector<FormatRow> builtin_rows() {
  using E = Element;
  using S = Scaling;
  const QuantizerSpec fp8_tensor = spec(E::e4m3, S::per_tensor), int8_row = spec(E::int8, S::per_row);
  const QuantizerSpec int4_block = spec(E::int4, S::block, 128), nvfp4 = spec(E::e2m1, S::nvfp4, 16);
  std::vector<FormatRow> rows = {
      {"fp8", "FP8", true, fp8_tensor, fp8_tensor, false, "max", "q8_0"},
      {"fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", true, spec(E::e4m3, S::per_row), spec(E::e4m3, S::per_token), false, "max", "q8_0"},
      // The reference writes this quant_algo in lower case.
      {"fp8_block", "fp8_pb_wo", true, spec(E::e4m3, S::block, 128, 128), std::nullopt, false, "max", "q8_0"},
      {"int8", "W8A8_SQ_PER_CHANNEL", true, int8_row, spec(E::int8, S::per_tensor), false, "max", "q8_0"},
      {"int8_sq", "W8A8_SQ_PER_CHANNEL", false, int8_row, spec(E::int8, S::per_tensor), false, "smoothquant", "q8_0"},
      {"int8_wo", "W8A16", true, int8_row, std::nullopt, false, "max", "q8_0"},
      {"int4_rtn", "W4A16_AWQ", true, int4_block, std::nullopt, true, "max", "q4_0"},
      {"int4_awq", "W4A16_AWQ", false, int4_block, std::nullopt, true, "awq_lite", "q4_0"},
      {"w4a8_awq", "W4A8_AWQ", true, spec(E::int4, S::block, 128, 0, true), fp8_tensor, true, "awq_lite", "q4_0"},
      {"nvfp4", "NVFP4", true, nvfp4, nvfp4, false, "max", "nvfp4"},
      {"nvfp4_awq", "NVFP4_AWQ", true, nvfp4, nvfp4, false, "awq_lite", "nvfp4"},
      {"mxfp8", "MXFP8", true, spec(E::e4m3, S::mx, 32), spec(E::e4m3, S::mx, 32), false, "max", "q8_0"},
      // Lower case, as the reference writes it.
      {"mxfp4", "mxfp4", true, spec(E::e2m1, S::mx, 32), spec(E::e2m1, S::mx, 32), false, "max", "mxfp4"},
  };
  for (auto& r : rows) {
    r.fused_groups_share_scales = r.name != "fp8";
    r.folds_scales_into_rows = r.name == "nvfp4_awq";
  }
  return rows;
}

// The rows added at run time (a deque keeps each where it is as more are added).
struct AddedRows {
  std::mutex mutex;
  std::deque<FormatRow> rows;
};

AddedRows& added() {
  static AddedRows a;
  return a;
}

bool same_ignoring_case(std::string_view a, std::string_view b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](char x, char y) {
           return std::tolower(static_cast<unsigned char>(x)) == std::tolower(static_cast<unsigned char>(y));
         });
}

}  // namespace

const std::vector<FormatRow>& format_table() {
  static const std::vector<FormatRow> rows = builtin_rows();
  return rows;
}

namespace {

// The first row `match` accepts: the table's, then the added ones.
template <typename Match>
const FormatRow* find_row(Match match) {
  for (const auto& r : format_table()) {
    if (match(r)) return &r;
  }
  AddedRows& a = added();
  std::lock_guard lock(a.mutex);
  for (const auto& r : a.rows) {
    if (match(r)) return &r;
  }
  return nullptr;
}

}  // namespace

const FormatRow* find_format(std::string_view name) {
  return find_row([&](const FormatRow& r) { return r.name == name; });
}

const FormatRow* format_for_quant_algo(std::string_view quant_algo) {
  return find_row([&](const FormatRow& r) { return r.reader_row && same_ignoring_case(r.quant_algo, quant_algo); });
}

void add_format(FormatRow row) {
  if (row.name.empty() || row.name == "none") fail("a format needs a name other than 'none'");
  if (row.quant_algo.empty()) fail("format '{}' needs a quant_algo (the name its export writes)", row.name);
  // One lock around the checks and the insertion: two threads cannot both add one name.
  AddedRows& a = added();
  std::lock_guard lock(a.mutex);
  const auto clashes = [&](const FormatRow& r) {
    if (r.name == row.name) fail("format '{}' is already defined", row.name);
    if (row.reader_row && r.reader_row && same_ignoring_case(r.quant_algo, row.quant_algo)) {
      fail("format '{}': quant_algo '{}' already reads back as format '{}'", row.name, row.quant_algo, r.name);
    }
  };
  for (const auto& r : format_table()) clashes(r);
  for (const auto& r : a.rows) clashes(r);
  a.rows.push_back(std::move(row));
}

const std::vector<KvScheme>& kv_scheme_table() {
  static const std::vector<KvScheme> rows = {
      {"fp8", "FP8", spec(Element::e4m3, Scaling::per_tensor), true, true},
      {"nvfp4", "NVFP4", spec(Element::e2m1, Scaling::nvfp4, 16), false, false},
  };
  return rows;
}

const KvScheme& kv_scheme(std::string_view name) {
  std::string names;
  for (const auto& r : kv_scheme_table()) {
    if (r.name == name) return r;
    names += (names.empty() ? "" : ", ") + r.name;
  }
  fail("unknown KV-cache format '{}' (known: {})", name, names);
}

const KvScheme* kv_scheme_for_quant_algo(std::string_view quant_algo) {
  for (const auto& r : kv_scheme_table()) {
    if (r.quant_algo == quant_algo) return &r;
  }
  return nullptr;
}

}  // namespace mopt::quant
