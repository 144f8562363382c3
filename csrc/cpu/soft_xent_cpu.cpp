// CPU kernels of the soft-target cross-entropy family: ck_native::soft_xent_fwd / soft_xent_bwd
// (schema: csrc/ops.cpp; contract: contrastive_kernels/backends/_soft_xent.py, docs/math.md §10).
//
// Two logit matrices over the same pairs: the student's S = s·Q·Kᵀ (Q (N, D), K (M, D)) and the
// teacher's T = t·A·Bᵀ (A (N, Dt), B (M, Dt)). Given the teacher's row / column log-sum-exp a, b:
//   row_cross_i = Σ_j p_ij·S_ij,  col_cross_j = Σ_i p'_ij·S_ij,  p = e^{T − a}, p' = e^{T − b};
//   row_lse_i = log Σ_j e^{S_ij},  col_lse_j = log Σ_i e^{S_ij}  (the student's, same sweep);
//   G^X_ij = g_i·p_ij + h_j·p'_ij,  G^L_ij = u_i·e^{S_ij − row_lse_i} + v_j·e^{S_ij − col_lse_j},
//   G^S = G^X + G^L,  G^T = G^X ⊙ S,
//   grad_query = s·G^S·K, grad_keys = s·G^Sᵀ·Q, grad_t_query = t·G^T·B, grad_t_keys = t·G^Tᵀ·A,
// for the upstream gradients g, h of the cross terms and u, v of the student's log-sum-exp.
//
// Same work split as every CPU kernel (tiling.h): per (row block, column tile) the logit tiles
// come from BLAS (alpha = the scale: each logit rounded once) into per-task buffers and are
// dropped, so memory is O((N + M)·(D + Dt)), never O(N·M). The element-wise passes are the LSE
// family's (lse_tiles.h, SIMD for float): its forward pass folds the S tile into the student's
// online (max, sum) statistics exactly as lse_fwd does (rows per block, columns per group merged
// in group order: merge_col_lse); its backward pass (row_w_i·e^{X − row_off_i} +
// col_w_j·e^{X − col_off_j}) gives p (and, on a copy of T, p') with weights 1 in the forward, and
// in the backward G^X from the teacher tile (weights g, h) and G^L from the student tile
// (weights u, v). Then
//   forward:  row_cross += Σ_c p·S per row (rows belong to the task running the block),
//             col_cross += Σ_r p'·S into one buffer per group;
//   backward: G^T = G^X ⊙ S (S in place, with the teacher's gradients), G^S = G^X + G^L;
//             dQ += s·G^S·K, dK += s·G^Sᵀ·Q, dA += t·G^T·B, dB += t·G^Tᵀ·A;
// and the per-group column results (col_cross, column statistics, dK, dB) are merged in group order
// at the end: bitwise repeatable at a fixed thread count (tiling.h). FLOPs: forward
// 2·N·M·(D + Dt), backward 6·N·M·D (+ 2·N·M·Dt with g or h, + 4·N·M·Dt more with the teacher's
// gradients): one recompute of each tile and one GEMM pair per model. Per task 2 tiles (3 in the
// forward with columns, and in the backward with the teacher's gradients and u or v: G^L then
// needs a copy of S). 16-bit inputs are converted once to float32 (float32 GEMMs and sums);
// float64 inputs run in float64 throughout.

#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "lse_cpu.h"
#include "lse_tiles.h"
#include "problem.h"
#include "tiling.h"

