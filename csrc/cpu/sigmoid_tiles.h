// Element-wise passes over one tile of logits for the sigmoid (SigLIP) family (sigmoid_cpu.cpp).
//
// Tile layout as in lse_tiles.h. With z_ij = +1 for a positive pair and −1 otherwise, and the logit
// L_ij = S_ij + bias rounded once, the loss of an element is softplus(x) and its logit gradient
// −z·σ(x), x = −z·L. Both come from the one t = exp(−|x|) ∈ (0, 1]:
//   softplus(x) = max(x, 0) + log1p(t),   σ(x) = 1/(1 + t) for x ≥ 0, t/(1 + t) for x < 0,
// so nothing overflows and nothing cancels, whatever the scale and bias.
//
// Positives are the pairs with equal int32 ids (row_ids[i] == col_ids[j], the tile's slices of the
// dense class ids, or of 0..N−1 / 0..M−1 for the diagonal); row_ids == nullptr: no positives.
#pragma once

#include <cstdint>

namespace ck::cpu {

// Forward: row_loss[i] += Σ_j softplus(−z_ij·(S_ij + bias)), summed in T.
template <typename T>
using SigmoidFwdTileFn = void (*)(const T* S, int64_t rows, int64_t cols, int64_t ld, T bias,
                                  const int32_t* row_ids, const int32_t* col_ids, T* row_loss);

// Backward: overwrite the tile with G_ij = −z_ij·row_w[i]·σ(−z_ij·(S_ij + bias)) and add its row
// sums to grad_bias[i].
template <typename T>
using SigmoidBwdTileFn = void (*)(T* S, int64_t rows, int64_t cols, int64_t ld, T bias,
                                  const int32_t* row_ids, const int32_t* col_ids, const T* row_w,
                                  T* grad_bias);

template <typename T>
struct SigmoidTileKernels {
  SigmoidFwdTileFn<T> fwd;
  SigmoidBwdTileFn<T> bwd;
  const char* isa;
};

template <typename T>
SigmoidTileKernels<T> sigmoid_tile_kernels();
template <>
SigmoidTileKernels<float> sigmoid_tile_kernels<float>();
template <>
SigmoidTileKernels<double> sigmoid_tile_kernels<double>();

}  // namespace ck::cpu
