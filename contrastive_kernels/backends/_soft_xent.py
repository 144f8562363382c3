"""The soft-target cross-entropy op family on blocks of rows, shared by ``reference`` (one block)
and ``chunked`` (blocks of ``CHUNK_ELEMENTS``); docs/math.md §10.

Two logit matrices over the same pairs: the student's ``S = s·Q·Kᵀ`` and the teacher's
``T = t·A·Bᵀ`` (its own features and dimension). Given the teacher's row / column log-sum-exp
``a_i``, ``b_j`` (the log-sum-exp op's statistics), the op returns the teacher-weighted student logits
and, from the same sweep, the student's own log-sum-exp statistics

    row_cross_i = Σ_j e^{T_ij − a_i}·S_ij,      col_cross_j = Σ_i e^{T_ij − b_j}·S_ij
    row_lse_i = log Σ_j e^{S_ij},                col_lse_j = log Σ_i e^{S_ij}

so that the soft-target cross-entropy of row i is ``row_lse_i − row_cross_i`` and the contrastive
loss needs no sweep of its own. Its backward, for upstream gradients ``g``, ``h`` of the cross
terms and ``u``, ``v`` of the student's statistics, forms per tile

    G^S_ij = g_i·p_ij + h_j·p'_ij + u_i·e^{S_ij − row_lse_i} + v_j·e^{S_ij − col_lse_j}
    G^T_ij = (g_i·p_ij + h_j·p'_ij)·S_ij               (teacher logits, a and b held fixed)

with ``p = e^{T − a}``, ``p' = e^{T − b}``; the dependence through ``a`` and ``b`` is the
log-sum-exp op's business (its inputs get ``−g·row_cross``, ``−h·col_cross`` at the autograd site).
"""
from __future__ import annotations

import torch

from .._types import stat_dtype


def soft_xent_fwd(blocks, query, keys, t_query, t_keys, t_row_lse, t_col_lse, compute_col):
    """(row_cross (N,), col_cross (M,) or (0,), row_lse (N,), col_lse (M,) or (0,)) in the
    statistic dtype; the columns' log-sum-exp merged across blocks in the log domain."""
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    row = torch.empty(n, dtype=st, device=query.device)
    row_lse = torch.empty(n, dtype=st, device=query.device)
    col = torch.zeros(m if compute_col else 0, dtype=st, device=query.device)
    col_lse = torch.full((m if compute_col else 0,), -torch.inf, dtype=st, device=query.device)
    for rows, s, t in blocks:
        row[rows] = (torch.exp(t - t_row_lse[rows, None]) * s).sum(dim=1)
        row_lse[rows] = torch.logsumexp(s, dim=1)
        if compute_col:
            col += (torch.exp(t - t_col_lse[None, :]) * s).sum(dim=0)
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(s, dim=0))
    return row, col, row_lse, col_lse


def soft_xent_grads(s, t, rows, t_row_lse, t_col_lse, row_lse, col_lse, grad_row, grad_col,
                    grad_row_lse, grad_col_lse, teacher: bool):
    """(G^S, G^T or None) of one block."""
    g_x = None  # the cross part g_i·p_ij + h_j·p'_ij
    if grad_row is not None:
        g_x = torch.exp(t - t_row_lse[rows, None]).mul_(grad_row[rows, None])
    if grad_col is not None:
        w = torch.exp(t - t_col_lse[None, :]).mul_(grad_col[None, :])
        g_x = w if g_x is None else g_x.add_(w)
    g_t = None
    if teacher:
        g_t = torch.zeros_like(s) if g_x is None else g_x * s
    g_s = torch.zeros_like(s) if g_x is None else g_x
    if grad_row_lse is not None:
        g_s = g_s.add_(torch.exp(s - row_lse[rows, None]).mul_(grad_row_lse[rows, None]))
    if grad_col_lse is not None:
        g_s = g_s.add_(torch.exp(s - col_lse[None, :]).mul_(grad_col_lse[None, :]))
    return g_s, g_t
