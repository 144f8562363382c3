"""The soft-target cross-entropy op family on blocks of rows, shared by ``reference`` (one block)
and ``chunked`` (blocks of ``CHUNK_ELEMENTS``); docs/math.md §10.

Two logit matrices over the same pairs: the student's ``S = s·Q·Kᵀ`` and the teacher's
``T = t·A·Bᵀ`` (its own features and dimension). Given the teacher's row / column log-sum-exp
``a_i``, ``b_j`` (the log-sum-exp op's statistics), the op returns the teacher-weighted student logits

    row_cross_i = Σ_j e^{T_ij − a_i}·S_ij,      col_cross_j = Σ_i e^{T_ij − b_j}·S_ij

so that the soft-target cross-entropy of row i is ``lse_S(i) − row_cross_i``. Its backward, for
upstream gradients ``g``, ``h`` of the two statistics, forms per tile

    G^S_ij = g_i·p_ij + h_j·p'_ij                     (student logits)
    G^T_ij = g_i·p_ij·S_ij + h_j·p'_ij·S_ij             (teacher logits, a and b held fixed)

with ``p = e^{T − a}``, ``p' = e^{T − b}``; the dependence through ``a`` and ``b`` is the
log-sum-exp op's business (its inputs get ``−g·row_cross``, ``−h·col_cross`` at the autograd site).
"""
from __future__ import annotations

import torch

from .._types import stat_dtype


def soft_xent_fwd(blocks, query, keys, t_query, t_keys, t_row_lse, t_col_lse, compute_col):
    """(row_cross (N,), col_cross (M,) or (0,)) in the statistic dtype."""
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    row = torch.empty(n, dtype=st, device=query.device)
    col = torch.zeros(m if compute_col else 0, dtype=st, device=query.device)
    for rows, s, t in blocks:
        row[rows] = (torch.exp(t - t_row_lse[rows, None]) * s).sum(dim=1)
        if compute_col:
            col += (torch.exp(t - t_col_lse[None, :]) * s).sum(dim=0)
    return row, col


def soft_xent_grads(s, t, rows, t_row_lse, t_col_lse, grad_row, grad_col, teacher: bool):
    """(G^S, G^T or None) of one block."""
    g_s = g_t = None
    if grad_row is not None:
        w = torch.exp(t - t_row_lse[rows, None]).mul_(grad_row[rows, None])
        g_s = w
        g_t = w * s if teacher else None
    if grad_col is not None:
        w = torch.exp(t - t_col_lse[None, :]).mul_(grad_col[None, :])
        g_s = w if g_s is None else g_s.add_(w)
        if teacher:
            ws = w.mul_(s) if g_s is not w else w * s
            g_t = ws if g_t is None else g_t.add_(ws)
    if g_s is None:
        g_s = torch.zeros_like(s)
    return g_s, g_t
