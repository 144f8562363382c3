"""The soft-target cross-entropy op family (docs/math.md §10): distillation from a teacher's
logits into a student's, tile by tile, one autograd site.

``soft_xent_fwd`` returns ``row_cross_i = Σ_j softmax_j(T)_ij·S_ij`` and (``compute_col``)
``col_cross_j = Σ_i softmax_i(T)_ij·S_ij`` for the student ``S = scale·query·keysᵀ`` and the teacher
``T = t_scale·t_query·t_keysᵀ``, given the teacher's row / column log-sum-exp (``t_row_lse``,
``t_col_lse``: the log-sum-exp op's statistics, differentiable inputs), and from the same sweep the
student's own row / column log-sum-exp (``row_lse``, ``col_lse``), so that the soft-target
cross-entropy of a row is ``row_lse − row_cross`` and the contrastive loss needs no sweep of its
own. ``soft_xent_bwd`` returns the student's and (``teacher_grad``) the teacher's feature gradients
for the upstream gradients of all four statistics; the autograd site adds the scale gradients and
the gradients of ``t_row_lse`` / ``t_col_lse`` (``−grad·cross``), through which the log-sum-exp op
completes the teacher's softmax derivative.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._types import stat_dtype
from ..backends import implementation
from ._autocast import no_autocast

__all__ = ["soft_xent_fwd", "soft_xent_bwd"]


@torch.library.custom_op("contrastive_kernels::soft_xent_fwd", mutates_args=())
def soft_xent_fwd(query: Tensor, keys: Tensor, scale: Tensor, t_query: Tensor, t_keys: Tensor,
                  t_scale: Tensor, t_row_lse: Tensor, t_col_lse: Tensor, compute_col: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_cross (N,), col_cross (M,) or (0,), row_lse (N,), col_lse (M,) or (0,)) in the
    statistic dtype: the cross terms and the student's log-sum-exp, one sweep."""
    fwd, _ = implementation(backend, "soft_xent")
    with no_autocast(query.device):
        return tuple(fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse,
                         compute_col))


@soft_xent_fwd.register_fake
def _soft_xent_fwd_fake(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse,
                        compute_col, backend):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0] if compute_col else 0
    return (query.new_empty(n, dtype=st), query.new_empty(m, dtype=st),
            query.new_empty(n, dtype=st), query.new_empty(m, dtype=st))


@torch.library.custom_op("contrastive_kernels::soft_xent_bwd", mutates_args=())
def soft_xent_bwd(query: Tensor, keys: Tensor, scale: Tensor, t_query: Tensor, t_keys: Tensor,
                  t_scale: Tensor, t_row_lse: Tensor, t_col_lse: Tensor, row_lse: Tensor,
                  col_lse: Tensor, grad_row: Optional[Tensor], grad_col: Optional[Tensor],
                  grad_row_lse: Optional[Tensor], grad_col_lse: Optional[Tensor],
                  teacher_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_query, grad_keys, grad_t_query, grad_t_keys) in the statistic dtype; the teacher's
    are (0,) unless ``teacher_grad``."""
    _, bwd = implementation(backend, "soft_xent")
    with no_autocast(query.device):
        return tuple(bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse,
                         row_lse, col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse,
                         teacher_grad))


@soft_xent_bwd.register_fake
def _soft_xent_bwd_fake(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse,
                        row_lse, col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse,
                        teacher_grad, backend):
    st = stat_dtype(query.dtype)
    empty = query.new_empty(0, dtype=st)
    return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
            t_query.new_empty(t_query.shape, dtype=st) if teacher_grad else empty,
            t_keys.new_empty(t_keys.shape, dtype=st) if teacher_grad else empty)


def _setup(ctx, inputs, output):
    (query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col,
     backend) = inputs
    row_cross, col_cross, row_lse, col_lse = output
    ctx.save_for_backward(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse,
                          row_cross, col_cross, row_lse, col_lse)
    ctx.compute_col, ctx.backend = compute_col, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_row, grad_col, grad_row_lse, grad_col_lse):
    (query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_cross, col_cross,
     row_lse, col_lse) = ctx.saved_tensors
    need = ctx.needs_input_grad
    if not ctx.compute_col:
        grad_col = grad_col_lse = None
    upstream = (grad_row, grad_col, grad_row_lse, grad_col_lse)
    if all(g is None for g in upstream):
        return (None,) * 10
    st = row_cross.dtype
    grad_row, grad_col, grad_row_lse, grad_col_lse = (
        None if g is None else g.to(st).contiguous() for g in upstream)
    teacher = bool(need[3] or need[4] or need[5])
    grad_q, grad_k, grad_a, grad_b = soft_xent_bwd(
        query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse, col_lse,
        grad_row, grad_col, grad_row_lse, grad_col_lse, teacher, ctx.backend)
    out = [None] * 10
    if need[0]:
        out[0] = grad_q.to(query.dtype)
    if need[1]:
        out[1] = grad_k.to(keys.dtype)
    if need[2]:  # S is linear in scale: Σ_ij G^S_ij·S_ij / s = Σ_i ⟨grad_q_i, q_i⟩ / s
        out[2] = ((grad_q * query.to(st)).sum() / scale.to(st)).to(scale.dtype).reshape(scale.shape)
    if teacher:
        out[3] = grad_a.to(t_query.dtype) if need[3] else None
        out[4] = grad_b.to(t_keys.dtype) if need[4] else None
        if need[5]:
            out[5] = ((grad_a * t_query.to(st)).sum() / t_scale.to(st)).to(
                t_scale.dtype).reshape(t_scale.shape)
    # ∂row_cross_i/∂a_i = −row_cross_i (Σ_j p_ij·S_ij·(−1)); likewise the columns
    if need[6] and grad_row is not None:
        out[6] = (-grad_row * row_cross).to(t_row_lse.dtype)
    if need[7] and grad_col is not None:
        out[7] = (-grad_col * col_cross).to(t_col_lse.dtype)
    return tuple(out)


soft_xent_fwd.register_autograd(_backward, setup_context=_setup)
