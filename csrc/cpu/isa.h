// Which SIMD code path the float32 tile passes take (lse_tiles.cpp, sigmoid_tiles.cpp).
//
// The extension is compiled for the baseline x86-64 ISA; the AVX-512 and AVX2 passes are ordinary
// functions with GCC/Clang `target` attributes, picked at run time, so one wheel runs on any x86-64
// CPU (and the generic code on any other architecture). float64 tiles always take the generic code.
#pragma once

#include <string>

namespace ck::cpu {

// kAvx512Bf16: AVX-512 plus the bf16 dot-product instructions (AVX512-BF16): the float32 tile
// passes are those of kAvx512, and the tile GEMMs of bfloat16 inputs run on the bf16 units
// (tile_gemm.h); below it bfloat16 inputs are upcast to float32 once.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

// The best path this CPU and OS support (cpuid and the saved register state), detected once.
Isa hardware_isa();

// hardware_isa(), lowered by CK_CPU_ISA=avx512_bf16|avx512|avx2|scalar when set. Read at every
// call, so tests can cover every path on one machine; a path the CPU lacks falls back to the best
// one it has.
Isa selected_isa();

const char* isa_name(Isa isa);

// ck_native::cpu_isa(): the name of the path the kernels take right now ("avx512_bf16": bfloat16
// inputs on the bf16 units, float32 tile passes on AVX-512).
std::string cpu_isa();

}  // namespace ck::cpu
