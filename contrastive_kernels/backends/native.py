"""``cpu`` and ``cuda`` backends: the compiled extension's private ops ``torch.ops.ck_native``.

One schema (csrc/ops.cpp) with a kernel per dispatch key — csrc/cpu for CPU tensors, csrc/cuda for
CUDA tensors — so both backends are the same calls; the dispatcher picks the device's kernel. The
CUDA kernels implement the plain log-sum-exp family only (``backends.MISSING``): exclusion,
class positives, the exclusion masks (groups, guide) and the sigmoid family never reach them. The
CPU kernels implement all of it, the masks included (decided per tile, csrc/cpu/lse_masks.h), and
the prefix (Matryoshka) families (csrc/cpu/prefix_cpu.cpp: every prefix from one sweep) and the
soft-target cross-entropy family (csrc/cpu/soft_xent_cpu.cpp: student and teacher tiles side by
side).
"""
from __future__ import annotations

import torch

from .._types import stat_dtype


def lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col,
            row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
            guide_threshold=None):
    return tuple(torch.ops.ck_native.lse_fwd(query, keys, scale, labels, row_classes, col_classes,
                                             exclude_self, compute_col, row_groups, col_groups,
                                             guide_query, guide_keys, guide_threshold))


def lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos, row_groups=None, col_groups=None, guide_query=None,
            guide_keys=None, guide_threshold=None):
    return tuple(torch.ops.ck_native.lse_bwd(query, keys, scale, labels, row_classes, col_classes,
                                             exclude_self, row_lse, col_lse, grad_row, grad_col,
                                             grad_pos, row_groups, col_groups, guide_query,
                                             guide_keys, guide_threshold))


def sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
    return torch.ops.ck_native.sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes,
                                           diagonal)


def sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
    return tuple(torch.ops.ck_native.sigmoid_bwd(query, keys, scale, bias, row_classes,
                                                 col_classes, diagonal, grad_row))


# prefix (Matryoshka) families: CPU kernels only (csrc/cpu/prefix_cpu.cpp); stats stacked (k, ·)

def lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, compute_col, row_groups=None, col_groups=None,
                   guide_query=None, guide_keys=None, guide_threshold=None):
    return tuple(torch.ops.ck_native.lse_prefix_fwd(
        query, keys, scale, list(dims), row_scale, col_scale, labels, row_classes, col_classes,
        exclude_self, compute_col, row_groups, col_groups, guide_query, guide_keys,
        guide_threshold))


def lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                   row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
                   guide_threshold=None):
    return tuple(torch.ops.ck_native.lse_prefix_bwd(
        query, keys, scale, list(dims), row_scale, col_scale, labels, row_classes, col_classes,
        exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos, row_groups, col_groups,
        guide_query, guide_keys, guide_threshold))


def sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal):
    return torch.ops.ck_native.sigmoid_prefix_fwd(query, keys, scale, bias, list(dims), row_scale,
                                                  col_scale, row_classes, col_classes, diagonal)


def sigmoid_prefix_bwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal, grad_row):
    return tuple(torch.ops.ck_native.sigmoid_prefix_bwd(
        query, keys, scale, bias, list(dims), row_scale, col_scale, row_classes, col_classes,
        diagonal, grad_row))


# soft-target cross-entropy family: CPU kernels only (csrc/cpu/soft_xent_cpu.cpp). The scales, the
# teacher's statistics and the upstream gradients in the student's statistic dtype, as the other
# backends use them (the teacher's log-sum-exp comes in the teacher's own statistic dtype).

def _in_stat(st, *tensors):
    return tuple(None if t is None else t.to(st) for t in tensors)


def soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col):
    scale, t_scale, t_row_lse, t_col_lse = _in_stat(stat_dtype(query.dtype), scale, t_scale,
                                                    t_row_lse, t_col_lse)
    return tuple(torch.ops.ck_native.soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale,
                                                   t_row_lse, t_col_lse, compute_col))


def soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse,
                  col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse, teacher_grad):
    (scale, t_scale, t_row_lse, t_col_lse, row_lse, col_lse, grad_row, grad_col, grad_row_lse,
     grad_col_lse) = _in_stat(stat_dtype(query.dtype), scale, t_scale, t_row_lse, t_col_lse,
                              row_lse, col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse)
    return tuple(torch.ops.ck_native.soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale,
                                                   t_row_lse, t_col_lse, row_lse, col_lse,
                                                   grad_row, grad_col, grad_row_lse, grad_col_lse,
                                                   teacher_grad))
