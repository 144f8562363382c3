"""Triton kernels of the sigmoid (SigLIP) family (docs/math.md §7).

    sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal) -> row_loss (N,)
    sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row)
        -> (grad_query (N, D), grad_keys (M, D), grad_bias_row (N,))

``_sigmoid_fwd_kernel``: grid (row blocks, column splits); each program sweeps its columns
(``tiles.scaled_tile``) and sums ``softplus(−z·(S + b))`` per row from one ``exp(−|x|)`` per
element (``tiles.sigmoid_terms``: an accurate log1p, so the −10-biased negatives, each ~e^−10, are
not rounded to nothing). Partial row sums per split are folded on the host in a fixed order. The
backward is the generic kernel of ``backward.py`` with the sigmoid weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning as tu
from .backward import run_backward
from .tiles import load_rows, scaled_tile, sigmoid_terms


@triton.autotune(configs=tu.fwd_configs(),
                 key=["D", "N_KEY", "M_KEY", "BLOCK_M", "BLOCK_D", "D_SINGLE", "HAS_CLASSES", "DIAGONAL",
                      "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": tu.prune_fwd_by_smem})
@triton.jit
def _sigmoid_fwd_kernel(
    Q, K, scale_ptr, bias_ptr, rclass_ptr, cclass_ptr,
    part_ptr,                  # (SPLIT, N) float32 partial row sums
    N, M, D, cols_per_split, stride_q, stride_k,
    N_KEY, M_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, HAS_CLASSES: tl.constexpr, DIAGONAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    q_off = rows.to(tl.int64) * stride_q
    scale = tl.load(scale_ptr).to(tl.float32)
    bias = tl.load(bias_ptr).to(tl.float32)
    if D_SINGLE:
        q = load_rows(Q, q_off, row_valid, 0, D, BLOCK_D)
    else:
        q = 0
    if HAS_CLASSES:
        rc = tl.load(rclass_ptr + rows, mask=row_valid, other=0)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, M)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        ss, cols, col_valid, _, _ = scaled_tile(Q, K, q, q_off, row_valid, n0, col_hi, stride_k,
                                                scale, D, BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE,
                                                INPUT_PRECISION)
        lg = ss + bias
        if HAS_CLASSES:
            cc = tl.load(cclass_ptr + cols, mask=col_valid, other=0)
            x = tl.where(rc[:, None] == cc[None, :], -lg, lg)
        elif DIAGONAL:
            x = tl.where(rows[:, None] == cols[None, :], -lg, lg)
        else:
            x = lg  # every pair a negative (z = −1): softplus(L)
        sp, _ = sigmoid_terms(x)
        acc += tl.sum(tl.where(col_valid[None, :], sp, 0.0), axis=1)
    tl.store(part_ptr + pid_s.to(tl.int64) * N + rows, acc, mask=row_valid)


def sigmoid_fwd(query, keys, scale, bias, row_classes, col_classes, diagonal):
    """Per-row sums of softplus(−z·(scale·query·keysᵀ + bias)), float32 (N,)."""
    query, keys, row_classes, col_classes = tu.prepare(query, keys, row_classes, col_classes)
    t = tu.current_tuning()
    N, D = query.shape
    M = keys.shape[0]
    dev = query.device
    BM = t.fwd_block_m
    BD, d_single = tu.block_d(D, t.fwd_max_single_d, t.chunk_d)
    row_blocks = triton.cdiv(N, BM)
    split, cols_per_split = tu.plan_split(row_blocks, M, dev, t.split)
    part = torch.empty((split, N), dtype=torch.float32, device=dev)
    no_ints = torch.empty((1,), dtype=torch.int64, device=dev)
    classes = row_classes is not None
    with tu.device_guard(dev):
        _sigmoid_fwd_kernel[(row_blocks, split)](
            query, keys, scale, bias.float().contiguous(),
            row_classes if classes else no_ints, col_classes if classes else no_ints, part,
            N, M, D, cols_per_split, query.stride(0), keys.stride(0), tu.bucket(N), tu.bucket(M),
            BLOCK_M=BM, BLOCK_D=BD, D_SINGLE=d_single, HAS_CLASSES=classes,
            DIAGONAL=bool(diagonal), INPUT_PRECISION=tu.input_precision(query.dtype),
            **tu.LAUNCH_OPTS,
        )
    return part[0] if split == 1 else part.sum(0)


def sigmoid_bwd(query, keys, scale, bias, row_classes, col_classes, diagonal, grad_row):
    """(grad_query, grad_keys, grad_bias_row), float32, for G = grad_row·(−z)·σ(−z·L)."""
    return run_backward(query, keys, scale, sigmoid=True, bias=bias.float().contiguous(),
                        row_classes=row_classes, col_classes=col_classes, diagonal=diagonal,
                        grad_row=grad_row)
