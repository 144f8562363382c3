"""``@triton.jit`` helpers shared by the forward and backward kernels: the logit-tile loop.

Every kernel of the package sweeps tiles of ``S = s·A·Bᵀ`` (A-rows owned by the program, B-rows
swept). The unscaled tile ``A[rows]·B[cols]ᵀ`` is produced here, in one of two ways chosen at compile
time:

* ``D_SINGLE``: the whole (padded) feature dimension fits: the A block is resident in registers for
  the whole sweep and each B tile is loaded once (the caller loads it, because the backward reuses it
  for its second-stage dots);
* otherwise a GEMM main loop over D chunks of ``BLOCK_D``: both chunks are (re-)loaded per tile, the
  A chunks hitting L2.

Accumulation is float32 in both (``tl.dot``: tensor cores for 16-bit and TF32 operands, exact FFMA
for ``"ieee"`` float32). The caller multiplies by the scale once (``S = acc·s``), so the forward and
the backward round every logit identically.
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
def logit_tile(A, B, a, b, a_off, b_off, a_valid, b_valid, D,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               D_SINGLE: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Unscaled float32 tile ``A[rows]·B[cols]ᵀ`` (BLOCK_M × BLOCK_N).

    ``a``/``b``: the resident tiles when ``D_SINGLE`` (ignored otherwise: pass anything);
    ``a_off``/``b_off``: int64 element offsets of the rows; padded rows and features are zero.
    """
    if D_SINGLE:
        acc = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ac = load_rows(A, a_off, a_valid, d0, D, BLOCK_D)
            bc = load_rows(B, b_off, b_valid, d0, D, BLOCK_D)
            acc = tl.dot(ac, tl.trans(bc), acc, input_precision=INPUT_PRECISION)
    return acc
