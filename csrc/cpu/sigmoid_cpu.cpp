// CPU kernels of ck_native::sigmoid_fwd / ck_native::sigmoid_bwd, the SigLIP loss (math.md §7;
// schema: csrc/ops.cpp): drivers, entry points and registration.
//
// With z_ij = +1 on positive pairs and −1 elsewhere, L_ij = S_ij + b and S = s·Q·Kᵀ:
//   row_loss_i = Σ_j softplus(−z_ij·L_ij)
//   G_ij = grad_row_i·(−z_ij)·σ(−z_ij·L_ij),  grad_query = s·G·K,  grad_keys = s·Gᵀ·Q,
//   grad_bias_row_i = Σ_j G_ij
// (the caller sums grad_bias_row for ∂L/∂b and gets ∂L/∂s from ⟨grad_query, Q⟩/s, O(N·D)).
// Positives: equal classes when row_classes/col_classes are given, else (i, i) when `diagonal`,
// else none (the negative-only blocks of distributed SigLIP).
//
// Same structure as the LSE kernels (tiling.h): per-task row blocks, one BLAS GEMM per tile into a
// core-local buffer, a vectorised element-wise pass (sigmoid_tiles.cpp), O((N+M)·D) memory. The
// forward is 2·N·M·D FLOPs; the backward recomputes each tile once and feeds both gradient GEMMs
// from it, 6·N·M·D. There is no column statistic, so no merge beyond grad_keys (per group,
// in group order: bitwise repeatable, tiling.h).

#include <torch/library.h>

#include <optional>
#include <tuple>

#include "problem.h"
#include "sigmoid_tiles.h"
#include "tile_gemm.h"

namespace ck::cpu {
namespace {

template <typename T>
void sigmoid_fwd_impl(const Operands<T>& op, int64_t N, int64_t M, int64_t D, double scale,
                      double bias, const int32_t* row_ids, const int32_t* col_ids, T* row_loss) {
  // row_loss arrives zeroed.
  const SigmoidTileKernels<T> tk = sigmoid_tile_kernels<T>();
  const Tiling tl = make_tiling(N, M);
  const TileGemms<T> gemms(op, M, D, tl, /*backward=*/false);
  const T alpha = static_cast<T>(scale), b = static_cast<T>(bias);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  at::Tensor tiles = at::empty({tl.tasks, tile_stride}, opts);
  T* tiles_ptr = tiles.data_ptr<T>();

  // Only row results: each row is summed by the one block that holds it, in column-tile order.
  for_each_row_block(
      tl, [](int64_t, int64_t) {},
      [&](int64_t slot, int64_t /*g*/, int64_t blk) {
        T* tile = tiles_ptr + slot * tile_stride;
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          gemms.logits(i0, ib, j0, jt, alpha, tile, tl.cols);
          tk.fwd(tile, ib, jt, tl.cols, b, row_ids ? row_ids + i0 : nullptr,
                 col_ids ? col_ids + j0 : nullptr, row_loss + i0);
        }
      });
}

template <typename T>
void sigmoid_bwd_impl(const Operands<T>& op, int64_t N, int64_t M, int64_t D, double scale,
                      double bias, const int32_t* row_ids, const int32_t* col_ids,
                      const T* grad_row, T* grad_q, T* grad_k, T* grad_bias) {
  // grad_q, grad_k, grad_bias arrive zeroed.
  const SigmoidTileKernels<T> tk = sigmoid_tile_kernels<T>();
  const Tiling tl = make_tiling(N, M);
  const TileGemms<T> gemms(op, M, D, tl, /*backward=*/true);
  const T s = static_cast<T>(scale), b = static_cast<T>(bias);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Group 0 accumulates grad_keys in place (zeroed by the caller); the others into private
  // copies, which need no zeroing: the first block of the group writes every element once
  // (β = 0), the later ones add. Merged in group order at the end (tiling.h).
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  at::Tensor tiles = at::empty({tl.tasks, tile_stride}, opts);
  at::Tensor dk_private = at::empty({tl.groups - 1, M * D}, opts);
  T* tiles_ptr = tiles.data_ptr<T>();
  T* dk_ptr = dk_private.data_ptr<T>();
  auto group_dk = [&](int64_t g) { return g == 0 ? grad_k : dk_ptr + (g - 1) * M * D; };

  for_each_row_block(
      tl,
      [](int64_t /*slot*/, int64_t /*g*/) {},
      [&](int64_t slot, int64_t g, int64_t blk) {
        T* tile = tiles_ptr + slot * tile_stride;
        T* dk = group_dk(g);
        const T dk_beta = g > 0 && blk == tl.group_begin(g) ? T(0) : T(1);
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        gemms.begin_block(slot, i0, ib);
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          // Recompute the tile (the same rounded S as the forward), turn it into G in place, then
          // both gradient GEMMs read it while it is still in cache.
          gemms.logits(i0, ib, j0, jt, s, tile, tl.cols);
          tk.bwd(tile, ib, jt, tl.cols, b, row_ids ? row_ids + i0 : nullptr,
                 col_ids ? col_ids + j0 : nullptr, grad_row + i0, grad_bias + i0);
          gemms.grads(slot, i0, ib, j0, jt, s, tile, tl.cols, grad_q, dk, dk_beta);
        }
      });
  merge_private_grad_keys(grad_k, dk_ptr, tl.groups - 1, M * D);
}

