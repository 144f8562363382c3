// Forward of the LSE family: row (and optionally column) log-sum-exp of S = s·Q·Kᵀ and the
// positive logits, in one sweep over tiles (contract: lse_cpu.h; work split: tiling.h).
//
// FLOPs: one GEMM per tile, 2·N·M·D in total. Per tile element, besides the GEMM: the two shifted
// exponentials of lse_tiles.cpp and, with classes, one compare. Self-exclusion and label positives
// touch O(rows) elements per tile, so the plain path's inner loops are those of the version
// without them.
//
// Every statistic reads the same rounded tile element S_ij = fl(s·⟨q_i, k_j⟩) (s is the GEMM's
// alpha, so S is rounded once): the positive logit enters `pos` with exactly the bits the row's
// log-sum-exp saw, and since the element holding the row max contributes exactly 1 to the row sum,
// row_lse_i ≥ pos_i holds in floating point for a single positive.
//
// With the optional masks (groups, guide: lse_masks.h) every tile gets a byte mask of its excluded
// pairs (self pair included); the excluded elements read 0 in the class sums and −inf in the
// statistics, exactly as self-exclusion alone does without masks, and with classes the positives
// are counted in the same pass (pos_count), since the masks remove positives.

#include <cmath>
#include <limits>

#include <vector>

#include "lse_cpu.h"
#include "lse_masks.h"
#include "lse_tiles.h"
#include "tile_gemm.h"

