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

#include <atomic>
#include <cmath>
#include <limits>

#include "lse_cpu.h"
#include "lse_tiles.h"
#include "tiling.h"

namespace ck::cpu {

template <typename T>
void lse_fwd_impl(const LseFwdArgs<T>& a) {
  const LseTileKernels<T> tk = lse_tile_kernels<T>();
  const int64_t N = a.N, M = a.M, D = a.D;
  const Tiling tl = make_tiling(N, M);
  const bool compute_col = a.col_lse != nullptr;
  const bool classes = a.row_ids != nullptr;
  const T alpha = static_cast<T>(a.scale);
  const T ninf = -std::numeric_limits<T>::infinity();

  // Per task: tile (rows×cols), row stats (2·rows), column scratch (cols), column stats (2·M).
  const int64_t per_task = tl.rows * tl.cols + 2 * tl.rows + tl.cols + (compute_col ? 2 * M : 0);
  const int64_t col_stats_at = tl.rows * tl.cols + 2 * tl.rows + tl.cols;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  T* work_ptr = work.data_ptr<T>();
  std::atomic<int64_t> next_block{0};

  run_tasks(tl.tasks, [&](int64_t slot) {
    T* tile = work_ptr + slot * per_task;
    T* rmax = tile + tl.rows * tl.cols;
    T* rsum = rmax + tl.rows;
    T* scratch = rsum + tl.rows;
    T* cmax = compute_col ? tile + col_stats_at : nullptr;
    T* csum = compute_col ? cmax + M : nullptr;
    if (compute_col) {
      std::fill(cmax, cmax + M, ninf);
      std::fill(csum, csum + M, T(0));
    }
    for (int64_t blk = next_block.fetch_add(1); blk < tl.blocks; blk = next_block.fetch_add(1)) {
      const int64_t i0 = blk * tl.rows;
      const int64_t ib = std::min(tl.rows, N - i0);
      std::fill(rmax, rmax + ib, ninf);
      std::fill(rsum, rsum + ib, T(0));
      for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
        const int64_t jt = std::min(tl.cols, M - j0);
        gemm<T>(false, true, ib, jt, D, alpha, a.Q + i0 * D, D, a.K + j0 * D, D, T(0), tile,
                tl.cols);
        if (classes) {
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
        // −inf: e^−inf = 0 exactly on every path and it never raises a max, so an excluded element
        // enters neither the row nor the column statistic.
        if (a.exclude_self) {
          for_each_self_pair(i0, ib, j0, jt,
                             [&](int64_t r, int64_t c) { tile[r * tl.cols + c] = ninf; });
        }
        tk.fwd(tile, ib, jt, tl.cols, rmax, rsum, compute_col ? cmax + j0 : nullptr,
               compute_col ? csum + j0 : nullptr, scratch);
      }
      // A row with nothing left (max −inf, sum 0) gets −inf + log 0 = −inf.
      for (int64_t i = 0; i < ib; ++i) {
        a.row_lse[i0 + i] =
            static_cast<T>(static_cast<double>(rmax[i]) + std::log(static_cast<double>(rsum[i])));
      }
    }
  });

  if (compute_col) {
    // Merge the per-task (max, sum) pairs of every column: a log-sum-exp of log-sum-exps.
    at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t t = 0; t < tl.tasks; ++t) {
          m = std::max(m, static_cast<double>(work_ptr[t * per_task + col_stats_at + j]));
        }
        double s = 0;
        for (int64_t t = 0; t < tl.tasks; ++t) {
          const T* cmax = work_ptr + t * per_task + col_stats_at;
          const T* csum = cmax + M;
          // Tasks that never saw column j (or saw only its excluded element) hold (−inf, 0);
          // `!= 0` skips them without evaluating exp(−inf − m), and keeps a NaN sum visible.
          if (csum[j] != 0) s += static_cast<double>(csum[j]) * std::exp(cmax[j] - m);
        }
        a.col_lse[j] = static_cast<T>(m + std::log(s));
      }
    });
  }
}

template void lse_fwd_impl<float>(const LseFwdArgs<float>&);
template void lse_fwd_impl<double>(const LseFwdArgs<double>&);

}  // namespace ck::cpu
