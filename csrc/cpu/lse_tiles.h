// Element-wise passes over one tile of logits: the only non-BLAS work of the CPU kernels.
//
// A tile holds logits S = s·Q·Kᵀ for `rows` rows × `cols` columns, row-major with leading dimension
// `ld`. float tiles run hand-written AVX-512 or AVX2 code picked at run time from cpuid, so the
// extension itself is compiled for the baseline ISA and the wheel stays portable; double tiles (the
// float64 checking path) and CPUs without AVX2 use std::exp.
#pragma once

#include <cstdint>

namespace ck::cpu {

// Forward: fold one tile into the online (max, sum) statistics.
//   row_max[i], row_sum[i] (i < rows): sum of exp(S − row_max) over the columns seen so far;
//   col_max[j], col_sum[j] (j < cols): the same per column; both nullptr without column statistics.
// col_scratch: `cols` elements of scratch (the tile's column maxima).
// Each element costs two exponentials, each shifted by its own running max: nothing overflows whatever
// the scale (docs/internals.md, "Numerics").
template <typename T>
using FwdTileFn = void (*)(const T* S, int64_t rows, int64_t cols, int64_t ld, T* row_max,
                           T* row_sum, T* col_max, T* col_sum, T* col_scratch);

// Backward: overwrite the tile of S with the logit gradient
//   G_ij = row_w[i]·exp(S_ij − row_off[i]) + col_w[j]·exp(S_ij − col_off[j])
// with row_off = row_lse and col_off = col_lse, so both exponentials are ≤ 1. A term
// whose weight pointer is nullptr is skipped and its offset is not read. The sparse positive term is
// applied by the caller, outside the tile.
template <typename T>
using BwdTileFn = void (*)(T* S, int64_t rows, int64_t cols, int64_t ld, const T* row_off,
                           const T* row_w, const T* col_off, const T* col_w);

template <typename T>
struct TileKernels {
  FwdTileFn<T> fwd;
  BwdTileFn<T> bwd;
  const char* isa;  // "avx512", "avx2" or "scalar"
};

// The best code path this CPU supports (cpuid, detected once). The environment variable
// CK_CPU_ISA=avx512|avx2|scalar, read at every call, may lower the choice: the tests use it to cover
// every path on one machine.
TileKernels<float> tile_kernels_f32();
TileKernels<double> tile_kernels_f64();

}  // namespace ck::cpu
