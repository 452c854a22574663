// libFuzzer target: compressed-tensors' sparse-24-bitmask parts as a checkpoint may hold them
// (compressed values, bitmask, shape of any size and dtype), decompressed; what decompresses is 2:4
// and compresses again; and arbitrary dense tensors through the 2:4 check, the compressor and the
// 2:4 kernel's layout.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "core/error.h"
#include "core/tensor.h"
#include "io/compressed_tensors_packing.h"
#include "kernels/sparse24.h"

namespace {

mopt::Tensor bytes_tensor(mopt::DType dtype, const std::uint8_t* data, std::size_t n, std::size_t element_bytes) {
  const auto count = static_cast<std::int64_t>(n / element_bytes);
  mopt::Tensor t = mopt::Tensor::zeros(dtype, {count});
  if (count > 0) std::memcpy(t.mutable_bytes().data(), data, static_cast<std::size_t>(count) * element_bytes);
  return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 4) return 0;
  const std::int64_t rows = 1 + data[0] % 16, cols = 4 * (1 + data[1] % 16);
  const mopt::DType dtypes[] = {mopt::DType::BF16, mopt::DType::F8_E4M3, mopt::DType::I8, mopt::DType::F32};
  const std::size_t eb[] = {2, 1, 1, 4};
  const int d = data[2] % 4;
  const std::size_t split = size > 4 ? data[3] % (size - 4 + 1) : 0;
  const std::uint8_t* rest = data + 4;
  const std::size_t n = size - 4;
  try {
    mopt::Tensor shape = mopt::Tensor::zeros(mopt::DType::I64, {2, 1});
    shape.mutable_data<std::int64_t>()[0] = rows;
    shape.mutable_data<std::int64_t>()[1] = (data[3] & 0x80) ? cols + 1 : cols;  // sometimes a shape the parts cannot fit
    const mopt::Tensor bitmask = bytes_tensor(mopt::DType::U8, rest, split, 1);
    const mopt::Tensor compressed = bytes_tensor(dtypes[d], rest + split, n - split, eb[d]);
    // A bitmask may keep more than two of a group (compressed-tensors does not check either): the
    // compressor then refuses the result by name.
    const mopt::Tensor dense = mopt::io::sparse24_bitmask_decompress(compressed, bitmask, shape, "fuzz");
    (void)mopt::io::sparse24_bitmask_compress(dense, "fuzz");
  } catch (const mopt::Error&) {
  }
  // The bytes as a dense tensor: the 2:4 check, the compressor and the kernel's layout agree on it.
  const std::size_t need = static_cast<std::size_t>(rows * cols) * eb[d];
  if (n >= need) {
    mopt::Tensor dense = mopt::Tensor::zeros(dtypes[d], {rows, cols});
    std::memcpy(dense.mutable_bytes().data(), rest, need);
    const bool sparse = mopt::io::is_sparse24(dense);
    try {
      (void)mopt::io::sparse24_bitmask_compress(dense, "fuzz");
      if (!sparse) __builtin_trap();  // compressed what is not 2:4
    } catch (const mopt::Error&) {
      if (sparse) __builtin_trap();  // refused what is 2:4
    }
    if (d < 3) {
      const mopt::kernels::Sparse24Values types[] = {mopt::kernels::Sparse24Values::bf16, mopt::kernels::Sparse24Values::e4m3,
                                                     mopt::kernels::Sparse24Values::int8};
      try {
        const auto k = mopt::kernels::Sparse24Linear::compress(types[d], rest, rows, cols,
                                                               d == 0 ? std::vector<float>{} : std::vector<float>(static_cast<std::size_t>(rows), 0.5f), "fuzz");
        if (k) {
          std::vector<float> x(static_cast<std::size_t>(cols), 1.0f), y(static_cast<std::size_t>(rows));
          k->forward(x.data(), 1, y.data());
        }
      } catch (const mopt::Error&) {
      }
    }
  }
  return 0;
}
