// The operands Q (N, D) and K (M, D) of the LSE and sigmoid tile GEMMs (tile_gemm.h): either
// statistic-type copies (Q, K; the upcast path) or the bfloat16 inputs themselves (Qh, Kh; the bf16
// dot-product path, T = float). Exactly one pair is set (problem.h tile_inputs).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace ck::cpu {

template <typename T>
struct Operands {
  const T* Q = nullptr;  // (N, D), upcast path
  const T* K = nullptr;  // (M, D)
  const c10::BFloat16* Qh = nullptr;  // (N, D), bf16 path (T = float; Q and K are then null)
  const c10::BFloat16* Kh = nullptr;  // (M, D)
  bool bf16() const { return Qh != nullptr; }
  // Element e of Q or K as T, on either path (O(N·D) loops outside the tiles).
  T q(int64_t e) const { return Q ? Q[e] : static_cast<T>(static_cast<float>(Qh[e])); }
  T k(int64_t e) const { return K ? K[e] : static_cast<T>(static_cast<float>(Kh[e])); }
};

}  // namespace ck::cpu
