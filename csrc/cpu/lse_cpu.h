// The LSE kernels' drivers (lse_fwd_cpu.cpp, lse_bwd_cpu.cpp), called by the entry points in
// lse_cpu.cpp once the inputs are validated and in the statistic type T (float or double).
//
// Positives: with class ids (row_ids, col_ids non-null) P(i) = {j : ids equal, (i, j) not
// excluded}; otherwise the single pair (i, l_i), l_i = labels[i] or i when labels is null.
// Excluded set E = {(i, i) : i < min(N, M)} when exclude_self: such a pair enters nothing — no
// statistic, no positive, and its logit gradient is exactly 0. Under exclusion a label l_i = i
// names an excluded pair, so that row has no positive: pos_i = 0 and grad_pos_i is not applied.
// The optional masks (PairMasks, lse_masks.h) grow E by the same-group pairs
// (row_groups_i == col_groups_j) and the guided false negatives (⟨gq_i, gk_j⟩ > thr_i unless
// (i, j) is a designated positive: same class, or the labelled column l_i); an excluded pair is
// never a positive either, whichever rule excluded it.
#pragma once

#include <cstdint>

#include "tile_operands.h"

namespace ck::cpu {

// The optional exclusion masks of lse_fwd / lse_bwd, decided per tile (lse_masks.h): never an
// N×M mask in memory. All pointers nullptr when not given.
template <typename T>
struct PairMasks {
  const int64_t* row_groups = nullptr;  // (N,), with col_groups (M,): same group ⇒ excluded
  const int64_t* col_groups = nullptr;
  const T* guide_q = nullptr;    // (N, Dg), with guide_k (M, Dg) and guide_thr (N,)
  const T* guide_k = nullptr;
  const T* guide_thr = nullptr;
  int64_t Dg = 0;
  bool groups() const { return row_groups != nullptr; }
  bool guide() const { return guide_q != nullptr; }
  bool active() const { return groups() || guide(); }
};

template <typename T>
struct LseFwdArgs {
  Operands<T> op;  // Q (N, D) and K (M, D)
  int64_t N, M, D;
  double scale;
  const int64_t* labels;   // (N,) or nullptr
  const int32_t* row_ids;  // (N,) class ids, or nullptr
  const int32_t* col_ids;  // (M,) class ids, or nullptr
  bool exclude_self;
  T* row_lse;  // (N,)
  T* col_lse;  // (M,), or nullptr: no column statistic
  T* pos;      // (N,), zeroed by the caller
  PairMasks<T> masks;
  T* pos_count = nullptr;  // (N,), zeroed by the caller: |P(i)| counted in the tiles (classes
                           // with masks only; the caller counts it without tiles otherwise)
};

template <typename T>
struct LseBwdArgs {
  Operands<T> op;
  int64_t N, M, D;
  double scale;
  const int64_t* labels;
  const int32_t* row_ids;
  const int32_t* col_ids;
  bool exclude_self;
  const T* row_lse;   // read only when grad_row is given
  const T* col_lse;   // read only when grad_col is given
  const T* grad_row;  // (N,) or nullptr (zero)
  const T* grad_col;  // (M,) or nullptr
  const T* grad_pos;  // (N,) or nullptr
  T* grad_q;          // (N, D), zeroed by the caller
  T* grad_k;          // (M, D), zeroed by the caller
  PairMasks<T> masks;
};

template <typename T>
void lse_fwd_impl(const LseFwdArgs<T>& a);

template <typename T>
void lse_bwd_impl(const LseBwdArgs<T>& a);

// col_lse (M,) from `groups` per-group online column statistics (group g at col_stats + g·2·M: the
// running maxima (M,), then the sums (M,), as the forward tile pass leaves them), merged in group
// order: bitwise repeatable (tiling.h). Also the soft-target forward's (soft_xent_cpu.cpp).
template <typename T>
void merge_col_lse(const T* col_stats, int64_t groups, int64_t M, T* col_lse);

}  // namespace ck::cpu
