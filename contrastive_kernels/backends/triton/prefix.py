"""Triton kernels of the prefix (Matryoshka) op families (docs/math.md §9; the contract is
``backends/_prefix.py``).

    lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, compute_col, **masks)
        -> (row_lse (k, N), col_lse (k, M) or (k, 0), pos (k, N), pos_count (N,) or (0,))
    lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                   **masks) -> (grad_query (N, D), grad_keys (M, D), row_dot (k, N), col_dot (k, M))
    sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal) -> (k, N)
    sigmoid_prefix_bwd(..., diagonal, grad_row (k, N))
        -> (grad_query, grad_keys, row_dot (k, N), col_dot (k, M), grad_bias_row (k, N))

For ``dims = (d_1 < … < d_k)`` the logit of prefix t is ``S^t = fl(fl(s·P^t)·r_t·c_t)`` with
``P^t = Σ_{u ≤ t} Z^u`` the running dot product over the D-segments ``[d_{u−1}, d_u)``. The segment
bounds travel as a small int32 tensor ``(0, d_1, …, d_k)``; k is a runtime value (one compiled
kernel for every k with the same power-of-two padding ``KP``), the per-prefix row statistics live in
``(BLOCK_M, KP)`` register arrays updated by a select on the prefix index.

Kernels
-------
``_prefix_fwd_kernel``  grid (row blocks of A, column splits). One program owns BLOCK_M rows of A
                        and sweeps its split of B in BLOCK_N tiles. Per tile the masks (self pair,
                        groups, guide dot — the same at every prefix) are formed once; then the
                        segments are accumulated in order into one running fp32 tile (chunks of
                        BLOCK_D inside a segment) and, after segment t, the online row
                        log-sum-exp (or the sigmoid row sums) and the positives of prefix t are
                        updated: every prefix for the GEMM work of one ``d_k``-wide product. The
                        column statistics are the same kernel launched on the transposed problem
                        (A = keys, B = queries, every per-row input swapped, ``Q_ON_A`` False):
                        the logits are formed in the query orientation there too (``s·r`` before
                        ``·c``), so both launches see the same rounded S. That is 2× the forward
                        FLOPs when ``compute_col``, but O(N + M) memory, no atomics,
                        deterministic. Per-split statistics (k, N) are folded on the host in split
                        order (logsumexp / sums).
``_prefix_bwd_kernel``  grid (row blocks of A, column splits). Per tile the prefixes are walked
                        from the last down: P^t is recomputed (the forward's segment/chunk order,
                        so the forward's bits), G^t formed from it (log-sum-exp or sigmoid
                        weights, excluded pairs a select to 0), Σ_j G·S and Σ_j G stored per row
                        and prefix, and ``U_t = Σ_{u ≥ t} s·r_u·c_u·G^u`` accumulated in
                        registers, so that segment t of the owned rows' gradient receives
                        ``U_t·B[:, seg t]`` (fp32 read-modify-write by the owner into its split's
                        private slice, the slices summed in split order; the second-stage dot is
                        fp32, TF32 for 16-bit inputs — no power-of-two G scaling needed). dQ comes
                        from the launch A = Q, B = K; dK and the column sums from the transposed
                        launch A = K, B = Q (as the ``two_pass`` mode of ``backward.py``).
                        First-stage work per tile is Σ_t d_t (the recomputation), second-stage d_k.

Determinism: both families are deterministic by construction (no atomics, fixed reduction order),
whatever ``CK_TRITON_DETERMINISTIC`` says; memory is O((N + M)·(D + k)) times the column splits
(``tuning.plan_split``: enough programs to fill the GPU twice; 1 under the interpreter unless
``CK_TRITON_SPLIT`` / ``tuning(split=…)`` forces more); nothing N×M is stored.
Columns past ``d_k`` get a zero gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning as tu
from .tiles import LOG2E, kept_pairs, load_rows, safe_max, sigmoid_terms


def _fwd_configs():
    if tu.interpreting():
        return tu.fwd_configs()
    # One config (every config costs a compile per specialisation on the GPU machine). Offline
    # sm_90 compiles (tools/triton_offline_compile.py --only prefix, triton 3.9, k = 3..5): the
    # per-prefix state arrays and the masks kept over the prefix loop take every config to 255
    # registers; 8 warps with BLOCK_N = 64 spill 0-190 B (336-424 B with class positives), while
    # BLOCK_N = 128 spills 80-1470 B and the 4-warp configs 450-1050 B. Not yet timed on a GPU.
    return [triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4)]


def _bwd_configs():
    if tu.interpreting():
        return tu.bwd_configs()
    # likewise: 8 warps, BLOCK_N = 64 spill 0-200 B; BLOCK_N = 128 280-730 B, 4 warps 500-1100 B
    return [triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2)]


def _prune(configs, named_args, **kwargs):
    """early_config_prune: the forward's shared-memory model with D chunked."""
    a = named_args["A"]
    limit = tu.smem_limit(a.device)
    bdg = kwargs["BLOCK_DG"] if kwargs.get("HAS_GUIDE", False) else 0
    est = [(tu.smem_estimate(c, a.element_size(), kwargs["BLOCK_M"], kwargs["BLOCK_D"], False,
                             bdg), i) for i, c in enumerate(configs)]
    keep = [configs[i] for e, i in est if e <= limit]
    return keep or [configs[min(est)[1]]]


