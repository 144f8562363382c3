"""The prefix (Matryoshka) op families (docs/math.md §9): every prefix dimension's statistics from
one sweep over the tiles, one autograd site per family.

``lse_prefix_fwd`` returns, for prefix dimensions ``dims = (d_1 < … < d_k)``, the statistics of the
log-sum-exp op (``ops/lse.py``) of every ``S^t = scale·r_t·c_tᵀ ⊙ (Q[:, :d_t]·K[:, :d_t]ᵀ)``, stacked
(k, ·); ``sigmoid_prefix_fwd`` the sigmoid op's per-row sums of every prefix. ``row_scale`` (N, k)
and ``col_scale`` (M, k) are optional per-row/per-column factors — the inverse prefix norms, for
cosine similarity at every prefix — that autograd differentiates: the backward ops return
``Σ_j G^t_ij·S^t_ij`` per row and ``Σ_i G^t_ij·S^t_ij`` per column, and since S^t is linear in
``r``, ``c`` and ``scale`` those give all three gradients in O((N + M)·k).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._types import stat_dtype
from ..backends import implementation
from ._autocast import no_autocast
from .lse import _masks

__all__ = ["lse_prefix_fwd", "lse_prefix_bwd", "sigmoid_prefix_fwd", "sigmoid_prefix_bwd"]


@torch.library.custom_op("contrastive_kernels::lse_prefix_fwd", mutates_args=())
def lse_prefix_fwd(query: Tensor, keys: Tensor, scale: Tensor, dims: list[int],
                   row_scale: Optional[Tensor], col_scale: Optional[Tensor],
                   labels: Optional[Tensor], row_classes: Optional[Tensor],
                   col_classes: Optional[Tensor], exclude_self: bool, compute_col: bool,
                   backend: str, row_groups: Optional[Tensor] = None,
                   col_groups: Optional[Tensor] = None, guide_query: Optional[Tensor] = None,
                   guide_keys: Optional[Tensor] = None,
                   guide_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_lse (k, N), col_lse (k, M) or (k, 0), pos (k, N), pos_count (N,) or (0,)); the
    exclusion masks as in ``lse_fwd``, the same at every prefix."""
    fwd, _ = implementation(backend, "lse_prefix")
    with no_autocast(query.device):
        return tuple(fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                         col_classes, exclude_self, compute_col,
                         **_masks(row_groups, col_groups, guide_query, guide_keys, guide_threshold)))


@lse_prefix_fwd.register_fake
def _lse_prefix_fwd_fake(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                         col_classes, exclude_self, compute_col, backend, row_groups=None,
                         col_groups=None, guide_query=None, guide_keys=None, guide_threshold=None):
    st = stat_dtype(query.dtype)
    n, m, k = query.shape[0], keys.shape[0], len(dims)
    return (query.new_empty(k, n, dtype=st), query.new_empty(k, m if compute_col else 0, dtype=st),
            query.new_empty(k, n, dtype=st),
            query.new_empty(n if row_classes is not None else 0, dtype=st))


