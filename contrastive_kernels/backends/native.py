"""``cpu`` and ``cuda`` backends: the compiled extension's private ops ``torch.ops.ck_native``.

One schema (csrc/ops.cpp) with a kernel per dispatch key — csrc/cpu for CPU tensors, csrc/cuda for
CUDA tensors — so both backends are the same two calls; the dispatcher picks the device's kernel.
"""
from __future__ import annotations

import torch


def lse_fwd(query, keys, scale, labels, compute_col):
    return tuple(torch.ops.ck_native.lse_fwd(query, keys, scale, labels, compute_col))


def lse_bwd(query, keys, scale, labels, row_lse, col_lse, grad_row, grad_col, grad_pos):
    return tuple(torch.ops.ck_native.lse_bwd(query, keys, scale, labels, row_lse, col_lse,
                                             grad_row, grad_col, grad_pos))