// Positive pairs as int32 ids: the classes, else the diagonal (ids 0..N−1 against 0..M−1), else
// none.
ClassIds positive_ids(const char* op, const std::optional<at::Tensor>& row_classes,
                      const std::optional<at::Tensor>& col_classes, bool diagonal,
                      const Problem& p) {
  ClassIds ids = check_classes(op, row_classes, col_classes, p);
  if (!ids.defined() && diagonal) ids = diagonal_ids(op, p);
  return ids;
}

at::Tensor sigmoid_fwd_cpu(const at::Tensor& query, const at::Tensor& keys,
                           const at::Tensor& scale, const at::Tensor& bias,
                           const std::optional<at::Tensor>& row_classes,
                           const std::optional<at::Tensor>& col_classes, bool diagonal) {
  static const char* op = "ck_native::sigmoid_fwd";
  const Problem p = check_problem(op, query, keys, scale);
  const double b = check_bias(op, bias, p);
  const ClassIds ids = positive_ids(op, row_classes, col_classes, diagonal, p);
  const TileInputs in = tile_inputs(query, keys, p.stat);
  at::Tensor row_loss = at::zeros({p.N}, query.options().dtype(p.stat));
  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    sigmoid_fwd_impl<T>(in.operands<T>(), p.N, p.M, p.D, p.scale, b,
                        ids.row_ptr(), ids.col_ptr(), row_loss.data_ptr<T>());
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_bwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const at::Tensor& bias, const std::optional<at::Tensor>& row_classes,
    const std::optional<at::Tensor>& col_classes, bool diagonal, const at::Tensor& grad_row) {
  static const char* op = "ck_native::sigmoid_bwd";
  const Problem p = check_problem(op, query, keys, scale);
  const double b = check_bias(op, bias, p);
  const ClassIds ids = positive_ids(op, row_classes, col_classes, diagonal, p);
  const at::Tensor gr = check_vector(op, "grad_row", grad_row, p.N, p.stat);
  const TileInputs in = tile_inputs(query, keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor grad_q = at::zeros({p.N, p.D}, opts);
  at::Tensor grad_k = at::zeros({p.M, p.D}, opts);
  at::Tensor grad_bias = at::zeros({p.N}, opts);
  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    sigmoid_bwd_impl<T>(in.operands<T>(), p.N, p.M, p.D, p.scale, b,
                        ids.row_ptr(), ids.col_ptr(), gr.data_ptr<T>(), grad_q.data_ptr<T>(),
                        grad_k.data_ptr<T>(), grad_bias.data_ptr<T>());
  });
  return {grad_q, grad_k, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ck_native, CPU, m) {
  m.impl("sigmoid_fwd", &sigmoid_fwd_cpu);
  m.impl("sigmoid_bwd", &sigmoid_bwd_cpu);
}

}  // namespace ck::cpu
