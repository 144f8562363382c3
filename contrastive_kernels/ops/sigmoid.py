"""The sigmoid (SigLIP) op family (docs/internals.md, docs/math.md §7): one forward, one backward,
one autograd site.

``sigmoid_fwd`` returns ``ρ_i = Σ_j softplus(−z_ij·(S_ij + b))`` per row, with ``S = s·Q·Kᵀ`` and
``z_ij = +1`` on positive pairs (equal classes, or the diagonal when ``diagonal``), −1 elsewhere;
``sigmoid_bwd`` recomputes each tile once and returns the feature gradients and the per-row sums
of ``G`` (for the bias). The autograd site turns those into the exact gradients of ``logit_scale``
(``Σ_i ⟨grad_q_i, q_i⟩ / s``) and ``logit_bias`` (``Σ G``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._types import stat_dtype
from ..backends import implementation
from ._autocast import no_autocast

__all__ = ["sigmoid_fwd", "sigmoid_bwd"]


@torch.library.custom_op("contrastive_kernels::sigmoid_fwd", mutates_args=())
def sigmoid_fwd(query: Tensor, keys: Tensor, scale: Tensor, bias: Tensor,
                row_classes: Optional[Tensor], col_classes: Optional[Tensor], diagonal: bool,
                backend: str) -> Tensor:
    """Per-row sums (N,) of softplus(−z·(scale·query·keysᵀ + bias)), statistic dtype."""
    fwd, _ = implementation(backend, "sigmoid")
    with no_autocast(query.device):
        return fwd(query, keys, scale, bias, row_classes, col_classes, diagonal)


@sigmoid_fwd.register_fake
def _sigmoid_fwd_fake(query, keys, scale, bias, row_classes, col_classes, diagonal, backend):
    return query.new_empty(query.shape[0], dtype=stat_dtype(query.dtype))


@torch.library.custom_op("contrastive_kernels::sigmoid_bwd", mutates_args=())
def sigmoid_bwd(query: Tensor, keys: Tensor, scale: Tensor, bias: Tensor,
                row_classes: Optional[Tensor], col_classes: Optional[Tensor], diagonal: bool,
                grad_row: Tensor, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_query (N, D), grad_keys (M, D), grad_bias_row (N,)) in the statistic dtype, for
    G_ij = grad_row_i·(−z_ij)·σ(−z_ij·(S_ij + b))."""
    _, bwd = implementation(backend, "sigmoid")
    with no_autocast(query.device):
        return tuple(bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row))


@sigmoid_bwd.register_fake
def _sigmoid_bwd_fake(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row, backend):
    st = stat_dtype(query.dtype)
    return (query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st),
            query.new_empty(query.shape[0], dtype=st))


def _setup_context(ctx, inputs, output):
    query, keys, scale, bias, row_classes, col_classes, diagonal, backend = inputs
    ctx.save_for_backward(query, keys, scale, bias, row_classes, col_classes)
    ctx.diagonal = diagonal
    ctx.backend = backend


def _backward(ctx, grad_row):
    query, keys, scale, bias, row_classes, col_classes = ctx.saved_tensors
    need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
    if not (need_q or need_k or need_s or need_b):
        return (None,) * 8
    st = stat_dtype(query.dtype)
    grad_q, grad_k, grad_b_rows = sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes,
                                              ctx.diagonal, grad_row.to(st).contiguous(),
                                              ctx.backend)
    grad_scale = grad_bias = None
    if need_s:
        # ∂L/∂s = Σ_ij G_ij·(q_i·k_j) = Σ_i ⟨grad_q_i, q_i⟩ / s, in the statistic dtype
        grad_scale = ((grad_q * query.to(st)).sum() / scale.to(st)).to(scale.dtype).reshape(scale.shape)
    if need_b:
        grad_bias = grad_b_rows.sum().to(bias.dtype).reshape(bias.shape)
    return (grad_q.to(query.dtype) if need_q else None,
            grad_k.to(keys.dtype) if need_k else None,
            grad_scale, grad_bias, None, None, None, None)


sigmoid_fwd.register_autograd(_backward, setup_context=_setup_context)
