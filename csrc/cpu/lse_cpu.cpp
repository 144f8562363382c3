// CPU entry points of ck_native::lse_fwd / ck_native::lse_bwd (schema: csrc/ops.cpp, contract:
// docs/internals.md and lse_cpu.h): checks (problem.h), dtype handling, outputs, registration.
//
// The kernels never store the N×M logit matrix S = s·Q·Kᵀ: BLAS produces it one tile at a time into
// a per-thread buffer, a vectorised pass consumes it and it is dropped (tiling.h, lse_tiles.cpp;
// drivers in lse_fwd_cpu.cpp and lse_bwd_cpu.cpp). Memory is O((N+M)·D) beyond the inputs, and
// O((N+M)·Dg) more for the optional guide: its masks are decided per tile too (lse_masks.h).
//
// Speed, as measured on a shared 2-core AMD EPYC with AVX2 (no AVX-512, 512 KiB L2), torch 2.13
// with MKL, 2 threads, float32: the symmetric CLIP forward + backward at N = M = 8192, D = 256 ran
// at 8·N·M·D / time ≈ 114 GFLOP/s (1.21 s, median of 7), torch.mm of the same (8192×256)·(256×8192)
// product at 59 GFLOP/s (75 with a preallocated output). MKL is faster on tile-sized products
// (75 GFLOP/s per thread at 512×256×256 there, 46 on the full product), and the tile GEMMs run
// single-threaded per task, without MKL's threading; so the fused kernels are BLAS-bound yet beat
// the dense product's rate on that machine. Expect different ratios elsewhere.

#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "lse_cpu.h"
#include "problem.h"

namespace ck::cpu {
namespace {

template <typename T>
PairMasks<T> pair_masks(const MaskInputs& mi) {
  PairMasks<T> mk;
  if (mi.groups()) {
    mk.row_groups = mi.row_groups.data_ptr<int64_t>();
    mk.col_groups = mi.col_groups.data_ptr<int64_t>();
  }
  if (mi.guide()) {
    mk.guide_q = mi.guide_query.data_ptr<T>();
    mk.guide_k = mi.guide_keys.data_ptr<T>();
    mk.guide_thr = mi.guide_threshold.data_ptr<T>();
    mk.Dg = mi.Dg;
  }
  return mk;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_fwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_classes,
    const std::optional<at::Tensor>& col_classes, bool exclude_self, bool compute_col,
    const std::optional<at::Tensor>& row_groups, const std::optional<at::Tensor>& col_groups,
    const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
    const std::optional<at::Tensor>& guide_threshold) {
  static const char* op = "ck_native::lse_fwd";
  const Problem p = check_problem(op, query, keys, scale);
  const ClassIds ids = check_classes(op, row_classes, col_classes, p);
  const at::Tensor lab = check_labels(op, labels, p, ids.defined());
  const MaskInputs mi =
      check_masks(op, row_groups, col_groups, guide_query, guide_keys, guide_threshold, p);
  // With masks, |P(i)| depends on the pairs the masks remove: counted in the tiles.
  const bool tile_counts = ids.defined() && mi.active();
  const TileInputs in = tile_inputs(query, keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor row_lse = at::empty({p.N}, opts);
  at::Tensor col_lse = at::empty({compute_col ? p.M : 0}, opts);
  at::Tensor pos = at::zeros({p.N}, opts);
  at::Tensor pos_count = tile_counts ? at::zeros({p.N}, opts)
                                     : at::empty({ids.defined() ? p.N : 0}, opts);

  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    LseFwdArgs<T> args{in.operands<T>(), p.N, p.M, p.D, p.scale,
                       ptr_or_null<int64_t>(lab), ids.row_ptr(), ids.col_ptr(), exclude_self,
                       row_lse.data_ptr<T>(), compute_col ? col_lse.data_ptr<T>() : nullptr,
                       pos.data_ptr<T>()};
    args.masks = pair_masks<T>(mi);
    args.pos_count = tile_counts ? pos_count.data_ptr<T>() : nullptr;
    lse_fwd_impl<T>(args);
    if (ids.defined() && !tile_counts) {
      // |P(i)| needs no tile: the number of columns of row i's class, minus its own column when
      // that one is excluded and of the same class.
      const int32_t* rid = ids.row_ptr();
      const int32_t* cid = ids.col_ptr();
      std::vector<int64_t> per_class(ids.count, 0);
      for (int64_t j = 0; j < p.M; ++j) ++per_class[cid[j]];
      T* cnt = pos_count.data_ptr<T>();
      for (int64_t i = 0; i < p.N; ++i) {
        const bool self = exclude_self && i < p.M && cid[i] == rid[i];
        cnt[i] = static_cast<T>(per_class[rid[i]] - (self ? 1 : 0));
      }
    }
  });
  return {row_lse, col_lse, pos, pos_count};
}

std::tuple<at::Tensor, at::Tensor> lse_bwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_classes,
    const std::optional<at::Tensor>& col_classes, bool exclude_self, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const std::optional<at::Tensor>& grad_row,
    const std::optional<at::Tensor>& grad_col, const std::optional<at::Tensor>& grad_pos,
    const std::optional<at::Tensor>& row_groups, const std::optional<at::Tensor>& col_groups,
    const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
    const std::optional<at::Tensor>& guide_threshold) {
  static const char* op = "ck_native::lse_bwd";
  const Problem p = check_problem(op, query, keys, scale);
  const ClassIds ids = check_classes(op, row_classes, col_classes, p);
  const at::Tensor lab = check_labels(op, labels, p, ids.defined());
  const MaskInputs mi =
      check_masks(op, row_groups, col_groups, guide_query, guide_keys, guide_threshold, p);
  const at::Tensor gr = check_vector(op, "grad_row", grad_row, p.N, p.stat);
  const at::Tensor gc = check_vector(op, "grad_col", grad_col, p.M, p.stat);
  const at::Tensor gp = check_vector(op, "grad_pos", grad_pos, p.N, p.stat);
  // The statistics are read only for the terms that are present (col_lse may be empty otherwise).
  const at::Tensor rl = gr.defined() ? check_vector(op, "row_lse", row_lse, p.N, p.stat)
                                     : at::Tensor();
  const at::Tensor cl = gc.defined() ? check_vector(op, "col_lse", col_lse, p.M, p.stat)
                                     : at::Tensor();
  const TileInputs in = tile_inputs(query, keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor grad_q = at::zeros({p.N, p.D}, opts);
  at::Tensor grad_k = at::zeros({p.M, p.D}, opts);

  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    LseBwdArgs<T> args{in.operands<T>(), p.N, p.M, p.D, p.scale,
                       ptr_or_null<int64_t>(lab), ids.row_ptr(), ids.col_ptr(), exclude_self,
                       ptr_or_null<T>(rl), ptr_or_null<T>(cl), ptr_or_null<T>(gr),
                       ptr_or_null<T>(gc), ptr_or_null<T>(gp), grad_q.data_ptr<T>(),
                       grad_k.data_ptr<T>()};
    args.masks = pair_masks<T>(mi);
    lse_bwd_impl<T>(args);
  });
  return {grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(ck_native, CPU, m) {
  m.impl("lse_fwd", &lse_fwd_cpu);
  m.impl("lse_bwd", &lse_bwd_cpu);
}

}  // namespace ck::cpu
