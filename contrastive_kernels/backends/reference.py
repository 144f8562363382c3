"""``reference`` backend: the op family computed densely (materialises S), for checking only.

Same callables and contract as every backend (docs/internals.md); memory O(N·M).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._types import stat_dtype


def positive_columns(n: int, labels: Optional[Tensor], device) -> Tensor:
    """Column of each row's positive: ``labels`` or the diagonal."""
    return torch.arange(n, device=device) if labels is None else labels


def logit_grad_(s: Tensor, row_lse, col_lse, grad_row, grad_col, grad_pos, cols,
                row_offset: int) -> Tensor:
    """G = ∂L/∂S for one block of rows [row_offset, row_offset + s.shape[0]) of S.

    Consumes ``s`` (it is overwritten) so that at most two blocks of S-sized memory are alive.
    Shared by this backend and ``chunked`` (which calls it per row block).
    """
    rows = slice(row_offset, row_offset + s.shape[0])
    g = None
    if grad_row is not None:
        g = torch.sub(s, row_lse[rows, None]).exp_().mul_(grad_row[rows, None])
    if grad_col is not None:
        col_term = s.sub_(col_lse[None, :]).exp_().mul_(grad_col[None, :])
        g = col_term if g is None else g.add_(col_term)
    if g is None:
        g = s.zero_()
    if grad_pos is not None:
        local = torch.arange(s.shape[0], device=s.device)
        g.index_put_((local, cols[rows]), grad_pos[rows], accumulate=True)
    return g


def lse_fwd(query, keys, scale, labels, compute_col):
    st = stat_dtype(query.dtype)
    s = scale.to(st) * (query.to(st) @ keys.to(st).T)
    cols = positive_columns(query.shape[0], labels, query.device)
    pos = s.gather(1, cols[:, None]).squeeze(1)
    col = torch.logsumexp(s, dim=0) if compute_col else s.new_empty(0)
    return torch.logsumexp(s, dim=1), col, pos


def lse_bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    st = stat_dtype(query.dtype)
    sc = scale.to(st)
    q, k = query.to(st), keys.to(st)
    s = sc * (q @ k.T)
    cols = positive_columns(query.shape[0], labels, query.device)
    g = logit_grad_(s, row_lse, col_lse, grad_row, grad_col, grad_pos, cols, 0)
    return sc * (g @ k), sc * (g.T @ q)
