#include "core/cpu_features.h"

#include "core/error.h"

#include <cstdint>
#include <cstdlib>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace mopt {

namespace {

#if defined(__x86_64__) || defined(__i386__)
std::uint64_t read_xcr0() {
  std::uint32_t eax = 0;
  std::uint32_t edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}
#endif

bool bit(std::uint32_t reg, int n) { return (reg >> n) & 1u; }

}  // namespace

CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = bit(ecx, 27);
  const bool avx = bit(ecx, 28);
  if (!osxsave || !avx) return f;
  const std::uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;        // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;   // plus opmask and ZMM state
  if (!os_avx) return f;
  f.fma = bit(ecx, 12);
  f.f16c = bit(ecx, 29);
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.avx2 = bit(ebx, 5);
  if (os_avx512) {
    f.avx512f = bit(ebx, 16);
    f.avx512bw = bit(ebx, 30);
    f.avx512vl = bit(ebx, 31);
    f.avx512_vnni = bit(ecx, 11);
    f.avx512_vbmi = bit(ecx, 1);
    const bool os_amx = (xcr0 & (std::uint64_t{3} << 17)) == (std::uint64_t{3} << 17);  // XTILECFG and XTILEDATA
    f.amx_bf16 = os_amx && bit(edx, 22) && bit(edx, 24) && f.avx512f && f.avx512bw;
  }
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  f.avx_vnni = bit(eax, 4);
  if (os_avx512) f.avx512_bf16 = bit(eax, 5);
  f.amx_bf16 = f.amx_bf16 && f.avx512_bf16;  // its operands are packed with VCVTNE2PS2BF16
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f = detect_cpu_features();
    const char* limit = std::getenv("MOPT_ISA");
    if (limit != nullptr) {
      const std::string_view l(limit);
      if (l == "scalar") {
        f = CpuFeatures{};
      } else if (l == "avx2") {
        f.avx512f = f.avx512bw = f.avx512vl = f.avx512_vnni = f.avx512_vbmi = f.avx512_bf16 = f.amx_bf16 = false;
      } else if (l != "native") {
        fail("MOPT_ISA={}: expected scalar, avx2 or native", l);
      }
    }
    return f;
  }();
  return features;
}

std::string avx2_kernels_unavailable() {
  const CpuFeatures& f = cpu_features();
  if (f.avx2 && f.fma && f.f16c) return {};
  const char* isa = std::getenv("MOPT_ISA");
  if (isa != nullptr && std::string_view(isa) == "scalar") return "MOPT_ISA=scalar turns the AVX2 kernels off";
  std::string lacking;
  const auto note = [&](bool present, const char* name) {
    if (!present) lacking += lacking.empty() ? name : std::string(", ") + name;
  };
  note(f.avx2, "AVX2");
  note(f.fma, "FMA");
  note(f.f16c, "F16C");
  return "the CPU lacks " + lacking;
}

bool avx2_kernels_available() {
  const CpuFeatures& f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
}

std::string describe(const CpuFeatures& f) {
  std::string out;
  auto add = [&](bool present, const char* name) {
    if (!present) return;
    if (!out.empty()) out += ' ';
    out += name;
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512f, "avx512f");
  add(f.avx512bw, "avx512bw");
  add(f.avx512vl, "avx512vl");
  add(f.avx512_vnni, "avx512_vnni");
  add(f.avx512_vbmi, "avx512_vbmi");
  add(f.avx512_bf16, "avx512_bf16");
  add(f.avx_vnni, "avx_vnni");
  add(f.amx_bf16, "amx_bf16");
  return out.empty() ? "none" : out;
}

}  // namespace mopt
