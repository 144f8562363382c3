// Backward of the LSE family: grad_query = s·G·K and grad_keys = s·Gᵀ·Q for
//   G_ij = grad_row_i·exp(S_ij − row_lse_i) + grad_col_j·exp(S_ij − col_lse_j)
//          + grad_pos_i·[j ∈ P(i)]
// and G = 0 on the excluded pairs (contract: lse_cpu.h; work split: tiling.h).
//
// FLOPs: the tile is recomputed once, turned into G in place, and feeds both gradient GEMMs while
// it is still in cache (6·N·M·D in total). grad_keys goes to per-group copies merged in group
// order at the end (bitwise repeatable, tiling.h).
// Terms whose upstream gradient is None are skipped and their statistic is never read; with only
// label positives G has one entry per row and the tiles are skipped altogether (O(N·D)).
// The optional masks (groups, guide: lse_masks.h) are decided per tile exactly as in the forward
// (same guide GEMM, same bits): −inf before the tile pass, 0 after the positive terms.

#include <limits>
#include <vector>

#include "lse_cpu.h"
#include "lse_masks.h"
#include "lse_tiles.h"
#include "tile_gemm.h"

namespace ck::cpu {
namespace {

// Offsets for the tile pass: a statistic of −inf (a row or column with no element left after
// exclusion) becomes +inf, so that its weights exp(S − offset) are exactly 0 instead of
// exp(S + inf) = inf (and inf·0 = NaN). Every element of such a row or column is excluded, so
// nothing is lost.
template <typename T>
std::vector<T> tile_offsets(const T* lse, int64_t n) {
  std::vector<T> off(lse, lse + n);
  for (T& v : off) {
    if (v == -std::numeric_limits<T>::infinity()) v = std::numeric_limits<T>::infinity();
  }
  return off;
}

}  // namespace

template <typename T>
void lse_bwd_impl(const LseBwdArgs<T>& a) {
  const int64_t N = a.N, M = a.M, D = a.D;
  const T s = static_cast<T>(a.scale);
  const bool classes = a.row_ids != nullptr;
  const bool dense_terms = a.grad_row != nullptr || a.grad_col != nullptr;
  const bool class_pos = classes && a.grad_pos != nullptr;
  const Operands<T>& op = a.op;

  if (dense_terms || class_pos) {
    const LseTileKernels<T> tk = lse_tile_kernels<T>();
    const Tiling tl = make_tiling(N, M);
    const TileGemms<T> gemms(op, M, D, tl, /*backward=*/true);
    const std::vector<T> row_off = a.grad_row ? tile_offsets(a.row_lse, N) : std::vector<T>();
    const std::vector<T> col_off = a.grad_col ? tile_offsets(a.col_lse, M) : std::vector<T>();
    const T ninf = -std::numeric_limits<T>::infinity();

    // Group 0 accumulates grad_keys in place (zeroed by the caller); the others into private
    // copies, which need no zeroing: the first block of the group writes every element once
    // (β = 0), the later ones add. Merged in group order at the end (tiling.h).
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
    at::Tensor tiles = at::empty({tl.tasks, tile_stride}, opts);
    at::Tensor dk_private = at::empty({tl.groups - 1, M * D}, opts);
    T* tiles_ptr = tiles.data_ptr<T>();
    T* dk_ptr = dk_private.data_ptr<T>();
    // Optional masks: per task a byte mask and, with a guide, its similarity tile (lse_masks.h).
    const PairMasks<T>& mk = a.masks;
    const bool masked = mk.active();
    const Designated des{a.labels, a.row_ids, a.col_ids};
    const int64_t mask_stride = aligned_stride<uint8_t>(tl.rows * tl.cols);
    const int64_t gsim_stride = aligned_stride<T>(tl.rows * tl.cols);
    at::Tensor mask_work =
        at::empty({masked ? tl.tasks : 0, mask_stride}, at::TensorOptions().dtype(at::kByte));
    at::Tensor gsim_work = at::empty({mk.guide() ? tl.tasks : 0, gsim_stride}, opts);
    uint8_t* mask_ptr = mask_work.data_ptr<uint8_t>();
    T* gsim_ptr = gsim_work.data_ptr<T>();
    auto group_dk = [&](int64_t g) { return g == 0 ? a.grad_k : dk_ptr + (g - 1) * M * D; };

    for_each_row_block(
        tl,
        [](int64_t /*slot*/, int64_t /*g*/) {},
        [&](int64_t slot, int64_t g, int64_t blk) {
          T* tile = tiles_ptr + slot * tile_stride;
          T* dk = group_dk(g);
          const T dk_beta = g > 0 && blk == tl.group_begin(g) ? T(0) : T(1);
          const int64_t i0 = blk * tl.rows;
          const int64_t ib = std::min(tl.rows, N - i0);
          uint8_t* mask = masked ? mask_ptr + slot * mask_stride : nullptr;
          T* gsim = mk.guide() ? gsim_ptr + slot * gsim_stride : nullptr;
          gemms.begin_block(slot, i0, ib);
          for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
            const int64_t jt = std::min(tl.cols, M - j0);
            // Excluded pairs of this tile (self pair included) when masks are given.
            const int64_t n_excluded =
                masked
                    ? build_tile_mask(mk, des, a.exclude_self, i0, ib, j0, jt, tl.cols, gsim, mask)
                    : 0;
            // Writes v into the excluded elements of the tile.
            auto set_excluded = [&](T v) {
              if (masked) {
                if (n_excluded) fill_masked(tile, ib, jt, tl.cols, mask, v);
                return;
              }
              for_each_self_pair(i0, ib, j0, jt,
                                 [&](int64_t r, int64_t c) { tile[r * tl.cols + c] = v; });
            };
            const bool any_excluded = masked ? n_excluded > 0 : a.exclude_self;
            if (dense_terms) {
              // Recompute the tile and turn it into the dense part of G in place. An excluded
              // logit is −inf first, so its weights are e^−inf = 0 rather than a possible overflow.
              gemms.logits(i0, ib, j0, jt, s, tile, tl.cols);
              if (any_excluded) set_excluded(ninf);
              tk.bwd(tile, ib, jt, tl.cols, a.grad_row ? row_off.data() + i0 : nullptr,
                     a.grad_row ? a.grad_row + i0 : nullptr,
                     a.grad_col ? col_off.data() + j0 : nullptr,
                     a.grad_col ? a.grad_col + j0 : nullptr);
            } else {
              // Class positives alone: G does not depend on S, no tile GEMM needed.
              for (int64_t i = 0; i < ib; ++i) {
                std::fill(tile + i * tl.cols, tile + i * tl.cols + jt, T(0));
              }
            }
            if (class_pos) {
              tk.pos_add(tile, ib, jt, tl.cols, a.row_ids + i0, a.col_ids + j0, a.grad_pos + i0);
            } else if (a.grad_pos) {
              // The label positive, where the tile holds (i, l_i): G_{i,l_i} += grad_pos_i.
              for (int64_t i = 0; i < ib; ++i) {
                const int64_t l = a.labels ? a.labels[i0 + i] : i0 + i;
                if (l >= j0 && l < j0 + jt) tile[i * tl.cols + (l - j0)] += a.grad_pos[i0 + i];
              }
            }
            // Exactly 0 on the excluded pairs, whatever the terms above wrote there.
            if (any_excluded) set_excluded(T(0));
            // dQ_blk += s·G·K_tile, dK_tile += s·Gᵀ·Q_blk, both from the tile while in cache.
            gemms.grads(slot, i0, ib, j0, jt, s, tile, tl.cols, a.grad_q, dk, dk_beta);
          }
        });
    merge_private_grad_keys(a.grad_k, dk_ptr, tl.groups - 1, M * D);
  }

  if (a.grad_pos != nullptr && !classes && !dense_terms) {
    // Only label positives: G has one entry per row, so skip the tiles, O(N·D). Serial, because
    // labels may repeat (several rows scattering into one row of grad_keys).
    for (int64_t i = 0; i < N; ++i) {
      const int64_t l = a.labels ? a.labels[i] : i;
      if (label_pair_excluded(a.masks, a.exclude_self, i, l)) continue;  // excluded: G = 0
      const T g = s * a.grad_pos[i];
      T* dq = a.grad_q + i * D;
      T* dk = a.grad_k + l * D;
      for (int64_t d = 0; d < D; ++d) {
        dq[d] += g * op.k(l * D + d);
        dk[d] += g * op.q(i * D + d);
      }
    }
  }
}

template void lse_bwd_impl<float>(const LseBwdArgs<float>&);
template void lse_bwd_impl<double>(const LseBwdArgs<double>&);

}  // namespace ck::cpu