namespace ck::cpu {
namespace {

// The pair of problems in the statistic type T, validated.
template <typename T>
struct Pair {
  const T* Q;  // (N, D)
  const T* K;  // (M, D)
  const T* A;  // (N, Dt)
  const T* B;  // (M, Dt)
  int64_t N, M, D, Dt;
  T s, t;
  const T* a;  // teacher row log-sum-exp (N,), or nullptr where not read
  const T* b;  // teacher column log-sum-exp (M,), or nullptr where not read
};

// The student's logit tile of rows [i0, i0 + ib) × columns [j0, j0 + jt).
template <typename T>
void student_tile(const Pair<T>& p, int64_t i0, int64_t ib, int64_t j0, int64_t jt, T* S,
                  int64_t ld) {
  gemm<T>(false, true, ib, jt, p.D, p.s, p.Q + i0 * p.D, p.D, p.K + j0 * p.D, p.D, T(0), S, ld);
}

// The teacher's logit tile of the same pairs.
template <typename T>
void teacher_tile(const Pair<T>& p, int64_t i0, int64_t ib, int64_t j0, int64_t jt, T* Tt,
                  int64_t ld) {
  gemm<T>(false, true, ib, jt, p.Dt, p.t, p.A + i0 * p.Dt, p.Dt, p.B + j0 * p.Dt, p.Dt, T(0), Tt,
          ld);
}

// out[r] += Σ_c X[r, c]·Y[r, c]: 8 interleaved partial sums (not latency-bound), a fixed order.
template <typename T>
void add_row_dots(const T* X, const T* Y, int64_t rows, int64_t cols, int64_t ld, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = X + r * ld;
    const T* y = Y + r * ld;
    T acc[8] = {};
    int64_t c = 0;
    for (; c + 8 <= cols; c += 8) {
      for (int u = 0; u < 8; ++u) acc[u] += x[c + u] * y[c + u];
    }
    T tail = 0;
    for (; c < cols; ++c) tail += x[c] * y[c];
    out[r] += (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) +
              tail;
  }
}

// out[c] += Σ_r X[r, c]·Y[r, c], rows in ascending order.
template <typename T>
void add_col_dots(const T* X, const T* Y, int64_t rows, int64_t cols, int64_t ld, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = X + r * ld;
    const T* y = Y + r * ld;
    for (int64_t c = 0; c < cols; ++c) out[c] += x[c] * y[c];
  }
}

// Y[r, c] = op(Y[r, c], X[r, c]) over a rows×cols tile (element-wise, any order).
template <typename T, typename Op>
void combine_tiles(T* Y, const T* X, int64_t rows, int64_t cols, int64_t ld, Op op) {
  for (int64_t r = 0; r < rows; ++r) {
    T* y = Y + r * ld;
    const T* x = X + r * ld;
    for (int64_t c = 0; c < cols; ++c) y[c] = op(y[c], x[c]);
  }
}

// Outputs of the forward, all but col_cross / col_lse (nullptr: no columns) written in full.
template <typename T>
struct FwdOut {
  T* row_cross;  // (N,), zeroed
  T* col_cross;  // (M,), zeroed, or nullptr
  T* row_lse;    // (N,)
  T* col_lse;    // (M,), or nullptr
};

template <typename T>
void soft_xent_fwd_impl(const Pair<T>& p, const FwdOut<T>& o) {
  const LseTileKernels<T> tk = lse_tile_kernels<T>();
  const int64_t N = p.N, M = p.M;
  const Tiling tl = make_tiling(N, M);
  const int64_t ld = tl.cols;
  const bool cols = o.col_cross != nullptr;
  const T ninf = -std::numeric_limits<T>::infinity();
  // Per task: S, the teacher tile turned into p, with columns a copy turned into p', then the
  // student's running row statistics (2·rows) and the forward pass's column scratch (cols). Per
  // group: the student's column statistics (2·M: maxima, sums, as lse_fwd) and, but for the first
  // (which adds into col_cross), its column cross sums.
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  const int64_t n_tiles = cols ? 3 : 2;
  const int64_t per_task = n_tiles * tile_stride + aligned_stride<T>(2 * tl.rows + tl.cols);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  at::Tensor col_work = at::empty({cols ? tl.groups - 1 : 0, M}, opts);
  at::Tensor col_stats = at::empty({cols ? tl.groups : 0, 2 * M}, opts);
  T* work_ptr = work.data_ptr<T>();
  T* col_ptr = col_work.data_ptr<T>();
  T* stats_ptr = col_stats.data_ptr<T>();
  const std::vector<T> ones(std::max(tl.rows, tl.cols), T(1));
  auto group_col = [&](int64_t g) { return g == 0 ? o.col_cross : col_ptr + (g - 1) * M; };

  for_each_row_block(
      tl,
      [&](int64_t /*slot*/, int64_t g) {
        if (!cols) return;
        if (g > 0) std::fill(group_col(g), group_col(g) + M, T(0));
        T* cmax = stats_ptr + g * 2 * M;
        std::fill(cmax, cmax + M, ninf);
        std::fill(cmax + M, cmax + 2 * M, T(0));
      },
      [&](int64_t slot, int64_t g, int64_t blk) {
        T* S = work_ptr + slot * per_task;
        T* P = S + tile_stride;
        T* Pc = P + tile_stride;
        T* rmax = S + n_tiles * tile_stride;
        T* rsum = rmax + tl.rows;
        T* scratch = rsum + tl.rows;
        T* cmax = cols ? stats_ptr + g * 2 * M : nullptr;
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        std::fill(rmax, rmax + ib, ninf);
        std::fill(rsum, rsum + ib, T(0));
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          student_tile(p, i0, ib, j0, jt, S, ld);
          teacher_tile(p, i0, ib, j0, jt, P, ld);
          tk.fwd(S, ib, jt, ld, rmax, rsum, cols ? cmax + j0 : nullptr,
                 cols ? cmax + M + j0 : nullptr, scratch);
          if (cols) {
            for (int64_t r = 0; r < ib; ++r) std::memcpy(Pc + r * ld, P + r * ld, jt * sizeof(T));
            tk.bwd(Pc, ib, jt, ld, nullptr, nullptr, p.b + j0, ones.data());
            add_col_dots(Pc, S, ib, jt, ld, group_col(g) + j0);
          }
          tk.bwd(P, ib, jt, ld, p.a + i0, ones.data(), nullptr, nullptr);
          add_row_dots(P, S, ib, jt, ld, o.row_cross + i0);
        }
        for (int64_t i = 0; i < ib; ++i) {
          o.row_lse[i0 + i] = static_cast<T>(static_cast<double>(rmax[i]) +
                                             std::log(static_cast<double>(rsum[i])));
        }
      });
  if (cols) {
    merge_private_grad_keys(o.col_cross, col_ptr, tl.groups - 1, M);
    merge_col_lse(stats_ptr, tl.groups, M, o.col_lse);
  }
}

