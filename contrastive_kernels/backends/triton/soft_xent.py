"""Triton kernels of the soft-target cross-entropy family (docs/math.md §10; the contract is
``backends/_soft_xent.py``).

    soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col)
        -> (row_cross (N,), col_cross (M,) or (0,), row_lse (N,), col_lse (M,) or (0,))
    soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse,
                  col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse, teacher_grad)
        -> (grad_query (N, D), grad_keys (M, D), grad_t_query (N, Dt) or (0,), grad_t_keys (M, Dt)
            or (0,))

Two logit tiles side by side over the same pairs: the student's ``S = s·Q·Kᵀ`` (D loop) and the
teacher's ``T = t·A·Bᵀ`` (its own Dt loop and dtype), each ``tiles.scaled_tile`` (float32
accumulation, one rounding ``fl(acc·scale)``; the scales are read on the device). Nothing N×M is
stored. Every kernel is written for "A rows against B rows": the column statistics and gradients
are the same kernel launched on the transposed problem (student K against Q, teacher B against A,
the column log-sum-exp and upstream weights as the A rows'), as in ``prefix.py``.

Kernels
-------
``_soft_xent_fwd_kernel``  grid (row blocks, column splits). One program owns BLOCK_M rows and
                           sweeps its split of the columns: ``cross_i += Σ_j e^{T_ij − a_i}·S_ij``
                           and the student's online log-sum-exp of the same S tile (running max
                           and rescaled sum, every exponential one ``exp2`` of (S − max)·log2(e),
                           as ``forward.py``). Per-split sums and per-split log-sum-exps (SPLIT,
                           NA) are folded on the host in split order (sum, ``torch.logsumexp``):
                           deterministic.
``_soft_xent_bwd_kernel``  grid (row blocks, column splits). Per tile the cross part
                           ``G^X_ij = g_i·e^{T_ij − a_i} + h_j·e^{T_ij − b_j}`` (a, g of the A rows,
                           b, h of the B rows; the teacher tile is not even formed when neither is
                           given, ``CROSS``) and the student's ``G^S = G^X + u_i·e^{S_ij − r_i} +
                           v_j·e^{S_ij − c_j}`` (r, u: the student's log-sum-exp and its upstream
                           weight of the A rows, c, v of the B rows), then ``dA_S += s·G^S·B_S``
                           and (``TEACHER``) ``dA_T += t·(G^X∘S)·B_T``: accumulated in registers
                           when the feature row is resident (``D_SINGLE`` / ``DT_SINGLE``), else
                           read-modify-written per D-chunk by the owner into its split's private
                           float32 slice. The
                           second-stage dots are float32 (TF32 unless the input precision is
                           "ieee", as in ``prefix.py``: no power-of-two scaling of G needed).
                           Launch 1 (A = Q) gives grad_query / grad_t_query, launch 2 (A = K)
                           grad_keys / grad_t_keys: two passes, no atomics, bitwise repeatable.

float64 inputs are rejected (``tuning.prepare``), as by every Triton kernel of the package; the
statistics and gradients are float32. The two feature rows share the register budget of one
resident row (``_block_ds``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning as tu
from .tiles import LOG2E, load_rows, scaled_tile


def _fwd_configs():
    if tu.interpreting():
        return tu.fwd_configs()
    # In order of preference; ``_prune`` keeps the first that fits (one compile per
    # specialisation): two operand pairs are pipelined, twice the forward's shared memory.
    # Offline sm_90 compiles (triton 3.9) fit the shared memory at bf16 D/Dt = 512/768, 200/96,
    # fp32 128/128; the backward still spills a little (48-96 B at D/Dt = 128/128 fp32 and at a
    # frozen teacher's resident Dt = 96 beside the student's log-sum-exp term; none with no
    # resident row over 64). Not yet timed on a GPU.
    return [triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2)]


def _bwd_configs():
    if tu.interpreting():
        return tu.bwd_configs()
    return [triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2)]


def _prune(configs, named_args, **kwargs):
    """early_config_prune: the first config whose shared memory — the forward's model
    (``tuning.smem_estimate``) summed over the student's and the teacher's operands — fits the
    device; the smallest when none does (the launch error then names the problem)."""
    sa, ta = named_args["SA"], named_args["TA"]
    limit = tu.smem_limit(sa.device)
    bm = kwargs["BLOCK_M"]
    est = [tu.smem_estimate(c, sa.element_size(), bm, kwargs["BLOCK_D"], kwargs["D_SINGLE"])
           + tu.smem_estimate(c, ta.element_size(), bm, kwargs["BLOCK_DT"], kwargs["DT_SINGLE"])
           for c in configs]
    for c, e in zip(configs, est):
        if e <= limit:
            return [c]
    return [configs[est.index(min(est))]]


_KEY = ["D", "DT", "NA_KEY", "NB_KEY", "BLOCK_M", "BLOCK_D", "BLOCK_DT", "D_SINGLE", "DT_SINGLE",
        "PREC", "PREC_T"]


@triton.jit
def _resident(P, off, valid, D, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr):
    """The A block kept in registers for the sweep when its feature row fits (else 0, unused)."""
    if SINGLE:
        return load_rows(P, off, valid, 0, D, BLOCK_D)
    else:
        return 0


@triton.jit
def _row_block(SA, TA, scale_ptr, t_scale_ptr, NA, NB, D, DT, stride_sa, stride_ta,
               cols_per_split, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DT: tl.constexpr, D_SINGLE: tl.constexpr, DT_SINGLE: tl.constexpr):
    """The program's rows (grid axis 0) and what the sweep keeps of them: (rows, row_valid,
    rows64, student / teacher row offsets, resident student / teacher blocks, the two scales read
    on the device, and the column range [col_lo, col_hi) of its split (grid axis 1))."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < NA
    rows64 = rows.to(tl.int64)
    sa_off = rows64 * stride_sa
    ta_off = rows64 * stride_ta
    scale = tl.load(scale_ptr).to(tl.float32)
    t_scale = tl.load(t_scale_ptr).to(tl.float32)
    sa = _resident(SA, sa_off, row_valid, D, BLOCK_D, D_SINGLE)
    ta = _resident(TA, ta_off, row_valid, DT, BLOCK_DT, DT_SINGLE)
    col_lo = tl.program_id(1) * cols_per_split  # a multiple of every BLOCK_N
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    return rows, row_valid, rows64, sa_off, ta_off, sa, ta, scale, t_scale, col_lo, col_hi


