"""``chunked`` backend: portable PyTorch on any device, blocks of rows, recompute in backward.

Each block of rows of S is materialised (``CHUNK_ELEMENTS`` elements at most), reduced and dropped,
so memory is O((N + M)·D + chunk) rather than O(N·M); the backward recomputes every block. It is the
fallback of ``auto`` wherever no compiled backend runs, and the yardstick of the fused kernels'
speed-up. The per-block formulas are shared with the reference backend (``_blocks``), so the two
can only differ by the blocking; the tests judge both against the independent oracle
``contrastive_kernels.reference``.
"""
from __future__ import annotations

import os

import torch

from .._types import stat_dtype
from . import _prefix, _soft_xent
from ._blocks import block_grad, block_stats, sigmoid_block

# Elements of one chunk of S (float32: 16 MiB). Large enough that each block matmul runs near the
# BLAS rate, small enough to be O((N + M)·chunk), not O(N·M): the backward keeps ~5 blocks alive
# (S, G, exp temporaries), ~80 MiB, which tests/test_memory.py bounds at this shipped size. 2^22
# was also faster than the earlier 2^24 on the CPU (clip fwd+bwd N = M = 8192, D = 256, 2 threads:
# 0.80× the time, medians of 4 alternating runs, 2026-12-02). Read at import (CK_CHUNK_ELEMENTS);
# tests override the attribute.
CHUNK_ELEMENTS = int(os.environ.get("CK_CHUNK_ELEMENTS", 1 << 22))


def row_block(n: int, m: int) -> int:
    """Rows per block so that a block of S holds at most ``CHUNK_ELEMENTS`` elements."""
    return max(1, min(n, CHUNK_ELEMENTS // max(m, 1)))


def _blocks(query, keys, scale):
    """(rows, S block) over blocks of rows; keys converted once (16-bit inputs multiply with float32
    accumulation), the logits rounded once in the statistic dtype."""
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    sc = scale.to(st)
    k = keys.to(st)  # one O(M·D) copy
    block = row_block(n, m)
    for start in range(0, n, block):
        rows = torch.arange(start, min(n, start + block), device=query.device)
        yield rows, sc * (query[start:start + block].to(st) @ k.T), k, sc


def lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col,
            **masks):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    dev = query.device
    row = torch.empty(n, dtype=st, device=dev)
    pos = torch.empty(n, dtype=st, device=dev)
    count = torch.empty(n if row_classes is not None else 0, dtype=st, device=dev)
    col = torch.full((m,), float("-inf"), dtype=st, device=dev) if compute_col else None
    for rows, s, _, _ in _blocks(query, keys, scale):
        r, c, p, cnt = block_stats(s, rows, labels, row_classes, col_classes, exclude_self, **masks)
        row[rows], pos[rows] = r, p
        if cnt is not None:
            count[rows] = cnt
        if col is not None:
            # Running column LSE: logaddexp keeps it in the log domain (no overflow at scale 100).
            col = torch.logaddexp(col, c)
    return row, (col if col is not None else row.new_empty(0)), pos, count


def lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos, **masks):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    grad_q = torch.empty(n, query.shape[1], dtype=st, device=query.device)
    grad_k = torch.zeros(m, keys.shape[1], dtype=st, device=query.device)
    sc = None
    for rows, s, k, sc in _blocks(query, keys, scale):
        g = block_grad(s, rows, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
                       grad_row, grad_col, grad_pos, **masks)
        grad_q[rows] = sc * (g @ k)
        grad_k.addmm_(g.T, query[rows].to(st))
    return grad_q, grad_k.mul_(sc)


def sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
    out = torch.empty(query.shape[0], dtype=stat_dtype(query.dtype), device=query.device)
    for rows, s, _, _ in _blocks(query, keys, scale):
        out[rows] = sigmoid_block(s, rows, bias, row_classes, col_classes, diagonal)[0]
    return out


def sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    grad_q = torch.empty(n, query.shape[1], dtype=st, device=query.device)
    grad_k = torch.zeros(m, keys.shape[1], dtype=st, device=query.device)
    grad_b = torch.empty(n, dtype=st, device=query.device)
    sc = None
    for rows, s, k, sc in _blocks(query, keys, scale):
        _, x, z = sigmoid_block(s, rows, bias, row_classes, col_classes, diagonal)
        g = grad_row[rows, None] * (-z) * torch.sigmoid(x)
        grad_q[rows] = sc * (g @ k)
        grad_k.addmm_(g.T, query[rows].to(st))
        grad_b[rows] = g.sum(dim=1)
    return grad_q, grad_k.mul_(sc), grad_b