namespace ck::cpu {

template <typename T>
void lse_fwd_impl(const LseFwdArgs<T>& a) {
  const LseTileKernels<T> tk = lse_tile_kernels<T>();
  const int64_t N = a.N, M = a.M, D = a.D;
  const Tiling tl = make_tiling(N, M);
  const TileGemms<T> gemms(a.op, M, D, tl, /*backward=*/false);
  const bool compute_col = a.col_lse != nullptr;
  const bool classes = a.row_ids != nullptr;
  const T alpha = static_cast<T>(a.scale);
  const T ninf = -std::numeric_limits<T>::infinity();

  // Per task (slot): tile (rows×cols), row stats (2·rows), column scratch (cols), at a 64-byte
  // aligned stride. Per group: column stats (2·M), so that a column's partial sums depend on the
  // group's blocks only, never on which task ran them (tiling.h).
  const int64_t per_task = aligned_stride<T>(tl.rows * tl.cols + 2 * tl.rows + tl.cols);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  at::Tensor col_work = at::empty({compute_col ? tl.groups : 0, 2 * M}, opts);
  T* work_ptr = work.data_ptr<T>();
  T* col_ptr = col_work.data_ptr<T>();
  // Optional masks: a byte mask per task, and with a guide its similarity tile per task.
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
  const bool count_pos = a.pos_count != nullptr;

  for_each_row_block(
      tl,
      [&](int64_t /*slot*/, int64_t g) {
        if (compute_col) {
          T* cmax = col_ptr + g * 2 * M;
          std::fill(cmax, cmax + M, ninf);
          std::fill(cmax + M, cmax + 2 * M, T(0));
        }
      },
      [&](int64_t slot, int64_t g, int64_t blk) {
        T* tile = work_ptr + slot * per_task;
        T* rmax = tile + tl.rows * tl.cols;
        T* rsum = rmax + tl.rows;
        T* scratch = rsum + tl.rows;
        T* cmax = compute_col ? col_ptr + g * 2 * M : nullptr;
        T* csum = compute_col ? cmax + M : nullptr;
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        uint8_t* mask = masked ? mask_ptr + slot * mask_stride : nullptr;
        T* gsim = mk.guide() ? gsim_ptr + slot * gsim_stride : nullptr;
        std::vector<int64_t> counts(count_pos ? ib : 0, 0);
        std::fill(rmax, rmax + ib, ninf);
        std::fill(rsum, rsum + ib, T(0));
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          gemms.logits(i0, ib, j0, jt, alpha, tile, tl.cols);
          // Excluded pairs of this tile (self pair included) when masks are given.
          const int64_t n_excluded =
              masked ? build_tile_mask(mk, des, a.exclude_self, i0, ib, j0, jt, tl.cols, gsim, mask)
                     : 0;
          if (masked && classes) {
            if (n_excluded) fill_masked(tile, ib, jt, tl.cols, mask, T(0));
            tk.pos_sum(tile, ib, jt, tl.cols, a.row_ids + i0, a.col_ids + j0, a.pos + i0);
            if (count_pos) {
              for (int64_t i = 0; i < ib; ++i) {
                const int32_t ri = a.row_ids[i0 + i];
                const int32_t* cid = a.col_ids + j0;
                const uint8_t* m = mask + i * tl.cols;
                int64_t n = 0;
                for (int64_t c = 0; c < jt; ++c) n += (cid[c] == ri) & (m[c] == 0);
                counts[i] += n;
              }
            }
          } else if (masked) {
            for (int64_t i = 0; i < ib; ++i) {
              const int64_t l = a.labels ? a.labels[i0 + i] : i0 + i;
              if (l >= j0 && l < j0 + jt && !mask[i * tl.cols + (l - j0)]) {
                a.pos[i0 + i] = tile[i * tl.cols + (l - j0)];
              }
            }
          } else if (classes) {
            // Excluded elements read as 0 in the class sum (adding 0 is exact), then −inf below.
            if (a.exclude_self) {
              for_each_self_pair(i0, ib, j0, jt,
                                 [&](int64_t r, int64_t c) { tile[r * tl.cols + c] = T(0); });
            }
            tk.pos_sum(tile, ib, jt, tl.cols, a.row_ids + i0, a.col_ids + j0, a.pos + i0);
          } else {
            // The positive logit is read from the tile that holds it (pos stays 0 if excluded).
            for (int64_t i = 0; i < ib; ++i) {
              const int64_t l = a.labels ? a.labels[i0 + i] : i0 + i;
              if (l >= j0 && l < j0 + jt && !(a.exclude_self && l == i0 + i)) {
                a.pos[i0 + i] = tile[i * tl.cols + (l - j0)];
              }
            }
          }
          // −inf: e^−inf = 0 exactly on every path and it never raises a max, so an excluded
          // element enters neither the row nor the column statistic.
          if (masked) {
            if (n_excluded) fill_masked(tile, ib, jt, tl.cols, mask, ninf);
          } else if (a.exclude_self) {
            for_each_self_pair(i0, ib, j0, jt,
                               [&](int64_t r, int64_t c) { tile[r * tl.cols + c] = ninf; });
          }
          tk.fwd(tile, ib, jt, tl.cols, rmax, rsum, compute_col ? cmax + j0 : nullptr,
                 compute_col ? csum + j0 : nullptr, scratch);
        }
        // A row with nothing left (max −inf, sum 0) gets −inf + log 0 = −inf.
        for (int64_t i = 0; i < ib; ++i) {
          a.row_lse[i0 + i] = static_cast<T>(static_cast<double>(rmax[i]) +
                                             std::log(static_cast<double>(rsum[i])));
        }
        for (int64_t i = 0; i < (count_pos ? ib : 0); ++i) {
          a.pos_count[i0 + i] = static_cast<T>(counts[i]);
        }
      });

  if (compute_col) merge_col_lse(col_ptr, tl.groups, M, a.col_lse);
}

template <typename T>
void merge_col_lse(const T* col_stats, int64_t groups, int64_t M, T* col_lse) {
  // Merge the per-group (max, sum) pairs of every column, in group order (a fixed summation
  // order, tiling.h): a log-sum-exp of log-sum-exps.
  at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t g = 0; g < groups; ++g) {
        m = std::max(m, static_cast<double>(col_stats[g * 2 * M + j]));
      }
      double s = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const T* cmax = col_stats + g * 2 * M;
        const T* csum = cmax + M;
        // Groups whose rows only saw column j's excluded element hold (−inf, 0);
        // `!= 0` skips them without evaluating exp(−inf − m), and keeps a NaN sum visible.
        if (csum[j] != 0) s += static_cast<double>(csum[j]) * std::exp(cmax[j] - m);
      }
      col_lse[j] = static_cast<T>(m + std::log(s));
    }
  });
}

template void lse_fwd_impl<float>(const LseFwdArgs<float>&);
template void lse_fwd_impl<double>(const LseFwdArgs<double>&);
template void merge_col_lse<float>(const float*, int64_t, int64_t, float*);
template void merge_col_lse<double>(const double*, int64_t, int64_t, double*);

}  // namespace ck::cpu
