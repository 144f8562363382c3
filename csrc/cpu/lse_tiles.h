// Element-wise passes over one tile of logits for the log-sum-exp family: the only non-BLAS work of
// the LSE kernels (lse_fwd_cpu.cpp, lse_bwd_cpu.cpp).
//
// A tile holds logits S = s·Q·Kᵀ for `rows` rows × `cols` columns, row-major with leading dimension
// `ld`. float tiles run hand-written AVX-512 or AVX2 code picked at run time (isa.h); double tiles
// (the float64 checking path) and CPUs without AVX2 run generic code on std::exp.
//
// Self-exclusion is the callers' business: they write −inf into the excluded elements of the tiles
// that cross the diagonal. The passes below treat −inf exactly: e^−inf = 0 on every path, and a row
// or column whose running max is still −inf contributes nothing and produces no NaN.
#pragma once

#include <cstdint>

namespace ck::cpu {

// Forward: fold one tile into the online (max, sum) statistics.
//   row_max[i], row_sum[i] (i < rows): sum of exp(S − row_max) over the columns seen so far;
//   col_max[j], col_sum[j] (j < cols): the same per column; both nullptr without column statistics.
// col_scratch: `cols` elements of scratch (the tile's column maxima, then the column offsets).
// Each element costs two exponentials, each shifted by its own running max: nothing overflows
// whatever the scale (docs/internals.md, "Numerics").
template <typename T>
using FwdTileFn = void (*)(const T* S, int64_t rows, int64_t cols, int64_t ld, T* row_max,
                           T* row_sum, T* col_max, T* col_sum, T* col_scratch);

// Backward: overwrite the tile of S with the logit gradient
//   G_ij = row_w[i]·exp(S_ij − row_off[i]) + col_w[j]·exp(S_ij − col_off[j])
// with row_off = row_lse and col_off = col_lse, so both exponentials are ≤ 1 (callers replace an
// offset of −inf — a row or column with nothing left after exclusion — by +inf, so that its weights
// are exactly 0 instead of exp(+inf)). A term whose weight pointer is nullptr is skipped and its
// offset is not read. The positive terms are applied by the caller.
template <typename T>
using BwdTileFn = void (*)(T* S, int64_t rows, int64_t cols, int64_t ld, const T* row_off,
                           const T* row_w, const T* col_off, const T* col_w);

// Class positives, forward: pos[i] += Σ_j [col_ids[j] == row_ids[i]]·S_ij, summed in T.
// The ids are the dense int32 class ids of the rows and columns of the tile (equal ids ⇔ equal
// classes). The caller zeroes excluded elements first (adding 0 is exact).
template <typename T>
using PosSumTileFn = void (*)(const T* S, int64_t rows, int64_t cols, int64_t ld,
                              const int32_t* row_ids, const int32_t* col_ids, T* pos);

// Class positives, backward: G_ij += grad_pos[i]·[col_ids[j] == row_ids[i]], in place.
template <typename T>
using PosAddTileFn = void (*)(T* G, int64_t rows, int64_t cols, int64_t ld,
                              const int32_t* row_ids, const int32_t* col_ids, const T* grad_pos);

template <typename T>
struct LseTileKernels {
  FwdTileFn<T> fwd;
  BwdTileFn<T> bwd;
  PosSumTileFn<T> pos_sum;
  PosAddTileFn<T> pos_add;
  const char* isa;  // "avx512_bf16", "avx512", "avx2" or "scalar": what cpu_isa() reports
};

// The passes of the path selected_isa() picks now (float) or the generic ones (double).
template <typename T>
LseTileKernels<T> lse_tile_kernels();
template <>
LseTileKernels<float> lse_tile_kernels<float>();
template <>
LseTileKernels<double> lse_tile_kernels<double>();

}  // namespace ck::cpu