// The upstream gradients: nullptr for a zero one (then its statistic is not read).
template <typename T>
struct BwdUpstream {
  const T* row;      // g (N,): of row_cross; reads the teacher's a
  const T* col;      // h (M,): of col_cross; reads the teacher's b
  const T* row_lse;  // u (N,): of the student's row_lse; reads row_lse
  const T* col_lse;  // v (M,): of the student's col_lse; reads col_lse
  const T* lse_row;  // the student's row_lse (N,) where u is given
  const T* lse_col;  // the student's col_lse (M,) where v is given
};

// grad_q, grad_k (and grad_a, grad_b: nullptr without the teacher's gradients) arrive zeroed.
template <typename T>
void soft_xent_bwd_impl(const Pair<T>& p, const BwdUpstream<T>& up, T* grad_q, T* grad_k,
                        T* grad_a, T* grad_b) {
  const LseTileKernels<T> tk = lse_tile_kernels<T>();
  const int64_t N = p.N, M = p.M, D = p.D, Dt = p.Dt;
  const Tiling tl = make_tiling(N, M);
  const int64_t ld = tl.cols;
  const bool cross = up.row != nullptr || up.col != nullptr;        // G^X ≠ 0: the teacher tile
  const bool lse = up.row_lse != nullptr || up.col_lse != nullptr;  // G^L ≠ 0
  // Without g and h, G^T = 0: the teacher's gradients stay zero and T is never formed.
  const bool teacher = grad_a != nullptr && cross;
  // Per task: S (then G^L, or G^T with the teacher's gradients), the teacher tile (then G^X, then
  // G^S) and, when both G^T and G^L are needed, a copy of S turned into G^L. Per group but the
  // first: private grad_keys / grad_t_keys, written with β = 0 by the group's first block.
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  const bool copy_s = teacher && lse;
  const int64_t per_task = (1 + cross + copy_s) * tile_stride;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  at::Tensor dk_private = at::empty({tl.groups - 1, M * D}, opts);
  at::Tensor db_private = at::empty({teacher ? tl.groups - 1 : 0, M * Dt}, opts);
  T* work_ptr = work.data_ptr<T>();
  T* dk_ptr = dk_private.data_ptr<T>();
  T* db_ptr = db_private.data_ptr<T>();

  for_each_row_block(
      tl, [](int64_t /*slot*/, int64_t /*g*/) {},
      [&](int64_t slot, int64_t g, int64_t blk) {
        T* S = work_ptr + slot * per_task;
        T* X = cross ? S + tile_stride : nullptr;
        T* L = copy_s ? S + 2 * tile_stride : S;
        T* dk = g == 0 ? grad_k : dk_ptr + (g - 1) * M * D;
        T* db = !teacher ? nullptr : g == 0 ? grad_b : db_ptr + (g - 1) * M * Dt;
        const T beta = g > 0 && blk == tl.group_begin(g) ? T(0) : T(1);
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          student_tile(p, i0, ib, j0, jt, S, ld);
          if (cross) {
            teacher_tile(p, i0, ib, j0, jt, X, ld);
            tk.bwd(X, ib, jt, ld, up.row ? p.a + i0 : nullptr, up.row ? up.row + i0 : nullptr,
                   up.col ? p.b + j0 : nullptr, up.col ? up.col + j0 : nullptr);
          }
          if (lse) {
            if (copy_s) {
              for (int64_t r = 0; r < ib; ++r) std::memcpy(L + r * ld, S + r * ld, jt * sizeof(T));
            }
            tk.bwd(L, ib, jt, ld, up.row_lse ? up.lse_row + i0 : nullptr,
                   up.row_lse ? up.row_lse + i0 : nullptr, up.col_lse ? up.lse_col + j0 : nullptr,
                   up.col_lse ? up.col_lse + j0 : nullptr);
          }
          if (teacher) combine_tiles(S, X, ib, jt, ld, [](T s, T x) { return s * x; });  // G^T
          if (cross && lse) combine_tiles(X, L, ib, jt, ld, [](T x, T l) { return x + l; });
          const T* G = cross ? X : L;  // G^S
          gemm<T>(false, false, ib, D, jt, p.s, G, ld, p.K + j0 * D, D, T(1), grad_q + i0 * D, D);
          gemm<T>(true, false, jt, D, ib, p.s, G, ld, p.Q + i0 * D, D, beta, dk + j0 * D, D);
          if (!teacher) continue;
          gemm<T>(false, false, ib, Dt, jt, p.t, S, ld, p.B + j0 * Dt, Dt, T(1), grad_a + i0 * Dt,
                  Dt);
          gemm<T>(true, false, jt, Dt, ib, p.t, S, ld, p.A + i0 * Dt, Dt, beta, db + j0 * Dt, Dt);
        }
      });
  merge_private_grad_keys(grad_k, dk_ptr, tl.groups - 1, M * D);
  if (teacher) merge_private_grad_keys(grad_b, db_ptr, tl.groups - 1, M * Dt);
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