@triton.jit
def _pair_tiles(SA, SB, sa, sa_off, TA, TB, ta, ta_off, row_valid, n0, col_hi, stride_sb,
                stride_tb, scale, t_scale, D, DT,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DT: tl.constexpr, D_SINGLE: tl.constexpr, DT_SINGLE: tl.constexpr,
                PREC: tl.constexpr, PREC_T: tl.constexpr):
    """(S tile, T tile, cols, col_valid, student B offsets and tile, teacher B offsets and tile)
    of columns [n0, n0 + BLOCK_N): the two ``scaled_tile`` steps of one sweep."""
    ss, cols, col_valid, sb_off, sb = scaled_tile(SA, SB, sa, sa_off, row_valid, n0, col_hi,
                                                  stride_sb, scale, D, BLOCK_M, BLOCK_N, BLOCK_D,
                                                  D_SINGLE, PREC)
    tt, _, _, tb_off, tb = scaled_tile(TA, TB, ta, ta_off, row_valid, n0, col_hi, stride_tb,
                                       t_scale, DT, BLOCK_M, BLOCK_N, BLOCK_DT, DT_SINGLE, PREC_T)
    return ss, tt, cols, col_valid, sb_off, sb, tb_off, tb


@triton.autotune(configs=_fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _soft_xent_fwd_kernel(
    SA, SB, TA, TB, scale_ptr, t_scale_ptr,
    lse_ptr,                   # (NA,) the teacher's log-sum-exp of the A rows
    out_ptr,                   # (SPLIT, NA) float32 partial cross sums
    s_lse_ptr,                 # (SPLIT, NA) float32 the student's per-split log-sum-exp
    NA, NB, D, DT, stride_sa, stride_sb, stride_ta, stride_tb, cols_per_split,
    NA_KEY, NB_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    D_SINGLE: tl.constexpr, DT_SINGLE: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
):
    pid_s = tl.program_id(1)
    rows, row_valid, rows64, sa_off, ta_off, sa, ta, scale, t_scale, col_lo, col_hi = _row_block(
        SA, TA, scale_ptr, t_scale_ptr, NA, NB, D, DT, stride_sa, stride_ta, cols_per_split,
        BLOCK_M, BLOCK_D, BLOCK_DT, D_SINGLE, DT_SINGLE)
    lse = tl.load(lse_ptr + rows, mask=row_valid, other=0.0)
    cross = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        ss, tt, cols, col_valid, _, _, _, _ = _pair_tiles(
            SA, SB, sa, sa_off, TA, TB, ta, ta_off, row_valid, n0, col_hi, stride_sb, stride_tb,
            scale, t_scale, D, DT, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DT, D_SINGLE, DT_SINGLE, PREC,
            PREC_T)
        p = tl.exp2((tt - lse[:, None]) * LOG2E)
        cross += tl.sum(tl.where(col_valid[None, :], p * ss, 0.0), axis=1)
        # online log-sum-exp of S: every tile holds a valid column (n0 < col_hi), so the new max
        # is finite and the first tile's rescale exp2(−inf) is exactly 0 (no exclusions here)
        s_r = tl.where(col_valid[None, :], ss, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_r, axis=1))
        l_i = l_i * tl.exp2((m_i - m_new) * LOG2E) + \
            tl.sum(tl.exp2((s_r - m_new[:, None]) * LOG2E), axis=1)
        m_i = m_new
    o_off = pid_s.to(tl.int64) * NA + rows
    tl.store(out_ptr + o_off, cross, mask=row_valid)
    tl.store(s_lse_ptr + o_off, m_i + tl.log(l_i), mask=row_valid)


