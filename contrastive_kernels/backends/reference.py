"""``reference`` backend: the op families computed densely (materialises S), for checking only.

Same callables and contract as every backend (docs/internals.md); memory O(N·M). It applies the
block helpers of ``_blocks`` (shared with ``chunked``, which applies them one block of rows at a
time) to all rows at once; the tests judge both against the independent dense oracle
``contrastive_kernels.reference``, never against each other.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._types import stat_dtype
from . import _prefix, _soft_xent
from ._blocks import block_grad, block_stats, sigmoid_block


def logits(query: Tensor, keys: Tensor, scale: Tensor) -> Tensor:
    st = stat_dtype(query.dtype)
    return scale.to(st) * (query.to(st) @ keys.to(st).T)


def lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col,
            **masks):
    s = logits(query, keys, scale)
    rows = torch.arange(query.shape[0], device=query.device)
    row, col, pos, count = block_stats(s, rows, labels, row_classes, col_classes, exclude_self,
                                       **masks)
    return (row, col if compute_col else s.new_empty(0), pos,
            count if count is not None else s.new_empty(0))


def lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos, **masks):
    st = stat_dtype(query.dtype)
    sc = scale.to(st)
    q, k = query.to(st), keys.to(st)
    s = sc * (q @ k.T)
    rows = torch.arange(query.shape[0], device=query.device)
    g = block_grad(s, rows, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
                   grad_row, grad_col, grad_pos, **masks)
    return sc * (g @ k), sc * (g.T @ q)


# ---------------------------------------------------------------------------------------------
# sigmoid family (docs/math.md §7)
# ---------------------------------------------------------------------------------------------

def sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
    s = logits(query, keys, scale)
    rows = torch.arange(query.shape[0], device=query.device)
    return sigmoid_block(s, rows, bias, row_classes, col_classes, diagonal)[0]


def sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
    st = stat_dtype(query.dtype)
    sc = scale.to(st)
    q, k = query.to(st), keys.to(st)
    s = sc * (q @ k.T)
    rows = torch.arange(query.shape[0], device=query.device)
    _, x, z = sigmoid_block(s, rows, bias, row_classes, col_classes, diagonal)
    g = grad_row[:, None] * (-z) * torch.sigmoid(x)
    return sc * (g @ k), sc * (g.T @ q), g.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# prefix (Matryoshka) families (docs/math.md §9): every row at once
# ---------------------------------------------------------------------------------------------

def _one_block(query, keys, scale):
    st = stat_dtype(query.dtype)
    yield (torch.arange(query.shape[0], device=query.device), query.to(st), keys.to(st),
           scale.to(st))


def lse_prefix_fwd(query, keys, scale, *args, **masks):
    return _prefix.lse_prefix_fwd(_one_block(query, keys, scale), query, keys, scale, *args,
                                  **masks)


def lse_prefix_bwd(query, keys, scale, *args, **masks):
    return _prefix.lse_prefix_bwd(_one_block(query, keys, scale), query, keys, scale, *args,
                                  **masks)


def sigmoid_prefix_fwd(query, keys, scale, *args):
    return _prefix.sigmoid_prefix_fwd(_one_block(query, keys, scale), query, keys, scale, *args)


def sigmoid_prefix_bwd(query, keys, scale, *args):
    return _prefix.sigmoid_prefix_bwd(_one_block(query, keys, scale), query, keys, scale, *args)


# ---------------------------------------------------------------------------------------------
# soft-target cross-entropy family (docs/math.md §10): both whole matrices
# ---------------------------------------------------------------------------------------------

def soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col):
    rows = torch.arange(query.shape[0], device=query.device)
    blocks = [(rows, logits(query, keys, scale), logits(t_query, t_keys, t_scale))]
    return _soft_xent.soft_xent_fwd(blocks, query, keys, t_query, t_keys, t_row_lse, t_col_lse,
                                    compute_col)


def soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse,
                  col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse, teacher_grad):
    st = stat_dtype(query.dtype)
    rows = torch.arange(query.shape[0], device=query.device)
    q, k, a, b = (x.to(st) for x in (query, keys, t_query, t_keys))
    sc, tc = scale.to(st), t_scale.to(st)
    g_s, g_t = _soft_xent.soft_xent_grads(sc * (q @ k.T), tc * (a @ b.T), rows, t_row_lse,
                                          t_col_lse, row_lse, col_lse, grad_row, grad_col,
                                          grad_row_lse, grad_col_lse, teacher_grad)
    if not teacher_grad:
        return sc * (g_s @ k), sc * (g_s.T @ q), q.new_empty(0), q.new_empty(0)
    return sc * (g_s @ k), sc * (g_s.T @ q), tc * (g_t @ b), tc * (g_t.T @ a)