// The teacher's inputs, validated against the student's problem and converted to its statistic
// dtype: t_query (N, Dt), t_keys (M, Dt) contiguous CPU tensors of one dtype ∈ {float64, float32,
// bfloat16, float16} (it may differ from the student's), Dt ≥ 1; t_scale a one-element CPU tensor
// in the student's statistic dtype, finite and > 0.
struct Teacher {
  at::Tensor A, B;
  int64_t Dt;
  double t;
};

Teacher check_teacher(const char* op, const at::Tensor& t_query, const at::Tensor& t_keys,
                      const at::Tensor& t_scale, const Problem& p) {
  TORCH_CHECK(t_query.device().is_cpu() && t_keys.device().is_cpu(), op,
              ": t_query and t_keys must be CPU tensors, got ", t_query.device(), " and ",
              t_keys.device());
  TORCH_CHECK(t_query.dim() == 2 && t_keys.dim() == 2 && t_query.size(0) == p.N &&
                  t_keys.size(0) == p.M && t_query.size(1) == t_keys.size(1) &&
                  t_query.size(1) >= 1,
              op, ": t_query and t_keys must have shapes (N, Dt) and (M, Dt) with N=", p.N,
              ", M=", p.M, ", Dt >= 1, got ", t_query.sizes(), " and ", t_keys.sizes());
  const auto dt = t_query.scalar_type();
  TORCH_CHECK(dt == t_keys.scalar_type() &&
                  (dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf),
              op, ": t_query and t_keys must have one dtype, float64, float32, bfloat16 or ",
              "float16, got ", dt, " and ", t_keys.scalar_type());
  TORCH_CHECK(t_query.is_contiguous() && t_keys.is_contiguous(), op,
              ": t_query and t_keys must be contiguous, got strides ", t_query.strides(), " and ",
              t_keys.strides());
  TORCH_CHECK(t_scale.numel() == 1 && t_scale.scalar_type() == p.stat && t_scale.device().is_cpu(),
              op, ": t_scale must be a one-element ", p.stat,
              " CPU tensor (the statistic dtype of the student's inputs), got shape ",
              t_scale.sizes(), ", dtype ", t_scale.scalar_type(), ", device ", t_scale.device());
  const double t = t_scale.item<double>();
  TORCH_CHECK(std::isfinite(t) && t > 0, op, ": t_scale must be finite and > 0, got ", t);
  return {as_stat(t_query, p.stat), as_stat(t_keys, p.stat), t_query.size(1), t};
}

// A statistic, validated where it is read (t_col_lse and col_lse are (0,) without columns), else
// undefined.
at::Tensor stat_read(const char* op, bool read, const char* name, const at::Tensor& lse,
                     int64_t len, const Problem& p) {
  return read ? check_vector(op, name, lse, len, p.stat) : at::Tensor();
}