@triton.jit
def _rmw_stage(h, B, b_off, b_valid, d_base, rows64, row_valid, D, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr):
    """d[rows] += h·B[cols] in D-chunks, float32, by the rows' owner (no atomics)."""
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        bc = load_rows(B, b_off, b_valid, d0, D, BLOCK_D).to(tl.float32)
        dd = d0 + offs_d
        ptrs = d_base + rows64[:, None] * D + dd[None, :]
        dmask = row_valid[:, None] & (dd < D)[None, :]
        # the barrier orders this load after the previous tile's store whatever thread layouts the
        # compiler gives them (as in backward.py)
        tl.debug_barrier()
        cur = tl.load(ptrs, mask=dmask, other=0.0)
        tl.store(ptrs, cur + tl.dot(h, bc, input_precision=PREC), mask=dmask)


@triton.jit
def _row_terms(w_ptr, lse_ptr, rows, row_valid, HAS: tl.constexpr):
    """(upstream weight, log-sum-exp) of the program's A rows for one term when ``HAS``, else
    (0, 0), unused."""
    if HAS:
        return (tl.load(w_ptr + rows, mask=row_valid, other=0.0),
                tl.load(lse_ptr + rows, mask=row_valid, other=0.0))
    else:
        return 0.0, 0.0


@triton.jit
def _softmax_terms(x, w_a, lse_a, w_b_ptr, lse_b_ptr, cols, col_valid, HAS_A: tl.constexpr,
                   HAS_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``w_a_i·e^{x_ij − lse_a_i}`` (``HAS_A``; the A rows' weight and statistic, loaded by
    ``_row_terms``) ``+ w_b_j·e^{x_ij − lse_b_j}`` (``HAS_B``; the B rows', loaded here) of a
    logit tile x, float32: the cross part of G on the teacher's tile, the log-sum-exp part on the
    student's. Padded elements are the caller's to zero."""
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_A:
        g += w_a[:, None] * tl.exp2((x - lse_a[:, None]) * LOG2E)
    if HAS_B:
        w_b = tl.load(w_b_ptr + cols, mask=col_valid, other=0.0)
        lse_b = tl.load(lse_b_ptr + cols, mask=col_valid, other=0.0)
        g += w_b[None, :] * tl.exp2((x - lse_b[None, :]) * LOG2E)
    return g


@triton.jit
def _store_rows(d_base, rows64, row_valid, D, acc, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(d_base + rows64[:, None] * D + offs_d[None, :], acc,
             mask=row_valid[:, None] & (offs_d < D)[None, :])


@triton.autotune(configs=_bwd_configs(),
                 key=_KEY + ["HAS_GA", "HAS_GB", "HAS_UA", "HAS_UB", "TEACHER"],
                 prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["dS_ptr", "dT_ptr"])
@triton.jit
def _soft_xent_bwd_kernel(
    SA, SB, TA, TB, scale_ptr, t_scale_ptr,
    lse_a_ptr, g_a_ptr,        # per A row: the teacher's log-sum-exp and the cross's upstream
    lse_b_ptr, g_b_ptr,        # per B row
    s_lse_a_ptr, u_a_ptr,      # per A row: the student's log-sum-exp and its upstream weight
    s_lse_b_ptr, u_b_ptr,      # per B row
    dS_ptr, dT_ptr,            # float32 (SPLIT, NA, D) / (SPLIT, NA, DT), zero-initialised
    NA, NB, D, DT, stride_sa, stride_sb, stride_ta, stride_tb, cols_per_split,
    NA_KEY, NB_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
    D_SINGLE: tl.constexpr, DT_SINGLE: tl.constexpr, PREC: tl.constexpr, PREC_T: tl.constexpr,
    PREC2: tl.constexpr, PREC2_T: tl.constexpr,
    HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, HAS_UA: tl.constexpr, HAS_UB: tl.constexpr,
    TEACHER: tl.constexpr,
):
    CROSS: tl.constexpr = HAS_GA or HAS_GB  # the teacher tile is needed (TEACHER implies it)
    pid_s = tl.program_id(1)
    rows, row_valid, rows64, sa_off, ta_off, sa, ta, scale, t_scale, col_lo, col_hi = _row_block(
        SA, TA, scale_ptr, t_scale_ptr, NA, NB, D, DT, stride_sa, stride_ta, cols_per_split,
        BLOCK_M, BLOCK_D, BLOCK_DT, D_SINGLE, DT_SINGLE)
    ga, lse_a = _row_terms(g_a_ptr, lse_a_ptr, rows, row_valid, HAS_GA)
    ua, s_lse_a = _row_terms(u_a_ptr, s_lse_a_ptr, rows, row_valid, HAS_UA)
    ds_base = dS_ptr + pid_s.to(tl.int64) * NA * D  # this split's private slices
    dt_base = dT_ptr + pid_s.to(tl.int64) * NA * DT
    if D_SINGLE:
        acc_s = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if TEACHER:
        if DT_SINGLE:
            acc_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        # the student's tile and its log-sum-exp part first, the teacher's tile after: without
        # the teacher's gradients S is dead before T is formed (one fewer tile live)
        ss, cols, col_valid, sb_off, sb = scaled_tile(SA, SB, sa, sa_off, row_valid, n0, col_hi,
                                                      stride_sb, scale, D, BLOCK_M, BLOCK_N,
                                                      BLOCK_D, D_SINGLE, PREC)
        # padded rows/columns: exp2 of a padded logit may be anything (inf against a zero B row
        # would be NaN), so zero each G explicitly
        valid = row_valid[:, None] & col_valid[None, :]
        g = _softmax_terms(ss, ua, s_lse_a, u_b_ptr, s_lse_b_ptr, cols, col_valid, HAS_UA,
                           HAS_UB, BLOCK_M, BLOCK_N)
        if CROSS:
            tt, _, _, tb_off, tb = scaled_tile(TA, TB, ta, ta_off, row_valid, n0, col_hi,
                                               stride_tb, t_scale, DT, BLOCK_M, BLOCK_N,
                                               BLOCK_DT, DT_SINGLE, PREC_T)
            gx = _softmax_terms(tt, ga, lse_a, g_b_ptr, lse_b_ptr, cols, col_valid, HAS_GA,
                                HAS_GB, BLOCK_M, BLOCK_N)
            if TEACHER:
                ht = tl.where(valid, gx * ss, 0.0) * t_scale
                if DT_SINGLE:
                    acc_t = tl.dot(ht, tb.to(tl.float32), acc_t, input_precision=PREC2_T)
                else:
                    _rmw_stage(ht, TB, tb_off, col_valid, dt_base, rows64, row_valid, DT,
                               BLOCK_DT, PREC2_T)
            g += gx
        hs = tl.where(valid, g, 0.0) * scale
        if D_SINGLE:
            acc_s = tl.dot(hs, sb.to(tl.float32), acc_s, input_precision=PREC2)
        else:
            _rmw_stage(hs, SB, sb_off, col_valid, ds_base, rows64, row_valid, D, BLOCK_D, PREC2)
    if D_SINGLE:
        _store_rows(ds_base, rows64, row_valid, D, acc_s, BLOCK_D)
    if TEACHER:
        if DT_SINGLE:
            _store_rows(dt_base, rows64, row_valid, DT, acc_t, BLOCK_DT)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------

def _block_ds(D: int, DT: int, single: int, chunk: int) -> tuple[int, bool, int, bool]:
    """(BLOCK_D, D_SINGLE, BLOCK_DT, DT_SINGLE): the two feature rows share the register budget
    of one resident row (``single``, padded widths): both resident when they fit together, else
    the narrower alone when it fits, the other D-chunked (``tuning.block_d``)."""
    bd, bdt = (max(16, triton.next_power_of_2(x)) for x in (D, DT))
    keep_d, keep_t = bd <= single, bdt <= single
    if bd + bdt > single:
        keep_d, keep_t = keep_d and bd <= bdt, keep_t and bdt < bd
    return (*tu.block_d(D, single if keep_d else 0, chunk),
            *tu.block_d(DT, single if keep_t else 0, chunk))


class _Plan:
    """Checked operands and the launch choices of one call; ``side(transposed)`` the operands of
    the launch with A = the query rows (or, transposed, the key rows)."""

    def __init__(self, query, keys, t_query, t_keys, bwd: bool):
        self.query, self.keys = tu.prepare(query, keys)
        self.t_query, self.t_keys = tu.prepare(t_query, t_keys)
        self.N, self.D = self.query.shape
        self.M, self.DT = self.keys.shape[0], self.t_query.shape[1]
        if self.t_query.shape[0] != self.N or self.t_keys.shape != (self.M, self.DT) \
                or self.keys.shape[1] != self.D:
            raise ValueError(f"query (N, D), keys (M, D), t_query (N, Dt), t_keys (M, Dt) "
                             f"expected; got {tuple(self.query.shape)}, {tuple(self.keys.shape)}, "
                             f"{tuple(self.t_query.shape)}, {tuple(self.t_keys.shape)}")
        self.dev = self.query.device
        self.f32 = dict(dtype=torch.float32, device=self.dev)
        self.dummy = torch.empty((1,), **self.f32)
        self.t = tu.current_tuning()
        single = self.t.bwd_max_single_d if bwd else self.t.fwd_max_single_d
        self.BM = self.t.bwd_block_m if bwd else self.t.fwd_block_m
        self.BD, self.d_single, self.BDT, self.dt_single = _block_ds(self.D, self.DT, single,
                                                                     self.t.chunk_d)
        self.prec = tu.input_precision(self.query.dtype)
        self.prec_t = tu.input_precision(self.t_query.dtype)

    def side(self, transposed: bool) -> tuple:
        if not transposed:
            return self.query, self.keys, self.t_query, self.t_keys
        return self.keys, self.query, self.t_keys, self.t_query

    def launch(self, kernel, transposed: bool, scale, t_scale, vectors, outs, **kw):
        """One launch over (row blocks, column splits) with the shared arguments; ``outs``:
        (allocate(split, NA), fold of the (split, NA, …) buffer over its splits) pairs; returns
        the folded buffers."""
        sa, sb, ta, tb = self.side(transposed)
        NA, NB = sa.shape[0], sb.shape[0]
        row_blocks = triton.cdiv(NA, self.BM)
        split, cps = tu.plan_split(row_blocks, NB, self.dev, self.t.split)
        bufs = [alloc(split, NA) for alloc, _ in outs]
        with tu.device_guard(self.dev):
            kernel[(row_blocks, split)](
                sa, sb, ta, tb, scale, t_scale, *vectors, *bufs, NA, NB, self.D, self.DT,
                sa.stride(0), sb.stride(0), ta.stride(0), tb.stride(0), cps,
                tu.bucket(NA), tu.bucket(NB), BLOCK_M=self.BM, BLOCK_D=self.BD,
                BLOCK_DT=self.BDT, D_SINGLE=self.d_single, DT_SINGLE=self.dt_single,
                PREC=self.prec, PREC_T=self.prec_t, **kw, **tu.LAUNCH_OPTS)
        # fold the splits in order (deterministic)
        return [b[0] if b.shape[0] == 1 else fold(b) for b, (_, fold) in zip(bufs, outs)]


def _sum(b):
    return b.sum(0)


def _logsumexp(b):
    return torch.logsumexp(b, 0)


def _stat(x, p):
    return None if x is None else x.to(**p.f32).contiguous()


def _side(p, t_lse, g, s_lse, u):
    """One side's (teacher lse, cross upstream, student lse, lse upstream), float32; a statistic
    is None where its upstream weight is (the term is absent)."""
    g, u = _stat(g, p), _stat(u, p)
    return (None if g is None else _stat(t_lse, p), g, None if u is None else _stat(s_lse, p), u)


def soft_xent_fwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, compute_col):
    """(row_cross (N,), col_cross (M,) or (0,), row_lse (N,), col_lse (M,) or (0,)) float32: the
    cross terms and the student's log-sum-exp from one sweep per launch (module docstring)."""
    p = _Plan(query, keys, t_query, t_keys, bwd=False)

    def part(split, na):
        return torch.empty((split, na), **p.f32)

    outs = [(part, _sum), (part, _logsumexp)]
    row, row_lse = p.launch(_soft_xent_fwd_kernel, False, scale, t_scale, [_stat(t_row_lse, p)],
                            outs)
    if not compute_col:
        return row, torch.empty((0,), **p.f32), row_lse, torch.empty((0,), **p.f32)
    col, col_lse = p.launch(_soft_xent_fwd_kernel, True, scale, t_scale, [_stat(t_col_lse, p)],
                            outs)
    return row, col, row_lse, col_lse


def soft_xent_bwd(query, keys, scale, t_query, t_keys, t_scale, t_row_lse, t_col_lse, row_lse,
                  col_lse, grad_row, grad_col, grad_row_lse, grad_col_lse, teacher_grad):
    """(grad_query, grad_keys, grad_t_query, grad_t_keys) float32, the teacher's (0,) unless
    ``teacher_grad``: two launches (module docstring). Each upstream gradient may be None (its
    term absent); without grad_row and grad_col the teacher's gradients are zero and its tile is
    not formed."""
    p = _Plan(query, keys, t_query, t_keys, bwd=True)
    teacher = bool(teacher_grad)
    upstream = (grad_row, grad_col, grad_row_lse, grad_col_lse)
    cross = grad_row is not None or grad_col is not None

    def zeros(x):
        return torch.zeros(x.shape, **p.f32) if teacher else torch.empty((0,), **p.f32)

    if all(g is None for g in upstream):
        return (torch.zeros(p.query.shape, **p.f32), torch.zeros(p.keys.shape, **p.f32),
                zeros(p.t_query), zeros(p.t_keys))
    row = _side(p, t_row_lse, grad_row, row_lse, grad_row_lse)  # the query rows'
    col = _side(p, t_col_lse, grad_col, col_lse, grad_col_lse)  # the key rows'
    launch_teacher = teacher and cross

    def ds(split, na):
        return torch.zeros((split, na, p.D), **p.f32)

    def dt(split, na):
        return torch.zeros((split, na, p.DT), **p.f32) if launch_teacher else p.dummy[None]

    out = []
    for transposed, (a, b) in ((False, (row, col)), (True, (col, row))):
        vectors = [p.dummy if v is None else v for v in (a[0], a[1], b[0], b[1],
                                                          a[2], a[3], b[2], b[3])]
        out.append(p.launch(_soft_xent_bwd_kernel, transposed, scale, t_scale, vectors,
                            [(ds, _sum), (dt, _sum)],
                            PREC2="ieee" if p.prec == "ieee" else "tf32",
                            PREC2_T="ieee" if p.prec_t == "ieee" else "tf32",
                            HAS_GA=a[1] is not None, HAS_GB=b[1] is not None,
                            HAS_UA=a[3] is not None, HAS_UB=b[3] is not None,
                            TEACHER=launch_teacher))
    (gq, ga), (gk, gb) = out
    if not launch_teacher:  # two tensors: outputs of a custom op may not alias each other
        ga, gb = zeros(p.t_query), zeros(p.t_keys)
    return gq, gk, ga, gb