@triton.jit
def _segment(A, B, a_off, a_valid, b_off, b_valid, lo, hi, acc, BLOCK_D: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    """acc + A[:, lo:hi]·B[:, lo:hi]ᵀ in chunks of BLOCK_D from ``lo`` (the one summation order)."""
    for d0 in range(lo, hi, BLOCK_D):
        ac = load_rows(A, a_off, a_valid, d0, hi, BLOCK_D)
        bc = load_rows(B, b_off, b_valid, d0, hi, BLOCK_D)
        acc = tl.dot(ac, tl.trans(bc), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _logits(acc, scale, fa_ptr, fb_ptr, rows64, row_valid, cols64, col_valid, t, K,
            HAS_RC: tl.constexpr, Q_ON_A: tl.constexpr):
    """S^t = fl(fl(s·P)·r·c) in the query orientation (r the query rows' factor)."""
    ss = acc * scale
    if HAS_RC:
        fa = tl.load(fa_ptr + rows64 * K + t, mask=row_valid, other=1.0)
        fb = tl.load(fb_ptr + cols64 * K + t, mask=col_valid, other=1.0)
        if Q_ON_A:
            ss = ss * fa[:, None] * fb[None, :]
        else:
            ss = ss * fb[None, :] * fa[:, None]
    return ss


@triton.jit
def _tile_masks(rows, cols, row_valid, col_valid, ca, cb_ptr, lab_a, labels_ptr, gra, grb_ptr,
                GA, GB, ga_off, stride_gb, thr_a, thr_ptr, DG,
                HAS_LABELS: tl.constexpr, HAS_CLASSES: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                HAS_GROUPS: tl.constexpr, HAS_GUIDE: tl.constexpr, MASKED: tl.constexpr,
                Q_ON_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DG: tl.constexpr, DG_SINGLE: tl.constexpr):
    """(kept (BLOCK_M, BLOCK_N) incl. validity, designated positives) of one tile, in the A × B
    orientation; the same at every prefix."""
    if HAS_CLASSES:
        cb = tl.load(cb_ptr + cols, mask=col_valid, other=0)
        desig = ca[:, None] == cb[None, :]
    elif Q_ON_A:
        desig = lab_a[:, None] == cols[None, :]
    else:  # A = keys, B = queries: B-row i is positive for A-row l_i
        if HAS_LABELS:
            lab_b = tl.load(labels_ptr + cols, mask=col_valid, other=-1)
        else:
            lab_b = cols
        desig = rows[:, None] == lab_b[None, :]
    valid = row_valid[:, None] & col_valid[None, :]
    if MASKED:
        if HAS_GUIDE:
            if Q_ON_A:
                thr = thr_a[:, None]
            else:  # the thresholds belong to the query rows, here the B rows
                thr = tl.load(thr_ptr + cols, mask=col_valid, other=0.0)[None, :]
        else:
            thr = 0.0
        kp = kept_pairs(rows, cols, col_valid, gra, grb_ptr, desig, GA, GB, ga_off, row_valid,
                        cols.to(tl.int64) * stride_gb, thr, DG, EXCLUDE_SELF, HAS_GROUPS,
                        HAS_GUIDE, BLOCK_M, BLOCK_N, BLOCK_DG, DG_SINGLE)
        keep = valid & kp
    else:
        keep = valid
    return keep, desig


@triton.autotune(configs=_fwd_configs(),
                 key=["D", "N_KEY", "M_KEY", "KP", "BLOCK_M", "BLOCK_D", "SIGMOID", "Q_ON_A",
                      "HAS_RC", "HAS_LABELS", "HAS_CLASSES", "EXCLUDE_SELF", "DIAGONAL",
                      "HAS_GROUPS", "HAS_GUIDE", "BLOCK_DG", "DG_SINGLE", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _prefix_fwd_kernel(
    A, B, scale_ptr, bias_ptr, bounds_ptr,  # bounds: int32 (K + 1,) = (0, d_1, …, d_k)
    fa_ptr, fb_ptr,            # float32 (NA, K) / (NB, K) factors [HAS_RC]
    labels_ptr, ca_ptr, cb_ptr, gra_ptr, grb_ptr, GA, GB, thr_ptr,
    out_ptr, pos_ptr, cnt_ptr,  # (K, NA) lse or sigmoid sums, (K, NA) positives, (NA,) counts
    NA, NB, K, D, stride_a, stride_b, DG, stride_ga, stride_gb, cols_per_split,
    N_KEY, M_KEY,
    KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SIGMOID: tl.constexpr, Q_ON_A: tl.constexpr, HAS_RC: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CLASSES: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    DIAGONAL: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_GUIDE: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_DG: tl.constexpr, DG_SINGLE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)  # column split: columns [pid_s·cols_per_split, …) of B
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < NA
    rows64 = rows.to(tl.int64)
    a_off = rows64 * stride_a
    scale = tl.load(scale_ptr).to(tl.float32)
    kidx = tl.arange(0, KP)
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    if HAS_CLASSES:
        ca = tl.load(ca_ptr + rows, mask=row_valid, other=0)
    else:
        ca = 0
    if Q_ON_A:
        if HAS_LABELS:
            lab_a = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
        else:
            lab_a = rows
    else:
        lab_a = 0
    if HAS_GROUPS:
        gra = tl.load(gra_ptr + rows, mask=row_valid, other=0)
    else:
        gra = 0
    if HAS_GUIDE:
        ga_off = rows64 * stride_ga
        if Q_ON_A:
            thr_a = tl.load(thr_ptr + rows, mask=row_valid, other=0.0)
        else:
            thr_a = 0.0
    else:
        ga_off = 0
        thr_a = 0.0
    m_all = tl.full((BLOCK_M, KP), float("-inf"), dtype=tl.float32)
    l_all = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    pos_all = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lo = pid_s * cols_per_split  # a multiple of every BLOCK_N
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < col_hi
        cols64 = cols.to(tl.int64)
        b_off = cols64 * stride_b
        keep, desig = _tile_masks(rows, cols, row_valid, col_valid, ca, cb_ptr, lab_a, labels_ptr,
                                  gra, grb_ptr, GA, GB, ga_off, stride_gb, thr_a, thr_ptr, DG,
                                  HAS_LABELS, HAS_CLASSES, EXCLUDE_SELF, HAS_GROUPS, HAS_GUIDE,
                                  MASKED, Q_ON_A, BLOCK_M, BLOCK_N, BLOCK_DG, DG_SINGLE)
        if SIGMOID:
            if HAS_CLASSES:
                posm = desig
            elif DIAGONAL:
                posm = rows[:, None] == cols[None, :]
            else:
                posm = (rows[:, None] < 0) & (cols[None, :] < 0)  # no positives
        else:
            hit = keep & desig  # never a positive on an excluded pair
            if Q_ON_A and HAS_CLASSES:
                cnt += tl.sum(hit.to(tl.float32), axis=1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, K):
            lo = tl.load(bounds_ptr + t)
            hi = tl.load(bounds_ptr + t + 1)
            acc = _segment(A, B, a_off, row_valid, b_off, col_valid, lo, hi, acc, BLOCK_D,
                           INPUT_PRECISION)
            ss = _logits(acc, scale, fa_ptr, fb_ptr, rows64, row_valid, cols64, col_valid, t, K,
                         HAS_RC, Q_ON_A)
            sel = kidx[None, :] == t
            if SIGMOID:
                lg = ss + bias
                x = tl.where(posm, -lg, lg)
                sp, _ = sigmoid_terms(x)
                part = tl.sum(tl.where(keep, sp, 0.0), axis=1)
                l_all += tl.where(sel, part[:, None], 0.0)
            else:
                s_r = tl.where(keep, ss, float("-inf"))
                m_old = tl.max(tl.where(sel, m_all, float("-inf")), axis=1)
                l_old = tl.sum(tl.where(sel, l_all, 0.0), axis=1)
                m_new = tl.maximum(m_old, tl.max(s_r, axis=1))
                shift = safe_max(m_new)  # nothing kept yet: shift by 0, exp2(−inf) = 0
                l_new = l_old * tl.exp2((m_old - shift) * LOG2E) + \
                    tl.sum(tl.exp2((s_r - shift[:, None]) * LOG2E), axis=1)
                m_all = tl.where(sel, m_new[:, None], m_all)
                l_all = tl.where(sel, l_new[:, None], l_all)
                if Q_ON_A:
                    pos_all += tl.where(sel, tl.sum(tl.where(hit, ss, 0.0), axis=1)[:, None], 0.0)
    # this split's (K, NA) slice of the (SPLIT, K, NA) outputs, folded on the host in split order
    o_off = (pid_s * K + kidx[None, :]).to(tl.int64) * NA + rows64[:, None]
    omask = row_valid[:, None] & (kidx[None, :] < K)
    if SIGMOID:
        tl.store(out_ptr + o_off, l_all, mask=omask)
    else:
        alive = l_all > 0.0
        lse = tl.where(alive, m_all + tl.log(tl.where(alive, l_all, 1.0)), float("-inf"))
        tl.store(out_ptr + o_off, lse, mask=omask)
        if Q_ON_A:
            tl.store(pos_ptr + o_off, pos_all, mask=omask)
            if HAS_CLASSES:
                tl.store(cnt_ptr + pid_s.to(tl.int64) * NA + rows, cnt, mask=row_valid)


@triton.autotune(configs=_bwd_configs(),
                 key=["D", "NA_KEY", "NB_KEY", "KP", "BLOCK_M", "BLOCK_D", "SIGMOID", "Q_ON_A",
                      "HAS_RC", "HAS_GA", "HAS_GB", "HAS_GPOS", "HAS_LABELS", "HAS_CLASSES",
                      "EXCLUDE_SELF", "DIAGONAL", "HAS_GROUPS", "HAS_GUIDE", "BLOCK_DG",
                      "DG_SINGLE", "INPUT_PRECISION"],
                 reset_to_zero=["dA_ptr"])
@triton.jit
def _prefix_bwd_kernel(
    A, B, scale_ptr, bias_ptr, bounds_ptr, fa_ptr, fb_ptr,
    labels_ptr, ca_ptr, cb_ptr, gra_ptr, grb_ptr, GA, GB, thr_ptr,
    lse_a_ptr, g_a_ptr,        # (K, NA): statistic and upstream weight of the A rows
    lse_b_ptr, g_b_ptr,        # (K, NB): of the B rows
    gpos_ptr,                  # (K, N) upstream of the positives, per query row
    dA_ptr,                    # float32 (NA, D), zero-initialised, owner read-modify-write
    dot_ptr, gsum_ptr,         # (K, NA): Σ_j G·S and Σ_j G [EMIT_GSUM]
    NA, NB, K, D, stride_a, stride_b, DG, stride_ga, stride_gb, cols_per_split,
    NA_KEY, NB_KEY,
    KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SIGMOID: tl.constexpr, Q_ON_A: tl.constexpr, HAS_RC: tl.constexpr,
    HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, HAS_GPOS: tl.constexpr, EMIT_GSUM: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CLASSES: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    DIAGONAL: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_GUIDE: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_DG: tl.constexpr, DG_SINGLE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT2_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)  # column split: columns [pid_s·cols_per_split, …) of B
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < NA
    rows64 = rows.to(tl.int64)
    a_off = rows64 * stride_a
    scale = tl.load(scale_ptr).to(tl.float32)
    kidx = tl.arange(0, KP)
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    if HAS_CLASSES:
        ca = tl.load(ca_ptr + rows, mask=row_valid, other=0)
    else:
        ca = 0
    if Q_ON_A:
        if HAS_LABELS:
            lab_a = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
        else:
            lab_a = rows
    else:
        lab_a = 0
    if HAS_GROUPS:
        gra = tl.load(gra_ptr + rows, mask=row_valid, other=0)
    else:
        gra = 0
    if HAS_GUIDE:
        ga_off = rows64 * stride_ga
        if Q_ON_A:
            thr_a = tl.load(thr_ptr + rows, mask=row_valid, other=0.0)
        else:
            thr_a = 0.0
    else:
        ga_off = 0
        thr_a = 0.0
    da_base = dA_ptr + pid_s.to(tl.int64) * NA * D  # this split's private (NA, D) slice
    dot_all = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    gsum_all = tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    offs_d = tl.arange(0, BLOCK_D)
    col_lo = pid_s * cols_per_split  # a multiple of every BLOCK_N
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < col_hi
        cols64 = cols.to(tl.int64)
        b_off = cols64 * stride_b
        keep, desig = _tile_masks(rows, cols, row_valid, col_valid, ca, cb_ptr, lab_a, labels_ptr,
                                  gra, grb_ptr, GA, GB, ga_off, stride_gb, thr_a, thr_ptr, DG,
                                  HAS_LABELS, HAS_CLASSES, EXCLUDE_SELF, HAS_GROUPS, HAS_GUIDE,
                                  MASKED, Q_ON_A, BLOCK_M, BLOCK_N, BLOCK_DG, DG_SINGLE)
        if SIGMOID:
            if HAS_CLASSES:
                posm = desig
            elif DIAGONAL:
                posm = rows[:, None] == cols[None, :]
            else:
                posm = (rows[:, None] < 0) & (cols[None, :] < 0)
        else:
            hit = keep & desig
        u_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for tt in range(0, K):
            t = K - 1 - tt
            # P^t recomputed in the forward's segment/chunk order: the forward's bits
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for u in range(0, t + 1):
                lo = tl.load(bounds_ptr + u)
                hi = tl.load(bounds_ptr + u + 1)
                acc = _segment(A, B, a_off, row_valid, b_off, col_valid, lo, hi, acc, BLOCK_D,
                               INPUT_PRECISION)
            ss = _logits(acc, scale, fa_ptr, fb_ptr, rows64, row_valid, cols64, col_valid, t, K,
                         HAS_RC, Q_ON_A)
            if SIGMOID:
                lg = ss + bias
                x = tl.where(posm, -lg, lg)
                _, sig = sigmoid_terms(x)
                w = tl.where(posm, -sig, sig)
                if HAS_GA:
                    ga = tl.load(g_a_ptr + t * NA + rows, mask=row_valid, other=0.0)
                    g = ga[:, None] * w
                else:
                    gb = tl.load(g_b_ptr + t * NB + cols, mask=col_valid, other=0.0)
                    g = gb[None, :] * w
            else:
                g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if HAS_GA:
                    ga = tl.load(g_a_ptr + t * NA + rows, mask=row_valid, other=0.0)
                    lse_a = tl.load(lse_a_ptr + t * NA + rows, mask=row_valid, other=0.0)
                    g += ga[:, None] * tl.exp2((ss - lse_a[:, None]) * LOG2E)
                if HAS_GB:
                    gb = tl.load(g_b_ptr + t * NB + cols, mask=col_valid, other=0.0)
                    lse_b = tl.load(lse_b_ptr + t * NB + cols, mask=col_valid, other=0.0)
                    g += gb[None, :] * tl.exp2((ss - lse_b[None, :]) * LOG2E)
                # a select, not a multiply: exp(S − lse) of a row with nothing kept may be inf
                g = tl.where(keep, g, 0.0)
                if HAS_GPOS:
                    if Q_ON_A:
                        gp = tl.load(gpos_ptr + t * NA + rows, mask=row_valid, other=0.0)
                        g += tl.where(hit, gp[:, None], 0.0)
                    else:
                        gp = tl.load(gpos_ptr + t * NB + cols, mask=col_valid, other=0.0)
                        g += tl.where(hit, gp[None, :], 0.0)
            g = tl.where(row_valid[:, None] & col_valid[None, :], g, 0.0)
            sel = kidx[None, :] == t
            dot_all += tl.where(sel, tl.sum(g * ss, axis=1)[:, None], 0.0)
            if EMIT_GSUM:
                gsum_all += tl.where(sel, tl.sum(g, axis=1)[:, None], 0.0)
            h = g * scale
            if HAS_RC:
                fa = tl.load(fa_ptr + rows64 * K + t, mask=row_valid, other=1.0)
                fb = tl.load(fb_ptr + cols64 * K + t, mask=col_valid, other=1.0)
                h = h * fa[:, None] * fb[None, :]
            u_acc += h
            # segment t of the owned rows' gradient: U_t · B[:, seg t]
            lo_t = tl.load(bounds_ptr + t)
            hi_t = tl.load(bounds_ptr + t + 1)
            for d0 in range(lo_t, hi_t, BLOCK_D):
                bc = load_rows(B, b_off, col_valid, d0, hi_t, BLOCK_D).to(tl.float32)
                da = tl.dot(u_acc, bc, input_precision=DOT2_PRECISION)
                dd = d0 + offs_d
                da_ptrs = da_base + rows64[:, None] * D + dd[None, :]
                dmask = row_valid[:, None] & (dd < hi_t)[None, :]
                # owner RMW; the barrier orders the load after the previous tile's store whatever
                # thread layouts the compiler gives them (as in backward.py)
                tl.debug_barrier()
                cur = tl.load(da_ptrs, mask=dmask, other=0.0)
                tl.store(da_ptrs, cur + da, mask=dmask)
    o_off = (pid_s * K + kidx[None, :]).to(tl.int64) * NA + rows64[:, None]
    omask = row_valid[:, None] & (kidx[None, :] < K)
    tl.store(dot_ptr + o_off, dot_all, mask=omask)
    if EMIT_GSUM:
        tl.store(gsum_ptr + o_off, gsum_all, mask=omask)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _check_dims(dims, D: int) -> tuple[int, ...]:
    dims = tuple(int(d) for d in dims)
    if not dims or any(b <= a for a, b in zip((0,) + dims[:-1], dims)) or dims[-1] > D:
        raise ValueError(f"dims must be strictly increasing positive dimensions ≤ D = {D}, "
                         f"got {dims}")
    return dims


def _factors(row_scale, col_scale, N: int, M: int, k: int, dev):
    """The (N, k) / (M, k) float32 factors, or (None, None); one given alone: the other is ones."""
    if row_scale is None and col_scale is None:
        return None, None
    f32 = dict(dtype=torch.float32, device=dev)
    r = torch.ones((N, k), **f32) if row_scale is None else row_scale.to(**f32).contiguous()
    c = torch.ones((M, k), **f32) if col_scale is None else col_scale.to(**f32).contiguous()
    if r.shape != (N, k) or c.shape != (M, k):
        raise ValueError(f"row_scale/col_scale must be ({N}, {k})/({M}, {k}), got "
                         f"{tuple(r.shape)}/{tuple(c.shape)}")
    return r, c


class _Plan:
    """The shared launch arguments of one call; ``side(transposed)`` the per-orientation ones."""

    def __init__(self, query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                 col_classes, exclude_self, masks, bias=None, diagonal=False):
        query, keys, labels, row_classes, col_classes = tu.prepare(query, keys, labels, row_classes,
                                                                    col_classes)
        (self.row_groups, self.col_groups, self.guide_query, self.guide_keys,
         self.guide_threshold) = tu.prepare_masks(query, keys, *(masks.get(n) for n in (
             "row_groups", "col_groups", "guide_query", "guide_keys", "guide_threshold")))
        self.query, self.keys, self.labels = query, keys, labels
        self.row_classes, self.col_classes = row_classes, col_classes
        self.N, self.D = query.shape
        self.M = keys.shape[0]
        self.dev = query.device
        self.dims = _check_dims(dims, self.D)
        self.k = len(self.dims)
        self.KP = max(2, triton.next_power_of_2(self.k))
        self.bounds = torch.tensor((0,) + self.dims, dtype=torch.int32, device=self.dev)
        self.r, self.c = _factors(row_scale, col_scale, self.N, self.M, self.k, self.dev)
        self.scale = scale.to(device=self.dev, dtype=torch.float32).reshape(1).contiguous()
        self.f32 = dict(dtype=torch.float32, device=self.dev)
        self.dummy = torch.empty((1,), **self.f32)
        self.no_ints = torch.empty((1,), dtype=torch.int64, device=self.dev)
        self.bias = self.dummy if bias is None else bias.to(**self.f32).reshape(1).contiguous()
        self.diagonal = bool(diagonal)
        self.exclude_self = bool(exclude_self)
        self.groups = self.row_groups is not None
        self.guide = self.guide_query is not None
        self.t = tu.current_tuning()
        self.BD = max(16, min(self.t.chunk_d, triton.next_power_of_2(self.D)))
        DG = self.guide_query.shape[1] if self.guide else 0
        self.DG = DG
        self.BDG, self.dg_single = tu.block_dg(DG, self.t.guide_chunk_d)
        self.prec = tu.input_precision(query.dtype)
        self.prec2 = "ieee" if self.prec == "ieee" else "tf32"

    def i(self, x):
        return self.no_ints if x is None else x

    def side(self, transposed: bool) -> dict:
        """A/B operands and per-row inputs of the launch with A = queries (or keys)."""
        p = self
        if not transposed:
            return dict(A=p.query, B=p.keys, fa=p.r, fb=p.c, ca=p.row_classes, cb=p.col_classes,
                        gra=p.row_groups, grb=p.col_groups, GA=p.guide_query, GB=p.guide_keys)
        return dict(A=p.keys, B=p.query, fa=p.c, fb=p.r, ca=p.col_classes, cb=p.row_classes,
                    gra=p.col_groups, grb=p.row_groups, GA=p.guide_keys, GB=p.guide_query)

    def common(self, s: dict, transposed: bool, sigmoid: bool) -> tuple[list, dict]:
        p = self
        A, B = s["A"], s["B"]
        args = [A, B, p.scale, p.bias, p.bounds,
                s["fa"] if p.r is not None else p.dummy, s["fb"] if p.r is not None else p.dummy,
                p.i(p.labels), p.i(s["ca"]), p.i(s["cb"]), p.i(s["gra"]), p.i(s["grb"]),
                s["GA"] if p.guide else p.dummy, s["GB"] if p.guide else p.dummy,
                p.guide_threshold if p.guide else p.dummy]
        masked = (p.exclude_self or p.groups or p.guide) and not sigmoid
        kw = dict(KP=p.KP, BLOCK_D=p.BD, SIGMOID=sigmoid, Q_ON_A=not transposed,
                  HAS_RC=p.r is not None, HAS_LABELS=p.labels is not None,
                  HAS_CLASSES=p.row_classes is not None,
                  EXCLUDE_SELF=p.exclude_self and not sigmoid, DIAGONAL=p.diagonal,
                  HAS_GROUPS=p.groups and not sigmoid, HAS_GUIDE=p.guide and not sigmoid,
                  MASKED=bool(masked), BLOCK_DG=p.BDG, DG_SINGLE=p.dg_single,
                  INPUT_PRECISION=p.prec)
        return args, kw

    def tail(self, s: dict, cols_per_split: int) -> list:
        p = self
        A, B = s["A"], s["B"]
        return [A.shape[0], B.shape[0], p.k, p.D, A.stride(0), B.stride(0), p.DG,
                s["GA"].stride(0) if p.guide else 0, s["GB"].stride(0) if p.guide else 0,
                cols_per_split, tu.bucket(A.shape[0]), tu.bucket(B.shape[0])]

    def plan(self, NA: int, NB: int, BM: int) -> tuple[int, int, int]:
        """(row blocks, column splits, columns per split): the splits fill the GPU as in the
        other kernels (``tuning.plan_split``; one split under the interpreter unless forced)."""
        row_blocks = triton.cdiv(NA, BM)
        split, cps = tu.plan_split(row_blocks, NB, self.dev, self.t.split)
        return row_blocks, split, cps

    def forward(self, transposed: bool, sigmoid: bool):
        """(out (k, NA), pos (k, NA), cnt (NA,)) of one forward launch."""
        p = self
        s = p.side(transposed)
        NA = s["A"].shape[0]
        BM = p.t.fwd_block_m
        row_blocks, split, cps = p.plan(NA, s["B"].shape[0], BM)
        out = torch.empty((split, p.k, NA), **p.f32)
        want_pos = not transposed and not sigmoid
        pos = torch.empty((split, p.k, NA), **p.f32) if want_pos else p.dummy
        classes = p.row_classes is not None
        cnt = torch.empty((split, NA), **p.f32) if want_pos and classes else p.dummy
        args, kw = p.common(s, transposed, sigmoid)
        with tu.device_guard(p.dev):
            _prefix_fwd_kernel[(row_blocks, split)](
                *args, out, pos, cnt, *p.tail(s, cps), BLOCK_M=BM, **kw, **tu.LAUNCH_OPTS)
        if split == 1:
            return out[0], (pos[0] if want_pos else pos), (cnt[0] if cnt.dim() == 2 else cnt)
        # fold the splits in order (deterministic): per-split lse by logsumexp (−inf where a
        # split kept nothing), sigmoid sums, positives and counts by sums
        out = out.sum(0) if sigmoid else torch.logsumexp(out, 0)
        return (out, pos.sum(0) if want_pos else pos, cnt.sum(0) if cnt.dim() == 2 else cnt)

    def backward(self, transposed: bool, sigmoid: bool, lse_a, g_a, lse_b, g_b, gpos,
                 emit_gsum: bool):
        """(dA (NA, D), dot (k, NA), gsum (k, NA) or None) of one backward launch."""
        p = self
        s = p.side(transposed)
        NA = s["A"].shape[0]
        BM = p.t.bwd_block_m
        row_blocks, split, cps = p.plan(NA, s["B"].shape[0], BM)
        # one private gradient slice per split (no atomics), summed below in split order
        dA = torch.zeros((split, NA, p.D), **p.f32)
        dot = torch.empty((split, p.k, NA), **p.f32)
        gsum = torch.empty((split, p.k, NA), **p.f32) if emit_gsum else p.dummy
        args, kw = p.common(s, transposed, sigmoid)

        def c(x):
            return p.dummy if x is None else x.to(**p.f32).contiguous()

        with tu.device_guard(p.dev):
            _prefix_bwd_kernel[(row_blocks, split)](
                *args, c(lse_a), c(g_a), c(lse_b), c(g_b), c(gpos), dA, dot, gsum, *p.tail(s, cps),
                BLOCK_M=BM, HAS_GA=g_a is not None, HAS_GB=g_b is not None,
                HAS_GPOS=gpos is not None and not sigmoid, EMIT_GSUM=emit_gsum,
                DOT2_PRECISION=p.prec2, **kw, **tu.LAUNCH_OPTS)
        if split == 1:
            return dA[0], dot[0], (gsum[0] if emit_gsum else None)
        return dA.sum(0), dot.sum(0), (gsum.sum(0) if emit_gsum else None)


def lse_prefix_fwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, compute_col, **masks):
    """Per-prefix row/column log-sum-exp and positives (module docstring)."""
    p = _Plan(query, keys, scale, dims, row_scale, col_scale, labels, row_classes, col_classes,
              exclude_self, masks)
    row, pos, cnt = p.forward(False, False)
    col = p.forward(True, False)[0] if compute_col else torch.empty((p.k, 0), **p.f32)
    count = cnt if p.row_classes is not None else torch.empty((0,), **p.f32)
    return row, col, pos, count


def lse_prefix_bwd(query, keys, scale, dims, row_scale, col_scale, labels, row_classes,
                   col_classes, exclude_self, row_lse, col_lse, grad_row, grad_col, grad_pos,
                   **masks):
    """(grad_query, grad_keys, row_dot, col_dot): one launch per side (module docstring)."""
    p = _Plan(query, keys, scale, dims, row_scale, col_scale, labels, row_classes, col_classes,
              exclude_self, masks)
    if grad_row is None and grad_col is None and grad_pos is None:
        return (torch.zeros((p.N, p.D), **p.f32), torch.zeros((p.M, p.D), **p.f32),
                torch.zeros((p.k, p.N), **p.f32), torch.zeros((p.k, p.M), **p.f32))
    if grad_col is None:
        col_lse = None
    gq, row_dot, _ = p.backward(False, False, row_lse, grad_row, col_lse, grad_col, grad_pos, False)
    gk, col_dot, _ = p.backward(True, False, col_lse, grad_col, row_lse, grad_row, grad_pos, False)
    return gq, gk, row_dot, col_dot


def sigmoid_prefix_fwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal):
    """Per-prefix row sums (k, N) of softplus(−z·(S^t + b))."""
    p = _Plan(query, keys, scale, dims, row_scale, col_scale, None, row_classes, col_classes,
              False, {}, bias=bias, diagonal=diagonal)
    return p.forward(False, True)[0]


def sigmoid_prefix_bwd(query, keys, scale, bias, dims, row_scale, col_scale, row_classes,
                       col_classes, diagonal, grad_row):
    """(grad_query, grad_keys, row_dot, col_dot, grad_bias_row)."""
    p = _Plan(query, keys, scale, dims, row_scale, col_scale, None, row_classes, col_classes,
              False, {}, bias=bias, diagonal=diagonal)
    gq, row_dot, gb = p.backward(False, True, None, grad_row, None, None, None, True)
    gk, col_dot, _ = p.backward(True, True, None, None, None, grad_row, None, False)
    return gq, gk, row_dot, col_dot, gb
