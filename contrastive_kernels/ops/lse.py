"""The log-sum-exp op family (docs/internals.md, docs/math.md §2): one forward, one backward, one
autograd site.

``lse_fwd`` returns the per-row / per-column log-sum-exp of ``S = s·Q·Kᵀ`` over the kept pairs
(optionally without the self pair ``(i, i)``, same-group pairs, or a guide's false negatives) and
the positives — the logit of each row's labelled column, or the sum and
count of the logits of its same-class columns; ``lse_bwd`` recomputes each tile of ``S`` and
returns the feature gradients for any upstream gradients of those statistics. Every LSE-based loss
in the package is a few O(N) ops on them, so every backend (reference, chunked, cpu, triton, cuda)
serves every such loss through this single ``torch.library.custom_op`` pair. The ops are opaque to
``torch.compile`` (no graph breaks) and testable with ``torch.library.opcheck``.

The ``backend`` argument is a concrete backend name, already resolved by ``backends.resolve``;
the op calls that backend's callables (``backends.implementation``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._types import stat_dtype
from ..backends import implementation
from ._autocast import no_autocast

__all__ = ["lse_fwd", "lse_bwd"]


def _masks(row_groups, col_groups, guide_query, guide_keys, guide_threshold) -> dict:
    """The optional exclusion masks as keyword arguments of a backend callable, only those given:
    a backend without a mask feature is then called exactly as before (``backends.MISSING`` keeps
    such calls away from it)."""
    given = dict(row_groups=row_groups, col_groups=col_groups, guide_query=guide_query,
                 guide_keys=guide_keys, guide_threshold=guide_threshold)
    return {k: v for k, v in given.items() if v is not None}


@torch.library.custom_op("contrastive_kernels::lse_fwd", mutates_args=())
def lse_fwd(query: Tensor, keys: Tensor, scale: Tensor, labels: Optional[Tensor],
            row_classes: Optional[Tensor], col_classes: Optional[Tensor], exclude_self: bool,
            compute_col: bool, backend: str, row_groups: Optional[Tensor] = None,
            col_groups: Optional[Tensor] = None, guide_query: Optional[Tensor] = None,
            guide_keys: Optional[Tensor] = None,
            guide_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row LSE (N,), column LSE (M,) or (0,), positives (N,), positive count (N,) or (0,) of
    S = scale·query·keysᵀ over the kept pairs. Excluded: the self pair when ``exclude_self``;
    pairs with ``row_groups[i] == col_groups[j]`` ((N,), (M,) int64); pairs whose guide similarity
    ``⟨guide_query_i, guide_keys_j⟩`` ((N, Dg), (M, Dg) in the statistic dtype) exceeds
    ``guide_threshold_i`` ((N,)), unless (i, j) is a designated positive."""
    fwd, _ = implementation(backend)
    with no_autocast(query.device):
        return tuple(fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self,
                         compute_col, **_masks(row_groups, col_groups, guide_query, guide_keys,
                                               guide_threshold)))


@lse_fwd.register_fake
def _lse_fwd_fake(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col,
                  backend, row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
                  guide_threshold=None):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    return (query.new_empty(n, dtype=st), query.new_empty(m if compute_col else 0, dtype=st),
            query.new_empty(n, dtype=st),
            query.new_empty(n if row_classes is not None else 0, dtype=st))


@torch.library.custom_op("contrastive_kernels::lse_bwd", mutates_args=())
def lse_bwd(query: Tensor, keys: Tensor, scale: Tensor, labels: Optional[Tensor],
            row_classes: Optional[Tensor], col_classes: Optional[Tensor], exclude_self: bool,
            row_lse: Tensor, col_lse: Tensor, grad_row: Optional[Tensor],
            grad_col: Optional[Tensor], grad_pos: Optional[Tensor],
            backend: str, row_groups: Optional[Tensor] = None, col_groups: Optional[Tensor] = None,
            guide_query: Optional[Tensor] = None, guide_keys: Optional[Tensor] = None,
            guide_threshold: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(grad_query (N, D), grad_keys (M, D)) in the statistic dtype, for
    G_ij = [(i,j) kept]·(grad_row_i·exp(S_ij − r_i) + grad_col_j·exp(S_ij − c_j))
           + grad_pos_i·[j is a positive of i]; the masks as in ``lse_fwd``."""
    _, bwd = implementation(backend)
    with no_autocast(query.device):
        return tuple(bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self,
                         row_lse, col_lse, grad_row, grad_col, grad_pos,
                         **_masks(row_groups, col_groups, guide_query, guide_keys, guide_threshold)))


@lse_bwd.register_fake
def _lse_bwd_fake(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse,
                  col_lse, grad_row, grad_col, grad_pos, backend, row_groups=None, col_groups=None,
                  guide_query=None, guide_keys=None, guide_threshold=None):
    st = stat_dtype(query.dtype)
    return query.new_empty(query.shape, dtype=st), keys.new_empty(keys.shape, dtype=st)


def _setup_context(ctx, inputs, output):
    (query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col, backend,
     *masks) = inputs
    row_lse, col_lse, _, _ = output
    ctx.save_for_backward(query, keys, scale, labels, row_classes, col_classes, row_lse, col_lse,
                          *masks)
    ctx.exclude_self = exclude_self
    ctx.compute_col = compute_col
    ctx.backend = backend
    # Unused statistics then arrive as None, so the kernel skips their exp instead of
    # multiplying a whole tile by zero.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_row, grad_col, grad_pos, _grad_count):
    query, keys, scale, labels, row_classes, col_classes, row_lse, col_lse, *masks = ctx.saved_tensors
    if not ctx.compute_col:
        grad_col = None
    need_q, need_k, need_s = ctx.needs_input_grad[:3]
    none = (None,) * 14
    if not (need_q or need_k or need_s) or (grad_row is None and grad_col is None and grad_pos is None):
        return none
    st = row_lse.dtype
    grad_row, grad_col, grad_pos = (None if g is None else g.to(st).contiguous()
                                    for g in (grad_row, grad_col, grad_pos))
    grad_q, grad_k = lse_bwd(query, keys, scale, labels, row_classes, col_classes, ctx.exclude_self,
                             row_lse, col_lse, grad_row, grad_col, grad_pos, ctx.backend, *masks)
    grad_scale = None
    if need_s:
        # ∂L/∂s = Σ_ij G_ij·S_ij / s = Σ_i ⟨grad_q_i, q_i⟩ / s — one O(N·D) reduction, done in the
        # statistic dtype before grad_q is rounded to the input dtype.
        grad_scale = ((grad_q * query.to(st)).sum() / scale.to(st)).to(scale.dtype).reshape(scale.shape)
    return (grad_q.to(query.dtype) if need_q else None,
            grad_k.to(keys.dtype) if need_k else None,
            grad_scale) + none[3:]


lse_fwd.register_autograd(_backward, setup_context=_setup_context)
