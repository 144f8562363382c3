"""``cpu`` and ``cuda`` backends: the compiled extension's private ops ``torch.ops.ck_native``.

One schema (csrc/ops.cpp) with a kernel per dispatch key — csrc/cpu for CPU tensors, csrc/cuda for
CUDA tensors — so both backends are the same calls; the dispatcher picks the device's kernel. The
CUDA kernels implement the plain log-sum-exp family only (``backends.MISSING``): exclusion,
class positives and the sigmoid family never reach them.
"""
from __future__ import annotations

import torch


def lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col):
    return tuple(torch.ops.ck_native.lse_fwd(query, keys, scale, labels, row_classes, col_classes,
                                             exclude_self, compute_col))


def lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos):
    return tuple(torch.ops.ck_native.lse_bwd(query, keys, scale, labels, row_classes, col_classes,
                                             exclude_self, row_lse, col_lse, grad_row, grad_col,
                                             grad_pos))


def sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
    return torch.ops.ck_native.sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes,
                                           diagonal)


def sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
    return tuple(torch.ops.ck_native.sigmoid_bwd(query, keys, scale, bias, row_classes,
                                                 col_classes, diagonal, grad_row))