# ---------------------------------------------------------------------------------------------
# prefix (Matryoshka) families (docs/math.md §9): the backward keeps one block per prefix alive
# ---------------------------------------------------------------------------------------------

def _row_blocks(query, keys, scale, blocks_alive: int):
    """(rows, query block, keys, scale) in the statistic dtype, blocks of rows sized so that
    ``blocks_alive`` S-sized blocks fit in ``CHUNK_ELEMENTS``."""
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    k = keys.to(st)
    sc = scale.to(st)
    block = row_block(n, m * blocks_alive)
    for start in range(0, n, block):
        rows = torch.arange(start, min(n, start + block), device=query.device)
        yield rows, query[start:start + block].to(st), k, sc


def lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, compute_col, **masks):
    return _prefix.lse_prefix_fwd(_row_blocks(query, keys, scale, 3), query, keys, scale, dims,
                                  row_scale, col_scale, labels, row_classes, col_classes,
                                  exclude_self, compute_col, **masks)


def lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                   **masks):
    return _prefix.lse_prefix_bwd(_row_blocks(query, keys, scale, len(dims) + 4), query, keys,
                                  scale, dims, row_scale, col_scale, labels, row_classes,
                                  col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col,
                                  grad_pos, **masks)


def sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal):
    return _prefix.sigmoid_prefix_fwd(_row_blocks(query, keys, scale, 3), query, keys, scale,
                                      bias, dims, row_scale, col_scale, row_classes, col_classes,
                                      diagonal)


def sigmoid_prefix_bwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal, grad_row):
    return _prefix.sigmoid_prefix_bwd(_row_blocks(query, keys, scale, len(dims) + 4), query, keys,
                                      scale, bias, dims, row_scale, col_scale, row_classes,
                                      col_classes, diagonal, grad_row)


# ---------------------------------------------------------------------------------------------
# soft-target cross-entropy family (docs/math.md §10): student and teacher blocks side by side
# ---------------------------------------------------------------------------------------------

def _pair_blocks(query, keys, scale, t_query, t_keys, t_scale, blocks_alive: int):
    """(rows, S block, T block, q, k, a, b, s, t) for blocks of rows."""
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    k, b = keys.to(st), t_keys.to(st)
    sc, tc = scale.to(st), t_scale.to(st)
    block = row_block(n, m * blocks_alive)
    for start in range(0, n, block):
        rows = torch.arange(start, min(n, start + block), device=query.device)
        q, a = query[start:start + block].to(st), t_query[start:start + block].to(st)
        yield rows, sc * (q @ k.T), tc * (a @ b.T), q, k, a, b, sc, tc


def soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col):
    blocks = ((r, s, t) for r, s, t, *_ in _pair_blocks(query, keys, scale, t_query, t_keys,
                                                         t_scale, 3))
    return _soft_xent.soft_xent_fwd(blocks, query, keys, t_query, t_keys, t_row_lse, t_col_lse,
                                    compute_col)


def soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse,
                  col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse, teacher_grad):
    st = stat_dtype(query.dtype)
    grad_q = torch.empty(query.shape, dtype=st, device=query.device)
    grad_k = torch.zeros(keys.shape, dtype=st, device=query.device)
    grad_a = torch.empty(t_query.shape if teacher_grad else (0,), dtype=st, device=query.device)
    grad_b = torch.zeros(t_keys.shape if teacher_grad else (0,), dtype=st, device=query.device)
    sc = tc = None
    for rows, s, t, q, k, a, b, sc, tc in _pair_blocks(query, keys, scale, t_query, t_keys,
                                                       t_scale, 5):
        g_s, g_t = _soft_xent.soft_xent_grads(s, t, rows, t_row_lse, t_col_lse, row_lse, col_lse,
                                              grad_row, grad_col, grad_row_lse, grad_col_lse,
                                              teacher_grad)
        grad_q[rows] = sc * (g_s @ k)
        grad_k.addmm_(g_s.T, q)
        if teacher_grad:
            grad_a[rows] = tc * (g_t @ b)
            grad_b.addmm_(g_t.T, a)
    grad_k.mul_(sc)
    if teacher_grad:
        grad_b.mul_(tc)
    return grad_q, grad_k, grad_a, grad_b
