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
def guide_tile(GA, GB, ga_off, a_valid, b_off, b_valid, DG,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DG: tl.constexpr,
               DG_SINGLE: tl.constexpr):
    """The guide similarities ⟨ga_i, gb_j⟩ of a tile (BLOCK_M, BLOCK_N), float32 in full IEEE
    precision (``input_precision="ieee"``: FFMA, never TF32, because they are compared with a strict
    ``>`` against a threshold; the k order is the same in every orientation and chunking, so the
    forward, the fused/gemm backward and the transposed two-pass launch see the same bits on the
    GPU). ``ga_off``/``b_off``: row offsets (int64, elements) into the float32 guides. One dot when
    Dg fits one chunk (``DG_SINGLE``), else a small K-loop; nothing N×M is ever stored."""
    if DG_SINGLE:
        ga = load_rows(GA, ga_off, a_valid, 0, DG, BLOCK_DG)
        gb = load_rows(GB, b_off, b_valid, 0, DG, BLOCK_DG)
        sim = tl.dot(ga, tl.trans(gb), input_precision="ieee")
    else:
        sim = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d0 in range(0, DG, BLOCK_DG):
            ga = load_rows(GA, ga_off, a_valid, d0, DG, BLOCK_DG)
            gb = load_rows(GB, b_off, b_valid, d0, DG, BLOCK_DG)
            sim = tl.dot(ga, tl.trans(gb), sim, input_precision="ieee")
    return sim


@triton.jit
def kept_pairs(rows, cols, b_valid, ga_grp, gb_grp_ptr, designated, GA, GB, ga_off, a_valid,
               b_off, thr, DG, EXCLUDE_SELF: tl.constexpr, HAS_GROUPS: tl.constexpr,
               HAS_GUIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DG: tl.constexpr, DG_SINGLE: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: the pairs of the tile that are *not* excluded (op contract): the
    self pair under ``EXCLUDE_SELF``; same-group pairs under ``HAS_GROUPS`` (``ga_grp``: groups of
    the A rows, ``gb_grp_ptr``: groups of the B rows, loaded here); under ``HAS_GUIDE`` the pairs
    whose guide similarity is > ``thr`` (broadcastable: (BLOCK_M, 1) when the thresholds belong to
    the A rows, (1, BLOCK_N) in the transposed launch) unless ``designated``. Validity of padded
    rows/columns is the caller's business (a padded element needs a different value per statistic).
    """
    kp = tl.full((BLOCK_M, BLOCK_N), 1, tl.int1)
    if EXCLUDE_SELF:
        kp = kp & (rows[:, None] != cols[None, :])
    if HAS_GROUPS:
        gb_grp = tl.load(gb_grp_ptr + cols, mask=b_valid, other=0)
        kp = kp & (ga_grp[:, None] != gb_grp[None, :])
    if HAS_GUIDE:
        sim = guide_tile(GA, GB, ga_off, a_valid, b_off, b_valid, DG, BLOCK_M, BLOCK_N, BLOCK_DG,
                         DG_SINGLE)
        kp = kp & (designated | ~(sim > thr))
    return kp


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
