"""The prefix (Matryoshka) op families on blocks of rows, shared by ``reference`` (one block) and
``chunked`` (blocks of ``CHUNK_ELEMENTS``); docs/math.md §9.

For prefix dimensions ``d_1 < … < d_k`` the logit of pair (i, j) at prefix t is

    S^t_ij = s · r_it · c_jt · P^t_ij,     P^t_ij = ⟨q_i[:d_t], k_j[:d_t]⟩ = Σ_{u ≤ t} Z^u_ij

with ``Z^u`` the product of the D-segment ``[d_{u−1}, d_u)`` and ``r``, ``c`` optional per-row and
per-column factors (the inverse prefix norms, for cosine similarity at every prefix). The forward
accumulates the segments' products as running sums: every prefix's logits for the GEMM work of one
``d_k``-wide product. The backward walks the prefixes from the last down, so that segment u
receives ``U^u = Σ_{t ≥ u} s·r_t·c_t·G^t`` — again one ``d_k``-wide product each way. It also
returns ``Σ_j G^t_ij·S^t_ij`` per row and ``Σ_i G^t_ij·S^t_ij`` per column, from which the autograd
site forms the gradients of ``r``, ``c`` and ``s`` (S is linear in each).
"""
from __future__ import annotations

import torch

from .._types import stat_dtype
from ._blocks import block_grad, block_stats, sigmoid_block


def _segments(dims):
    bounds = (0,) + tuple(dims)
    return list(zip(bounds[:-1], bounds[1:]))


def _logits(running, sc, t, rows, row_scale, col_scale):
    s = sc * running
    if row_scale is not None:
        s = s * row_scale[rows, t, None] * col_scale[None, :, t]
    return s


def _running_logits(q, k, dims, sc, rows, row_scale, col_scale):
    """Yield (t, S^t block) for t = 0..k−1, one segment product per prefix."""
    running = None
    for t, (a, b) in enumerate(_segments(dims)):
        z = q[:, a:b] @ k[:, a:b].T
        running = z if running is None else running.add_(z)
        yield t, _logits(running, sc, t, rows, row_scale, col_scale)


def lse_prefix_fwd(blocks, query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, compute_col, **masks):
    """(row_lse (k, N), col_lse (k, M) or (k, 0), pos (k, N), pos_count (N,) or (0,)); ``masks``
    the log-sum-exp op's optional exclusions (groups, guide), the same at every prefix."""
    st = stat_dtype(query.dtype)
    n, m, kk = query.shape[0], keys.shape[0], len(dims)
    dev = query.device
    row = torch.empty(kk, n, dtype=st, device=dev)
    pos = torch.empty(kk, n, dtype=st, device=dev)
    count = torch.empty(n if row_classes is not None else 0, dtype=st, device=dev)
    col = torch.full((kk, m), float("-inf"), dtype=st, device=dev) if compute_col else None
    for rows, q, k, sc in blocks:
        for t, s in _running_logits(q, k, dims, sc, rows, row_scale, col_scale):
            r, c, p, cnt = block_stats(s, rows, labels, row_classes, col_classes, exclude_self,
                                       **masks)
            row[t, rows], pos[t, rows] = r, p
            if cnt is not None:
                count[rows] = cnt
            if col is not None:
                col[t] = torch.logaddexp(col[t], c)
    return row, (col if col is not None else row.new_empty(kk, 0)), pos, count


def _accumulate(g, s, t, rows, sc, row_scale, col_scale, row_dot, col_dot, upstream):
    """Record Σ G·S per row and column of prefix t; return U with s·r_t·c_t·G added."""
    gs = g * s
    row_dot[t, rows] = gs.sum(dim=1)
    col_dot[t] += gs.sum(dim=0)
    h = g.mul_(sc)
    if row_scale is not None:
        h.mul_(row_scale[rows, t, None]).mul_(col_scale[None, :, t])
    return h if upstream is None else upstream.add_(h)


def _backward(blocks, query, keys, dims, grad_of_prefix, row_scale, col_scale):
    """The shared backward walk: ``grad_of_prefix(t, s, rows) -> G^t block``."""
    st = stat_dtype(query.dtype)
    n, m, kk = query.shape[0], keys.shape[0], len(dims)
    dev = query.device
    grad_q = torch.zeros(n, query.shape[1], dtype=st, device=dev)
    grad_k = torch.zeros(m, keys.shape[1], dtype=st, device=dev)
    row_dot = torch.zeros(kk, n, dtype=st, device=dev)
    col_dot = torch.zeros(kk, m, dtype=st, device=dev)
    segs = _segments(dims)
    for rows, q, k, sc in blocks:
        logits = [s for _, s in _running_logits(q, k, dims, sc, rows, row_scale, col_scale)]
        upstream = None
        for t in reversed(range(kk)):
            s = logits.pop()
            upstream = _accumulate(grad_of_prefix(t, s, rows), s, t, rows, sc, row_scale,
                                   col_scale, row_dot, col_dot, upstream)
            a, b = segs[t]
            grad_q[rows, a:b] = upstream @ k[:, a:b]
            grad_k[:, a:b] += upstream.T @ q[:, a:b]
    return grad_q, grad_k, row_dot, col_dot


def lse_prefix_bwd(blocks, query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                   **masks):
    """(grad_query (N, D), grad_keys (M, D), row_dot (k, N), col_dot (k, M))."""
    def grad_of_prefix(t, s, rows):
        return block_grad(s, rows, labels, row_classes, col_classes, exclude_self, row_lse[t],
                          col_lse[t] if grad_col is not None else None,
                          None if grad_row is None else grad_row[t],
                          None if grad_col is None else grad_col[t],
                          None if grad_pos is None else grad_pos[t], **masks)
    return _backward(blocks, query, keys, dims, grad_of_prefix, row_scale, col_scale)


def sigmoid_prefix_fwd(blocks, query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal):
    """Per-prefix row sums (k, N) of softplus(−z·(S^t + b))."""
    out = torch.empty(len(dims), query.shape[0], dtype=stat_dtype(query.dtype), device=query.device)
    for rows, q, k, sc in blocks:
        for t, s in _running_logits(q, k, dims, sc, rows, row_scale, col_scale):
            out[t, rows] = sigmoid_block(s, rows, bias, row_classes, col_classes, diagonal)[0]
    return out


def sigmoid_prefix_bwd(blocks, query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal, grad_row):
    """(grad_query, grad_keys, row_dot (k, N), col_dot (k, M), grad_bias_row (k, N))."""
    grad_b = torch.zeros(len(dims), query.shape[0], dtype=stat_dtype(query.dtype),
                         device=query.device)

    def grad_of_prefix(t, s, rows):
        _, x, z = sigmoid_block(s, rows, bias, row_classes, col_classes, diagonal)
        g = grad_row[t, rows, None] * (-z) * torch.sigmoid(x)
        grad_b[t, rows] = g.sum(dim=1)
        return g
    return _backward(blocks, query, keys, dims, grad_of_prefix, row_scale, col_scale) + (grad_b,)
