// Which SIMD code path the float32 tile passes take (lse_tiles.cpp, sigmoid_tiles.cpp).
//
// The extension is compiled for the baseline x86-64 ISA; the AVX-512 and AVX2 passes are ordinary
// functions with GCC/Clang `target` attributes, picked at run time, so one wheel runs on any x86-64
// CPU (and the generic code on any other architecture). float64 tiles always take the generic code.
#pragma once

#include <string>

namespace ck::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best path this CPU and OS support (cpuid and the saved register state), detected once.
Isa hardware_isa();

// hardware_isa(), lowered by CK_CPU_ISA=avx512|avx2|scalar when set. Read at every call, so tests
// can cover every path on one machine; a path the CPU lacks falls back to the best one it has.
Isa selected_isa();

const char* isa_name(Isa isa);

// ck_native::cpu_isa(): the name of the path the float32 kernels take right now.
std::string cpu_isa();

}  // namespace ck::cpu