@torch.library.custom_op("contrastive_kernels::lse_prefix_bwd", mutates_args=())
def lse_prefix_bwd(query: Tensor, keys: Tensor, scale: Tensor, dims: list[int],
                   row_scale: Optional[Tensor], col_scale: Optional[Tensor],
                   labels: Optional[Tensor], row_classes: Optional[Tensor],
                   col_classes: Optional[Tensor], exclude_self: bool, row_lse: Tensor,
                   col_lse: Tensor, grad_row: Optional[Tensor], grad_col: Optional[Tensor],
                   grad_pos: Optional[Tensor], backend: str, row_groups: Optional[Tensor] = None,
                   col_groups: Optional[Tensor] = None, guide_query: Optional[Tensor] = None,
                   guide_keys: Optional[Tensor] = None,
                   guide_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_query (N, D), grad_keys (M, D), row_dot (k, N), col_dot (k, M))."""
    _, bwd = implementation(backend, "lse_prefix")
    with no_autocast(query.device):
        return tuple(bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                         col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                         **_masks(row_groups, col_groups, guide_query, guide_keys, guide_threshold)))


@lse_prefix_bwd.register_fake
def _lse_prefix_bwd_fake(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                         col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                         backend, row_groups=None, col_groups=None, guide_query=None,
                         guide_keys=None, guide_threshold=None):
    st = stat_dtype(query.dtype)
    k = len(dims)
    return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
            query.new_empty(k, query.shape[0], dtype=st), query.new_empty(k, keys.shape[0], dtype=st))


def _scale_grads(ctx, row_dot, col_dot, scale, row_scale, col_scale):
    """Gradients of scale, row_scale, col_scale from Σ G·S per row and column (S is linear in
    each factor): ∂L/∂r_it = row_dot_ti / r_it, ∂L/∂s = Σ row_dot / s."""
    need_s, need_r, need_c = ctx.needs_input_grad[2], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
    st = row_dot.dtype
    grad_scale = grad_r = grad_c = None
    if need_s:
        grad_scale = (row_dot.sum() / scale.to(st)).to(scale.dtype).reshape(scale.shape)
    if need_r and row_scale is not None:
        grad_r = (row_dot.T / row_scale.to(st)).to(row_scale.dtype)
    if need_c and col_scale is not None:
        grad_c = (col_dot.T / col_scale.to(st)).to(col_scale.dtype)
    return grad_scale, grad_r, grad_c


def _lse_setup(ctx, inputs, output):
    (query, keys, scale, dims, row_scale, col_scale, labels, row_classes, col_classes, exclude_self,
     compute_col, backend, *masks) = inputs
    row_lse, col_lse, _, _ = output
    ctx.save_for_backward(query, keys, scale, row_scale, col_scale, labels, row_classes,
                          col_classes, row_lse, col_lse, *masks)
    ctx.dims, ctx.exclude_self, ctx.compute_col, ctx.backend = list(dims), exclude_self, compute_col, backend
    ctx.set_materialize_grads(False)


def _lse_backward(ctx, grad_row, grad_col, grad_pos, _grad_count):
    (query, keys, scale, row_scale, col_scale, labels, row_classes, col_classes, row_lse,
     col_lse, *masks) = ctx.saved_tensors
    none = (None,) * 17
    if not ctx.compute_col:
        grad_col = None
    if grad_row is None and grad_col is None and grad_pos is None:
        return none
    st = row_lse.dtype
    grad_row, grad_col, grad_pos = (None if g is None else g.to(st).contiguous()
                                    for g in (grad_row, grad_col, grad_pos))
    grad_q, grad_k, row_dot, col_dot = lse_prefix_bwd(
        query, keys, scale, ctx.dims, row_scale, col_scale, labels, row_classes, col_classes,
        ctx.exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos, ctx.backend, *masks)
    grad_scale, grad_r, grad_c = _scale_grads(ctx, row_dot, col_dot, scale, row_scale, col_scale)
    return (grad_q.to(query.dtype) if ctx.needs_input_grad[0] else None,
            grad_k.to(keys.dtype) if ctx.needs_input_grad[1] else None,
            grad_scale, None, grad_r, grad_c) + none[6:]


lse_prefix_fwd.register_autograd(_lse_backward, setup_context=_lse_setup)


@torch.library.custom_op("contrastive_kernels::sigmoid_prefix_fwd", mutates_args=())
def sigmoid_prefix_fwd(query: Tensor, keys: Tensor, scale: Tensor, bias: Tensor, dims: list[int],
                       row_scale: Optional[Tensor], col_scale: Optional[Tensor],
                       row_classes: Optional[Tensor], col_classes: Optional[Tensor],
                       diagonal: bool, backend: str) -> Tensor:
    """Per-prefix row sums (k, N) of softplus(−z·(S^t + bias))."""
    fwd, _ = implementation(backend, "sigmoid_prefix")
    with no_autocast(query.device):
        return fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes, col_classes,
                   diagonal)


@sigmoid_prefix_fwd.register_fake
def _sigmoid_prefix_fwd_fake(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                             col_classes, diagonal, backend):
    return query.new_empty(len(dims), query.shape[0], dtype=stat_dtype(query.dtype))


@torch.library.custom_op("contrastive_kernels::sigmoid_prefix_bwd", mutates_args=())
def sigmoid_prefix_bwd(query: Tensor, keys: Tensor, scale: Tensor, bias: Tensor, dims: list[int],
                       row_scale: Optional[Tensor], col_scale: Optional[Tensor],
                       row_classes: Optional[Tensor], col_classes: Optional[Tensor],
                       diagonal: bool, grad_row: Tensor,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_query, grad_keys, row_dot (k, N), col_dot (k, M), grad_bias_row (k, N))."""
    _, bwd = implementation(backend, "sigmoid_prefix")
    with no_autocast(query.device):
        return tuple(bwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                         col_classes, diagonal, grad_row))


@sigmoid_prefix_bwd.register_fake
def _sigmoid_prefix_bwd_fake(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                             col_classes, diagonal, grad_row, backend):
    st = stat_dtype(query.dtype)
    k, n, m = len(dims), query.shape[0], keys.shape[0]
    return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
            query.new_empty(k, n, dtype=st), query.new_empty(k, m, dtype=st),
            query.new_empty(k, n, dtype=st))


def _sigmoid_setup(ctx, inputs, output):
    (query, keys, scale, bias, dims, row_scale, col_scale, row_classes, col_classes, diagonal,
     backend) = inputs
    ctx.save_for_backward(query, keys, scale, bias, row_scale, col_scale, row_classes, col_classes)
    ctx.dims, ctx.diagonal, ctx.backend = list(dims), diagonal, backend


def _sigmoid_backward(ctx, grad_row):
    query, keys, scale, bias, row_scale, col_scale, row_classes, col_classes = ctx.saved_tensors
    st = stat_dtype(query.dtype)
    grad_q, grad_k, row_dot, col_dot, grad_b = sigmoid_prefix_bwd(
        query, keys, scale, bias, ctx.dims, row_scale, col_scale, row_classes, col_classes,
        ctx.diagonal, grad_row.to(st).contiguous(), ctx.backend)
    # the factors sit at positions 5 and 6 here (bias and dims come first): shift the flags
    need = ctx.needs_input_grad
    grad_scale = grad_r = grad_c = None
    if need[2]:
        grad_scale = (row_dot.sum() / scale.to(st)).to(scale.dtype).reshape(scale.shape)
    if need[5] and row_scale is not None:
        grad_r = (row_dot.T / row_scale.to(st)).to(row_scale.dtype)
    if need[6] and col_scale is not None:
        grad_c = (col_dot.T / col_scale.to(st)).to(col_scale.dtype)
    grad_bias = grad_b.sum().to(bias.dtype).reshape(bias.shape) if need[3] else None
    return (grad_q.to(query.dtype) if need[0] else None, grad_k.to(keys.dtype) if need[1] else None,
            grad_scale, grad_bias, None, grad_r, grad_c, None, None, None, None)


sigmoid_prefix_fwd.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup)
