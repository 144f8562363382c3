// The optional exclusion masks of the LSE kernels (lse_fwd_cpu.cpp, lse_bwd_cpu.cpp), decided one
// tile at a time: same-group pairs and guided false negatives (contract: lse_cpu.h, csrc/ops.cpp).
//
// Per tile the drivers build a byte mask (1 = excluded) in a per-task buffer, rows × cols bytes at
// the tile's leading dimension, and write −inf (statistics) or 0 (class sums, logit gradients)
// into the excluded elements of the logit tile, as self-exclusion does; the tile passes
// (lse_tiles.cpp) on every SIMD path already treat −inf exactly. Nothing N×M is ever stored: the
// guide similarities of a tile are one more tile-sized GEMM, ⟨gq_i, gk_j⟩ for the tile's rows and
// columns in the statistic type, into a second per-task buffer at the same 64-byte alignment as
// in every slot, in the forward and the backward alike (same shapes, same leading dimension), so
// both passes see the same bits and make the same decisions (compared with a strict `>`).
//
// Cost: 2·N·M·Dg FLOPs of GEMM for the guide, and a few compares per element; without masks
// none of this runs (the drivers keep their previous code path).
#pragma once

#include <cstdint>
#include <cstring>

#include "lse_cpu.h"
#include "tiling.h"

namespace ck::cpu {

// Designated positives, which the guide never excludes: same class (row_ids / col_ids, the dense
// class ids), else the labelled column l_i (labels, or i when labels is null).
struct Designated {
  const int64_t* labels;
  const int32_t* row_ids;
  const int32_t* col_ids;
};

// Fills mask[r·ld + c] (r < ib, c < jt) for the tile of rows [i0, i0 + ib) × columns [j0, j0 + jt)
// with 1 on the excluded pairs of E (self pair under exclude_self, same group, guided false
// negative) and 0 elsewhere; `gsim` is scratch of ib × ld elements (used with a guide only).
// Returns the number of excluded pairs in the tile.
template <typename T>
int64_t build_tile_mask(const PairMasks<T>& mk, const Designated& des, bool exclude_self,
                        int64_t i0, int64_t ib, int64_t j0, int64_t jt, int64_t ld, T* gsim,
                        uint8_t* mask) {
  if (mk.guide()) {
    gemm<T>(false, true, ib, jt, mk.Dg, T(1), mk.guide_q + i0 * mk.Dg, mk.Dg,
            mk.guide_k + j0 * mk.Dg, mk.Dg, T(0), gsim, ld);
  }
  const bool classes = des.row_ids != nullptr;
  const int64_t* cg = mk.groups() ? mk.col_groups + j0 : nullptr;
  const int32_t* cid = classes ? des.col_ids + j0 : nullptr;
  int64_t excluded = 0;
  for (int64_t r = 0; r < ib; ++r) {
    const int64_t i = i0 + r;
    uint8_t* m = mask + r * ld;
    if (mk.groups()) {
      const int64_t g = mk.row_groups[i];
      for (int64_t c = 0; c < jt; ++c) m[c] = cg[c] == g;
    } else {
      std::memset(m, 0, static_cast<size_t>(jt));
    }
    if (mk.guide()) {
      const T* s = gsim + r * ld;
      const T t = mk.guide_thr[i];
      if (classes) {
        const int32_t ri = des.row_ids[i];
        for (int64_t c = 0; c < jt; ++c) m[c] |= (s[c] > t) & (cid[c] != ri);
      } else {
        for (int64_t c = 0; c < jt; ++c) m[c] |= s[c] > t;
        // The labelled column is designated: only its group can exclude it (or the self rule).
        const int64_t l = des.labels ? des.labels[i] : i;
        if (l >= j0 && l < j0 + jt) m[l - j0] = mk.groups() && cg[l - j0] == mk.row_groups[i];
      }
    }
    if (exclude_self && i >= j0 && i < j0 + jt) m[i - j0] = 1;
    int64_t n = 0;
    for (int64_t c = 0; c < jt; ++c) n += m[c];
    excluded += n;
  }
  return excluded;
}

// tile[r·ld + c] = v wherever mask[r·ld + c] is set.
template <typename T>
void fill_masked(T* tile, int64_t ib, int64_t jt, int64_t ld, const uint8_t* mask, T v) {
  for (int64_t r = 0; r < ib; ++r) {
    T* t = tile + r * ld;
    const uint8_t* m = mask + r * ld;
    for (int64_t c = 0; c < jt; ++c) t[c] = m[c] ? v : t[c];
  }
}

// Whether the label pair (i, l) is excluded, without a tile: the guide never excludes a
// designated pair, so only the self rule and the groups can.
template <typename T>
bool label_pair_excluded(const PairMasks<T>& mk, bool exclude_self, int64_t i, int64_t l) {
  return (exclude_self && l == i) || (mk.groups() && mk.row_groups[i] == mk.col_groups[l]);
}

}  // namespace ck::cpu
