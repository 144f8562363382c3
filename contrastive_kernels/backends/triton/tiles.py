"""``@triton.jit`` helpers shared by every kernel: the logit-tile step of the sweep, and the
element-wise functions both passes need.

Every kernel of the package sweeps tiles of ``S = s·A·Bᵀ``: a program owns BLOCK_M rows of A and
walks the columns of B in BLOCK_N tiles. :func:`scaled_tile` is one step of that walk — column
indices, masks, the B tile and the scaled logits — in one of two forms chosen at compile time:

* ``D_SINGLE``: the whole (padded) feature dimension fits: the A block is resident in registers for
  the whole sweep and each B tile is loaded once (and returned, because the backward reuses it for
  its second-stage dot);
* otherwise a GEMM main loop over D chunks of ``BLOCK_D``: both chunks are (re-)loaded per tile, the
  A chunks hitting L2.

Accumulation is float32 in both (``tl.dot``: tensor cores for 16-bit and TF32 operands, exact FFMA
for ``"ieee"`` float32). The logit is rounded once, ``S = fl(acc·s)``, here and nowhere else, so the
forward, the backward and the positives see the same bits (FP contraction is off at launch:
``tuning.LAUNCH_OPTS``).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def load_rows(P, row_off, valid, d0, D, BLOCK_D: tl.constexpr):
    """Rows ``row_off`` (element offsets, int64) of P, features [d0, d0 + BLOCK_D), masked to 0."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    return tl.load(P + row_off[:, None] + offs_d[None, :],
                   mask=valid[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def scaled_tile(A, B, a, a_off, a_valid, n0, col_hi, stride_b, scale, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                D_SINGLE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One step of the column sweep: ``(S tile (BLOCK_M, BLOCK_N) float32, cols, col_valid,
    b_off, b)`` for columns [n0, n0 + BLOCK_N) of B, masked at ``col_hi``.

    ``a``: the resident A block when ``D_SINGLE`` (ignored otherwise: pass anything); ``b``: the B
    tile when ``D_SINGLE`` (0 otherwise). Padded rows and features contribute zeros; the caller
    masks padded elements of S itself (what a padded element must be depends on the statistic).
    """
    cols = n0 + tl.arange(0, BLOCK_N)
    col_valid = cols < col_hi
    b_off = cols.to(tl.int64) * stride_b
    if D_SINGLE:
        b = load_rows(B, b_off, col_valid, 0, D, BLOCK_D)
        acc = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    else:
        b = 0  # unused by the callers when D is chunked
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ac = load_rows(A, a_off, a_valid, d0, D, BLOCK_D)
            bc = load_rows(B, b_off, col_valid, d0, D, BLOCK_D)
            acc = tl.dot(ac, tl.trans(bc), acc, input_precision=INPUT_PRECISION)
    return acc * scale, cols, col_valid, b_off, b


@triton.jit
def safe_max(m):
    """``m`` with −inf replaced by 0: the shift of an online log-sum-exp whose elements are all
    excluded, so that ``exp2((x − shift)·log2e)`` gives 0 for x = −inf instead of NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def log1p_small(t):
    """log(1 + t) for t ∈ [0, 1], accurate to a few ulps also for tiny t (where 1 + t rounds): the
    classic correction log(u)·t/(u − 1) with u = fl(1 + t) (Goldberg 1991)."""
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def sigmoid_terms(x):
    """(softplus(x), σ(x)) from one t = exp(−|x|): softplus = max(x, 0) + log1p(t),
    σ = 1/(1 + t) for x ≥ 0 and t/(1 + t) below; no overflow for any finite x."""
    t = tl.exp2(-tl.abs(x) * LOG2E)
    sp = tl.maximum(x, 0.0) + log1p_small(t)
    inv = 1.0 / (1.0 + t)
    sig = tl.where(x >= 0, inv, t * inv)
    return sp, sig
