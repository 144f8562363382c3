// The LSE kernels' drivers (lse_fwd_cpu.cpp, lse_bwd_cpu.cpp), called by the entry points in
// lse_cpu.cpp once the inputs are validated and in the statistic type T (float or double).
//
// Positives: with class ids (row_ids, col_ids non-null) P(i) = {j : ids equal, (i, j) not
// excluded}; otherwise the single pair (i, l_i), l_i = labels[i] or i when labels is null.
// Excluded set E = {(i, i) : i < min(N, M)} when exclude_self: such a pair enters nothing — no
// statistic, no positive, and its logit gradient is exactly 0. Under exclusion a label l_i = i
// names an excluded pair, so that row has no positive: pos_i = 0 and grad_pos_i is not applied.
#pragma once

#include <cstdint>

namespace ck::cpu {

template <typename T>
struct LseFwdArgs {
  const T* Q;  // (N, D)
  const T* K;  // (M, D)
  int64_t N, M, D;
  double scale;
  const int64_t* labels;   // (N,) or nullptr
  const int32_t* row_ids;  // (N,) class ids, or nullptr
  const int32_t* col_ids;  // (M,) class ids, or nullptr
  bool exclude_self;
  T* row_lse;  // (N,)
  T* col_lse;  // (M,), or nullptr: no column statistic
  T* pos;      // (N,), zeroed by the caller
};

template <typename T>
struct LseBwdArgs {
  const T* Q;
  const T* K;
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
};

template <typename T>
void lse_fwd_impl(const LseFwdArgs<T>& a);

template <typename T>
void lse_bwd_impl(const LseBwdArgs<T>& a);

}  // namespace ck::cpu