template <typename T>
Pair<T> pair_of(const Problem& p, const at::Tensor& q, const at::Tensor& k, const Teacher& tc,
                  const at::Tensor& a, const at::Tensor& b) {
  return Pair<T>{q.data_ptr<T>(), k.data_ptr<T>(), tc.A.data_ptr<T>(), tc.B.data_ptr<T>(),
                 p.N, p.M, p.D, tc.Dt, static_cast<T>(p.scale), static_cast<T>(tc.t),
                 ptr_or_null<T>(a), ptr_or_null<T>(b)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_xent_fwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const at::Tensor& t_query, const at::Tensor& t_keys, const at::Tensor& t_scale,
    const at::Tensor& t_row_lse, const at::Tensor& t_col_lse, bool compute_col) {
  static const char* op = "ck_native::soft_xent_fwd";
  const Problem p = check_problem(op, query, keys, scale);
  const Teacher tc = check_teacher(op, t_query, t_keys, t_scale, p);
  const at::Tensor a = stat_read(op, true, "t_row_lse", t_row_lse, p.N, p);
  const at::Tensor b = stat_read(op, compute_col, "t_col_lse", t_col_lse, p.M, p);
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  const int64_t m = compute_col ? p.M : 0;
  at::Tensor row_cross = at::zeros({p.N}, opts), col_cross = at::zeros({m}, opts);
  at::Tensor row_lse = at::empty({p.N}, opts), col_lse = at::empty({m}, opts);
  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    const FwdOut<T> out{row_cross.data_ptr<T>(), compute_col ? col_cross.data_ptr<T>() : nullptr,
                        row_lse.data_ptr<T>(), compute_col ? col_lse.data_ptr<T>() : nullptr};
    soft_xent_fwd_impl<T>(pair_of<T>(p, q, k, tc, a, b), out);
  });
  return {row_cross, col_cross, row_lse, col_lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_xent_bwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const at::Tensor& t_query, const at::Tensor& t_keys, const at::Tensor& t_scale,
    const at::Tensor& t_row_lse, const at::Tensor& t_col_lse, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const std::optional<at::Tensor>& grad_row,
    const std::optional<at::Tensor>& grad_col, const std::optional<at::Tensor>& grad_row_lse,
    const std::optional<at::Tensor>& grad_col_lse, bool teacher_grad) {
  static const char* op = "ck_native::soft_xent_bwd";
  const Problem p = check_problem(op, query, keys, scale);
  const Teacher tc = check_teacher(op, t_query, t_keys, t_scale, p);
  const at::Tensor gr = check_vector(op, "grad_row", grad_row, p.N, p.stat);
  const at::Tensor gc = check_vector(op, "grad_col", grad_col, p.M, p.stat);
  const at::Tensor ur = check_vector(op, "grad_row_lse", grad_row_lse, p.N, p.stat);
  const at::Tensor vc = check_vector(op, "grad_col_lse", grad_col_lse, p.M, p.stat);
  const at::Tensor a = stat_read(op, gr.defined(), "t_row_lse", t_row_lse, p.N, p);
  const at::Tensor b = stat_read(op, gc.defined(), "t_col_lse", t_col_lse, p.M, p);
  const at::Tensor lr = stat_read(op, ur.defined(), "row_lse", row_lse, p.N, p);
  const at::Tensor lc = stat_read(op, vc.defined(), "col_lse", col_lse, p.M, p);
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor grad_q = at::zeros({p.N, p.D}, opts);
  at::Tensor grad_k = at::zeros({p.M, p.D}, opts);
  at::Tensor grad_a = teacher_grad ? at::zeros({p.N, tc.Dt}, opts) : at::empty({0}, opts);
  at::Tensor grad_b = teacher_grad ? at::zeros({p.M, tc.Dt}, opts) : at::empty({0}, opts);
  if (!gr.defined() && !gc.defined() && !ur.defined() && !vc.defined()) {
    return {grad_q, grad_k, grad_a, grad_b};  // G = 0
  }
  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    const BwdUpstream<T> up{ptr_or_null<T>(gr), ptr_or_null<T>(gc), ptr_or_null<T>(ur),
                            ptr_or_null<T>(vc), ptr_or_null<T>(lr), ptr_or_null<T>(lc)};
    soft_xent_bwd_impl<T>(pair_of<T>(p, q, k, tc, a, b), up, grad_q.data_ptr<T>(),
                          grad_k.data_ptr<T>(), teacher_grad ? grad_a.data_ptr<T>() : nullptr,
                          teacher_grad ? grad_b.data_ptr<T>() : nullptr);
  });
  return {grad_q, grad_k, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(ck_native, CPU, m) {
  m.impl("soft_xent_fwd", &soft_xent_fwd_cpu);
  m.impl("soft_xent_bwd", &soft_xent_bwd_cpu);
}

}  // namespace ck::cpu
