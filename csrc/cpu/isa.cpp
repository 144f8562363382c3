// Run-time selection of the SIMD path (see isa.h).

#include "isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "lse_tiles.h"

namespace ck::cpu {

Isa hardware_isa() {
  static const Isa isa = [] {
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    __builtin_cpu_init();
    // cpuid feature bits; GCC/Clang also check that the OS saves the wider register state.
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      // The bf16 GEMM (bf16_gemm.cpp) also uses AVX512-BW/VL masked 16-bit stores.
      if (__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl")) {
        return Isa::kAvx512Bf16;
      }
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return isa;
}

Isa selected_isa() {
  const Isa hw = hardware_isa();
  const char* env = std::getenv("CK_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  Isa want;
  if (std::strcmp(env, "scalar") == 0) want = Isa::kScalar;
  else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
  else if (std::strcmp(env, "avx512_bf16") == 0) want = Isa::kAvx512Bf16;
  else TORCH_CHECK(false, "CK_CPU_ISA must be avx512_bf16, avx512, avx2 or scalar (or unset), ",
                   "got '", env, "'");
  return static_cast<Isa>(std::min(static_cast<int>(want), static_cast<int>(hw)));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

// Reported from the kernel table itself, so it names the code the next call runs.
std::string cpu_isa() { return lse_tile_kernels<float>().isa; }

}  // namespace ck::cpu
