"""``chunked`` backend: portable PyTorch on any device, blocks of rows, recompute in backward.

Each block of rows of S is materialised (``CHUNK_ELEMENTS`` elements at most), reduced and dropped,
so memory is O((N + M)·D + chunk) rather than O(N·M); the backward recomputes every block. It is the
fallback of ``auto`` wherever no compiled backend runs, and the yardstick of the fused kernels'
speed-up.
"""
from __future__ import annotations

import os

import torch

from .._types import stat_dtype
from .reference import logit_grad_, positive_columns

# Elements of one chunk of S (float32: 64 MiB). Large enough that each block matmul runs near the
# BLAS rate, small enough to be O((N + M)·chunk), not O(N·M). Read at import (CK_CHUNK_ELEMENTS);
# tests override the attribute.
CHUNK_ELEMENTS = int(os.environ.get("CK_CHUNK_ELEMENTS", 1 << 24))


def row_block(n: int, m: int) -> int:
    """Rows per block so that a block of S holds at most ``CHUNK_ELEMENTS`` elements."""
    return max(1, min(n, CHUNK_ELEMENTS // max(m, 1)))


def lse_fwd(query, keys, scale, labels, compute_col):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    sc = scale.to(st)
    k = keys.to(st)  # one O(M·D) copy, so 16-bit inputs multiply with float32 accumulation
    row = torch.empty(n, dtype=st, device=query.device)
    col = torch.full((m,), float("-inf"), dtype=st, device=query.device) if compute_col else None
    block = row_block(n, m)
    for start in range(0, n, block):
        s = sc * (query[start:start + block].to(st) @ k.T)
        row[start:start + block] = torch.logsumexp(s, dim=1)
        if col is not None:
            # Running column LSE: logaddexp keeps it in the log domain (no overflow at scale 100).
            col = torch.logaddexp(col, torch.logsumexp(s, dim=0))
    cols = positive_columns(n, labels, query.device)
    pos = sc * (query.to(st) * k[cols]).sum(dim=1)
    return row, (col if col is not None else row.new_empty(0)), pos


def lse_bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    st = stat_dtype(query.dtype)
    n, m = query.shape[0], keys.shape[0]
    sc = scale.to(st)
    k = keys.to(st)
    cols = positive_columns(n, labels, query.device)
    grad_q = torch.empty(n, query.shape[1], dtype=st, device=query.device)
    grad_k = torch.zeros(m, keys.shape[1], dtype=st, device=query.device)
    block = row_block(n, m)
    for start in range(0, n, block):
        q = query[start:start + block].to(st)
        s = sc * (q @ k.T)
        g = logit_grad_(s, row_lse, col_lse, grad_row, grad_col, grad_pos, cols, start)
        grad_q[start:start + block] = sc * (g @ k)
        grad_k.addmm_(g.T, q)
    return grad_q, grad_k.mul_(sc)
