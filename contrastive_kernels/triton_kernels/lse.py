"""Triton kernels for the log-sum-exp op family of docs/internals.md.

Two backend callables (exactly the op arguments minus ``backend``):

    lse_fwd_triton(query, keys, scale, labels, compute_col) -> (row_lse, col_lse, pos)
    lse_bwd_triton(query, keys, scale, labels, row_lse, col_lse,
                   grad_row, grad_col, grad_pos) -> (grad_query, grad_keys)

Shapes: query (N, D), keys (M, D), scale 0-d float32, labels None or (N,) int64;
row_lse/pos (N,), col_lse (M,) or (0,), grad_query (N, D), grad_keys (M, D); every statistic and
gradient is float32. The logit matrix S = s·Q·Kᵀ is never stored: each program recomputes its tiles.

Kernels
-------
``_lse_fwd_kernel``    grid (row blocks, column splits). One program holds BLOCK_M rows of Q and
                       sweeps its columns in BLOCK_N tiles: S tile by ``tl.dot`` (fp32 accumulate),
                       online row max/sum, and per-tile column (max, sum) over its rows; every
                       exponential is one ``exp2`` of (S − max)·log2(e) (why log2(e) is not folded
                       into the scale: see the forward kernel). 2·N·M·D FLOPs.
``_lse_merge_kernel``  merges (max, sum) partials of rows (over column splits) and of columns (over
                       row blocks) in a fixed order: deterministic.
``_lse_bwd_kernel``    one generic "A against B" kernel: A-rows are owned by the program, B is swept
                       in tiles. It recomputes each S tile once, forms
                       G = g_a·exp(S − lse_a) + g_b·exp(S − lse_b) + g_pos·1[positive]
                       (both weights ≤ 1) and emits dA = s·G·B (owned: registers or plain RMW) and,
                       optionally, dB = s·Gᵀ·A (float32 ``atomic_add``). 6·N·M·D FLOPs when both
                       are emitted from the same tile (fused mode).

Column reduction of the forward (see benchmarks/NOTES.md for the trade-off)
---------------------------------------------------------------------------
* ``partial`` (default, deterministic): every (row block, column) pair is visited by exactly one
  program, which stores its column (max, sum) into a (num_row_blocks, M) float32 buffer pair; a
  merge kernel folds them in row-block order. The buffer is N·M/BLOCK_M·2 floats — it is O(N·M),
  divided by BLOCK_M (=128 on a GPU): 64 MiB at N = M = 32768, but 64 GiB at N = M = 2^20. So it is
  capped (``CK_TRITON_PARTIAL_MB``, default 1024): above the cap the rows are processed in several
  launches whose column partials are folded into a running (max, sum) after each launch.
* ``atomic`` (lock-free, not deterministic, O(M) memory): a column's running (max, sum) in the
  natural-log domain is packed into one 64-bit word (float32 max bits XOR the bits of -inf in the high
  half, so that an all-zero word is the identity (-inf, 0); float32 sum in the low half) and merged
  with a compare-and-swap loop: read, merge (m, l) ⊕ (m', l') = (max, l·e^(m−max) + l'·e^(m'−max)),
  CAS; a failed CAS returns the current word and the lane retries. The pair is updated as a unit,
  so no reader ever sees a max that does not belong to its sum — the reason a plain ``atomic_max``
  + ``atomic_add`` cannot work (the sum would be scaled by a max that changed under it). Merges
  commute up to rounding, so the result is exact up to float32 rounding in a run-dependent order.
  ``auto`` is ``partial`` at every size (in several launches over the cap); ``atomic`` runs only
  when asked for (``CK_TRITON_COL_REDUCE=atomic``). Why: besides being deterministic, ``partial``
  keeps the column loop software-pipelined, while the CAS retry loop inside it stops Triton from
  pipelining the D-resident kernels (no cp.async in their sm_90 code); and every row block sweeps
  the columns in the same order, so the CAS words would be contended by all resident programs at
  once. The extra cost of several launches is one more read of the partials (~1/(8·D) of the
  forward's FLOP time).

Backward modes
--------------
* ``fused`` (default): one launch, A = Q, B = K; dQ accumulated in registers over the column sweep
  (``D_SINGLE``) or read-modify-written by its owner per D-chunk; dK by float32 ``atomic_add`` —
  the order of the atomics varies run to run, so the last bits of dK do too.
* ``two_pass`` (deterministic): launch 1 A = Q, B = K emits dQ; launch 2 A = K, B = Q (weights and
  labels swapped) emits dK. Each tile of S is computed twice: 8·N·M·D instead of 6·N·M·D FLOPs, no
  atomics, bitwise identical run to run.
``CK_TRITON_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)`` selects ``partial``
and ``two_pass``; ``CK_TRITON_COL_REDUCE`` / ``CK_TRITON_BWD`` force one mode for benchmarking.

16-bit inputs: the second-stage dots use G cast to the input dtype (tensor cores, as in
FlashAttention). For float16 G is first multiplied by a power of two 2^-k with
max|G| ≤ Σ max|grad| ≤ 2^k, so the largest entries sit near 1 and tiny ones (≈ grad/M) do not flush to
zero in fp16's narrow range; the factor is divided out exactly at the end.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass, replace

import torch

if not torch.cuda.is_available():  # must precede the triton import; see __init__.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_NEG_INF_BITS_U32 = tl.constexpr(0xFF800000)  # float32 -inf bits, for the packed column words

LOG2E = tl.constexpr(1.4426950408889634)
_NEG_INF_BITS = -8388608  # int32 bit pattern of float32 -inf (0xFF800000), host-side decode


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# autotune configs: BLOCK_M, BLOCK_D and the column split are chosen on the host (they size the
# partial buffers); the autotuner picks BLOCK_N, num_warps and num_stages per size bucket.
# --------------------------------------------------------------------------------------------

def _fwd_configs():
    if _interpreting():  # several configs cannot be benchmarked without a GPU
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # offline sm_90 compile (ptxas via cuobjdump --dump-resource-usage, see benchmarks/NOTES.md):
    # BLOCK_M=128 with BLOCK_N=128 spills at 4 warps and BLOCK_N=256 spills at 8; these do not
    # (every config compiles on first use of each specialisation: a few seconds each on the GPU
    # machine, whose command time is scarce, so the lists stay short)
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
    ]


# Opt-in shared memory per block when the device does not say (sm_90: 227 KiB).
_DEFAULT_SMEM_LIMIT = 227 * 1024


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int):
    return torch.cuda.get_device_properties(index)


def _device_props(device: torch.device):
    """torch's properties of a CUDA device (cached per index); None for any other device."""
    if device.type != "cuda":
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())


def _smem_limit(device: torch.device) -> int:
    """Largest dynamic shared memory one program may use on ``device`` (bytes)."""
    props = _device_props(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or _DEFAULT_SMEM_LIMIT)


def _smem_estimate(cfg, elem: int, block_m: int, block_d: int, d_single: bool) -> int:
    """Shared memory of the forward's pipelined tile loop: num_stages buffers of the swept key
    tile (BLOCK_N × BLOCK_D, plus the BLOCK_M × BLOCK_D query chunk when D is chunked, since both
    are re-loaded per chunk) and, with D resident, one copy of the query block.

    Checked against every forward config of the offline sm_90 compiles
    (tools/triton_offline_compile.py, triton 3.6 and 3.9): never more than 4 KiB below the
    compiled size, and above it where the compiler does not pipeline (16-byte-unaligned rows, fp32
    "ieee" dots). E.g. fp32, D = 128 resident, BLOCK_N = 128, 3 stages: 262144 estimated, 262656
    compiled, over the H100's 227 KiB. The backward is not modelled (its two dot stages keep G and
    the operands of the second MMA in shared memory too); its largest compiled config uses 192 KiB.
    """
    bn = cfg.kwargs["BLOCK_N"]
    per_stage = block_d * (bn + (0 if d_single else block_m))
    resident = block_m * block_d if d_single else 0
    return elem * (cfg.num_stages * per_stage + resident)


def _prune_fwd_by_smem(configs, named_args, **kwargs):
    """early_config_prune of the forward autotuner: drop configs whose estimated shared memory
    exceeds the device's limit (they would fail with OutOfResources at launch, after a compile the
    GPU session pays for); keep the smallest when none fits, so the launch error names the problem."""
    q = named_args["Q"]
    limit = _smem_limit(q.device)
    est = [(_smem_estimate(c, q.element_size(), kwargs["BLOCK_M"], kwargs["BLOCK_D"], kwargs["D_SINGLE"]), i)
           for i, c in enumerate(configs)]
    keep = [configs[i] for e, i in est if e <= limit]
    return keep or [configs[min(est)[1]]]


def _bwd_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    # fused/two-pass programs own BLOCK_M = 64 rows; the G writer of the gemm mode owns 128
    return [
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _pack_ml(m, l):
    # high word: bits(max) ^ bits(-inf), so an all-zero word is the identity (-inf, 0);
    # low word: bits(sum). Unsigned throughout so that no shift or widening sign-extends.
    hi = m.to(tl.uint32, bitcast=True) ^ _NEG_INF_BITS_U32
    lo = l.to(tl.uint32, bitcast=True)
    return ((hi.to(tl.uint64) << 32) | lo.to(tl.uint64)).to(tl.int64, bitcast=True)


@triton.jit
def _unpack_ml(p):
    u = p.to(tl.uint64, bitcast=True)
    hi = (u >> 32).to(tl.uint32)
    lo = u.to(tl.uint32)  # truncation keeps the low word
    m = (hi ^ _NEG_INF_BITS_U32).to(tl.float32, bitcast=True)
    l = lo.to(tl.float32, bitcast=True)
    return m, l


@triton.jit
def _col_cas_merge(packed_ptr, cols, col_valid, cm, cl):
    # atomic_cas takes no mask: lanes past M point at column 0 and only ever CAS a word onto itself
    ptrs = packed_ptr + tl.where(col_valid, cols, 0)
    expected = tl.load(ptrs)  # only a guess (may be stale): a failed CAS hands back the truth
    pending = col_valid
    while tl.max(pending.to(tl.int32), axis=0) > 0:
        em, el = _unpack_ml(expected)
        nm = tl.maximum(em, cm)  # cm is finite: every row block has a valid row
        nl = el * tl.exp2((em - nm) * LOG2E) + cl * tl.exp2((cm - nm) * LOG2E)
        new = tl.where(pending, _pack_ml(nm, nl), expected)
        prev = tl.atomic_cas(ptrs, expected, new)
        pending = pending & (prev != expected)
        expected = prev


# The keys hold every host choice that changes the compiled kernel's resources (BLOCK_M, D_SINGLE,
# INPUT_PRECISION): a config tuned under one must not be reused under another (it may not even fit
# in shared memory there). The autotuner adds the tensors' dtypes itself.
@triton.autotune(configs=_fwd_configs(),
                 key=["D", "N_KEY", "M_KEY", "BLOCK_M", "BLOCK_D", "D_SINGLE", "COMPUTE_COL", "COL_ATOMIC",
                      "INPUT_PRECISION"],
                 reset_to_zero=["col_packed_ptr"], prune_configs_by={"early_config_prune": _prune_fwd_by_smem})
@triton.jit
def _lse_fwd_kernel(
    Q, K, scale_ptr, labels_ptr,
    row_m_ptr, row_l_ptr,      # (SPLIT, N) float32 partial row (max, sum): lse = max + log(sum)
    col_m_ptr, col_l_ptr,      # (row blocks of this launch, M) partial column (max, sum)
    col_packed_ptr,            # (M,) int64 packed running column (max, sum) [COL_ATOMIC]
    pos_ptr,                   # (N,) float32
    N, M, D, row_start, cols_per_split, stride_q, stride_k,
    N_KEY, M_KEY,              # autotune size buckets only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, HAS_LABELS: tl.constexpr, COMPUTE_COL: tl.constexpr,
    COL_ATOMIC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    q_off = rows.to(tl.int64) * stride_q  # int64: N·D overflows int32 at N = 2^20, D = 2048
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)

    if D_SINGLE:  # the whole (padded) row block stays resident over the sweep
        q = tl.load(Q + q_off[:, None] + offs_d[None, :],
                    mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)

    # positives: s·<q_i, k_{l_i}> by an elementwise fp32 dot, O(BLOCK_M·D), once per row block
    if pid_s == 0:
        if HAS_LABELS:
            lab = tl.load(labels_ptr + rows, mask=row_valid, other=0)
        else:
            lab = rows
        kl_off = lab.to(tl.int64) * stride_k
        pacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dm = (d0 + offs_d) < D
            m2 = row_valid[:, None] & dm[None, :]
            qa = tl.load(Q + q_off[:, None] + (d0 + offs_d)[None, :], mask=m2, other=0.0)
            kb = tl.load(K + kl_off[:, None] + (d0 + offs_d)[None, :], mask=m2, other=0.0)
            pacc += tl.sum(qa.to(tl.float32) * kb.to(tl.float32), axis=1)
        tl.store(pos_ptr + rows, pacc * scale, mask=row_valid)

    col_lo = pid_s * cols_per_split  # cols_per_split is a multiple of every BLOCK_N
    col_hi = tl.minimum(col_lo + cols_per_split, M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < col_hi
        k_off = cols.to(tl.int64) * stride_k
        if D_SINGLE:
            kt = tl.load(K + k_off[:, None] + offs_d[None, :],
                         mask=col_valid[:, None] & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(q, tl.trans(kt), input_precision=INPUT_PRECISION)
        else:  # GEMM main loop over D chunks; Q chunks are re-read from L2 for every tile
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dm = (d0 + offs_d) < D
                qc = tl.load(Q + q_off[:, None] + (d0 + offs_d)[None, :],
                             mask=row_valid[:, None] & dm[None, :], other=0.0)
                kc = tl.load(K + k_off[:, None] + (d0 + offs_d)[None, :],
                             mask=col_valid[:, None] & dm[None, :], other=0.0)
                s = tl.dot(qc, tl.trans(kc), s, input_precision=INPUT_PRECISION)
        # S = acc·s is rounded once to float32 (as torch rounds its logits), and the backward
        # recomputes exactly the same rounded S (FP contraction is off, see _LAUNCH_OPTS), so the
        # largest weight exp(S_max - lse) of a peaked row is exactly 1 in both kernels. log2(e)
        # multiplies the small difference S - max, not the scale: folded into the scale it would
        # put a relative error of 2^-24 on every logit (~3e-5 absolute at |S| = 500).
        ss = s * scale
        s_r = tl.where(col_valid[None, :], ss, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_r, axis=1))
        # online row max: the rescale of the running sum is exactly 0 on the first tile
        p = tl.exp2((s_r - m_new[:, None]) * LOG2E)
        l_i = l_i * tl.exp2((m_i - m_new) * LOG2E) + tl.sum(p, axis=1)
        m_i = m_new
        if COMPUTE_COL:
            # column statistic of this tile over this block's rows: the second exp per element
            s_c = tl.where(row_valid[:, None], ss, float("-inf"))
            cm = tl.max(s_c, axis=0)
            cl = tl.sum(tl.exp2((s_c - cm[None, :]) * LOG2E), axis=0)
            if COL_ATOMIC:
                _col_cas_merge(col_packed_ptr, cols, col_valid, cm, cl)
            else:
                c_off = pid_m.to(tl.int64) * M + cols
                tl.store(col_m_ptr + c_off, cm, mask=col_valid)
                tl.store(col_l_ptr + c_off, cl, mask=col_valid)
    r_off = pid_s.to(tl.int64) * N + rows
    tl.store(row_m_ptr + r_off, m_i, mask=row_valid)
    tl.store(row_l_ptr + r_off, l_i, mask=row_valid)


@triton.jit
def _lse_merge_kernel(part_m_ptr, part_l_ptr, P, L, run_m_ptr, run_l_ptr, out_ptr,
                      HAS_INIT: tl.constexpr, FINAL: tl.constexpr, BLOCK: tl.constexpr):
    # fold P partial (max, sum) rows of length L, in order p = 0..P-1 (deterministic)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    if HAS_INIT:
        m = tl.load(run_m_ptr + offs, mask=mask, other=float("-inf"))
        l = tl.load(run_l_ptr + offs, mask=mask, other=0.0)
    else:
        m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK,), dtype=tl.float32)
    pm_ptrs = part_m_ptr + offs
    pl_ptrs = part_l_ptr + offs
    for _ in range(0, P):
        pm = tl.load(pm_ptrs, mask=mask, other=float("-inf"))
        pl = tl.load(pl_ptrs, mask=mask, other=0.0)
        pm_ptrs += L  # 64-bit pointer arithmetic: P·L may pass 2^31
        pl_ptrs += L
        nm = tl.maximum(m, pm)
        safe = tl.where(nm == float("-inf"), 0.0, nm)  # (-inf) - (-inf) would be NaN
        l = l * tl.exp2((m - safe) * LOG2E) + pl * tl.exp2((pm - safe) * LOG2E)
        m = nm
    if FINAL:
        l = tl.where(mask, l, 1.0)  # padded lanes: avoid log(0) (they are not stored)
        tl.store(out_ptr + offs, m + tl.log(l), mask=mask)
    else:
        tl.store(run_m_ptr + offs, m, mask=mask)
        tl.store(run_l_ptr + offs, l, mask=mask)


@triton.autotune(configs=_bwd_configs(),
                 key=["D", "NA_KEY", "NB_KEY", "BLOCK_M", "BLOCK_D", "D_SINGLE", "EMIT_DB", "DA_ATOMIC",
                      "STORE_G", "INPUT_PRECISION"],
                 reset_to_zero=["dA_ptr", "dB_ptr"])
@triton.jit
def _lse_bwd_kernel(
    A, B, scale_ptr, gscale_ptr, labels_ptr,
    lse_a_ptr, g_a_ptr,        # per A-row: natural-log lse and upstream weight
    lse_b_ptr, g_b_ptr,        # per B-row
    gpos_ptr,                  # per query row (A when LABELS_ON_A, else B)
    dA_ptr, dB_ptr,            # float32 (SPLIT, NA, D) / (NB, D), zero-initialised
    G_ptr,                     # (rows of this launch, NB) G tile store [STORE_G]
    NA, NB, D, row_start, cols_per_split, stride_a, stride_b, ldg,
    NA_KEY, NB_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, HAS_GPOS: tl.constexpr,
    HAS_LABELS: tl.constexpr, LABELS_ON_A: tl.constexpr, EMIT_DB: tl.constexpr,
    DA_ATOMIC: tl.constexpr, STORE_G: tl.constexpr, USE_GSCALE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < NA
    rows64 = rows.to(tl.int64)
    a_off = rows64 * stride_a
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(scale_ptr).to(tl.float32)
    if USE_GSCALE:  # power of two: scaling G by it and dividing it out again is exact
        gs = tl.load(gscale_ptr).to(tl.float32)
        out_scale = scale / gs
    else:
        gs = 1.0
        out_scale = scale
    cdt = A.dtype.element_ty  # dtype of the second-stage dot operands

    if HAS_GA:  # other=0 weight on padded rows; the final where() drops them anyway
        ga = tl.load(g_a_ptr + rows, mask=row_valid, other=0.0) * gs
        lse_a = tl.load(lse_a_ptr + rows, mask=row_valid, other=0.0)
    if HAS_GPOS:
        if LABELS_ON_A:
            gpa = tl.load(gpos_ptr + rows, mask=row_valid, other=0.0) * gs
            if HAS_LABELS:
                lab_a = tl.load(labels_ptr + rows, mask=row_valid, other=-1).to(tl.int32)
            else:
                lab_a = rows
    if D_SINGLE:
        a = tl.load(A + a_off[:, None] + offs_d[None, :],
                    mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if DA_ATOMIC:  # all splits add into one buffer
        da_base = dA_ptr
    else:  # this split's private slice, summed on the host in a fixed order (deterministic)
        da_base = dA_ptr + pid_s.to(tl.int64) * NA * D

    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_valid = cols < col_hi
        cols64 = cols.to(tl.int64)
        b_off = cols64 * stride_b
        if D_SINGLE:
            b = tl.load(B + b_off[:, None] + offs_d[None, :],
                        mask=col_valid[:, None] & (offs_d[None, :] < D), other=0.0)
            s = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
        else:
            s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                dm = (d0 + offs_d) < D
                ac = tl.load(A + a_off[:, None] + (d0 + offs_d)[None, :],
                             mask=row_valid[:, None] & dm[None, :], other=0.0)
                bc = tl.load(B + b_off[:, None] + (d0 + offs_d)[None, :],
                             mask=col_valid[:, None] & dm[None, :], other=0.0)
                s = tl.dot(ac, tl.trans(bc), s, input_precision=INPUT_PRECISION)
        # G in fp32 from the same rounded S as the forward; each S - lse <= 0 up to rounding, so
        # every weight is <= 1 (see the forward for why log2(e) is not folded into the scale)
        ss = s * scale
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_GA:
            g += ga[:, None] * tl.exp2((ss - lse_a[:, None]) * LOG2E)
        if HAS_GB:
            gb = tl.load(g_b_ptr + cols, mask=col_valid, other=0.0) * gs
            lse_b = tl.load(lse_b_ptr + cols, mask=col_valid, other=0.0)
            g += gb[None, :] * tl.exp2((ss - lse_b[None, :]) * LOG2E)
        if HAS_GPOS:
            if LABELS_ON_A:
                hit = lab_a[:, None] == cols[None, :]
                g += tl.where(hit, gpa[:, None], 0.0)
            else:  # A = keys, B = queries: B-row i is positive for A-row l_i
                if HAS_LABELS:
                    lab_b = tl.load(labels_ptr + cols, mask=col_valid, other=-1).to(tl.int32)
                else:
                    lab_b = cols
                gpb = tl.load(gpos_ptr + cols, mask=col_valid, other=0.0) * gs
                hit = rows[:, None] == lab_b[None, :]
                g += tl.where(hit, gpb[None, :], 0.0)
        # padded rows/columns: exp2 of a padded score may be anything, so zero G explicitly
        g = tl.where(row_valid[:, None] & col_valid[None, :], g, 0.0)
        gd = g.to(cdt)
        if STORE_G:
            # "gemm" mode: hand the tile to cuBLAS (see _bwd_gemm); 2 bytes per logit for 16-bit
            g_ptrs = G_ptr + (rows64 - row_start)[:, None] * ldg + cols64[None, :]
            tl.store(g_ptrs, gd, mask=row_valid[:, None] & col_valid[None, :])
        elif D_SINGLE:
            acc = tl.dot(gd, b, acc, input_precision=INPUT_PRECISION)
            if EMIT_DB:
                db = tl.dot(tl.trans(gd), a, input_precision=INPUT_PRECISION) * out_scale
                tl.atomic_add(dB_ptr + cols64[:, None] * D + offs_d[None, :], db,
                              mask=col_valid[:, None] & (offs_d[None, :] < D), sem="relaxed")
        else:
            # second pass over D: A and B chunks come back from L2; dA chunks are accumulated in
            # global fp32 by their owner (plain read-modify-write) or atomically when split
            for d0 in range(0, D, BLOCK_D):
                dm = (d0 + offs_d) < D
                bc = tl.load(B + b_off[:, None] + (d0 + offs_d)[None, :],
                             mask=col_valid[:, None] & dm[None, :], other=0.0)
                da = tl.dot(gd, bc, input_precision=INPUT_PRECISION) * out_scale
                da_ptrs = da_base + rows64[:, None] * D + (d0 + offs_d)[None, :]
                dmask = row_valid[:, None] & dm[None, :]
                if DA_ATOMIC:
                    tl.atomic_add(da_ptrs, da, mask=dmask, sem="relaxed")
                else:
                    # The owner's read-modify-write: the compiler may give the load and the store
                    # different thread layouts, so the thread that re-reads an element at the next
                    # column tile need not be the one that stored it. A CTA barrier orders them
                    # (today's code happens to have one from layout conversions; this does not rely
                    # on it). Only this forced, D-chunked fused mode takes the path.
                    tl.debug_barrier()
                    cur = tl.load(da_ptrs, mask=dmask, other=0.0)
                    tl.store(da_ptrs, cur + da, mask=dmask)
                if EMIT_DB:
                    ac = tl.load(A + a_off[:, None] + (d0 + offs_d)[None, :],
                                 mask=row_valid[:, None] & dm[None, :], other=0.0)
                    db = tl.dot(tl.trans(gd), ac, input_precision=INPUT_PRECISION) * out_scale
                    tl.atomic_add(dB_ptr + cols64[:, None] * D + (d0 + offs_d)[None, :], db,
                                  mask=col_valid[:, None] & dm[None, :], sem="relaxed")
    if D_SINGLE and not STORE_G:
        acc = acc * out_scale
        da_ptrs = da_base + rows64[:, None] * D + offs_d[None, :]
        dmask = row_valid[:, None] & (offs_d[None, :] < D)
        if DA_ATOMIC:
            tl.atomic_add(da_ptrs, acc, mask=dmask, sem="relaxed")
        else:
            tl.store(da_ptrs, acc, mask=dmask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tuning:
    """Host-side choices. Defaults come from the environment; tests override them."""

    fwd_block_m: int = 128
    bwd_block_m: int = 64
    fwd_max_single_d: int = 128   # D up to this: Q block resident in registers (D_SINGLE)
    bwd_max_single_d: int = 128   # ... and the dQ accumulator too
    chunk_d: int = 64             # D chunk of the GEMM main loop when not D_SINGLE
    split: int = 0                # column splits; 0 = heuristic (fill the SMs twice over)
    col_reduce: str = "auto"      # auto | partial | atomic
    bwd_mode: str = "auto"        # auto | fused | two_pass | gemm
    gemm_budget_bytes: int = 64 << 20  # G slab of the "gemm" backward (1024 rows at M = 32768)
    gemm_min_rows: int = 1024
    deterministic: bool | None = None  # None: env CK_TRITON_DETERMINISTIC / torch's flag
    partial_budget_bytes: int = 1 << 30


def _env_tuning() -> Tuning:
    t = Tuning()
    if _interpreting():  # small tiles: the interpreter runs each program in numpy
        t = replace(t, fwd_block_m=32, bwd_block_m=32, fwd_max_single_d=256, bwd_max_single_d=256,
                    chunk_d=32)
    env = os.environ
    kw = {}
    for name, field in (("CK_TRITON_FWD_BLOCK_M", "fwd_block_m"), ("CK_TRITON_BWD_BLOCK_M", "bwd_block_m"),
                        ("CK_TRITON_FWD_MAX_SINGLE_D", "fwd_max_single_d"),
                        ("CK_TRITON_BWD_MAX_SINGLE_D", "bwd_max_single_d"),
                        ("CK_TRITON_CHUNK_D", "chunk_d"), ("CK_TRITON_SPLIT", "split")):
        if env.get(name):
            kw[field] = int(env[name])
    if env.get("CK_TRITON_GEMM_MB"):
        kw["gemm_budget_bytes"] = int(float(env["CK_TRITON_GEMM_MB"]) * (1 << 20))
    if env.get("CK_TRITON_PARTIAL_MB"):
        kw["partial_budget_bytes"] = int(float(env["CK_TRITON_PARTIAL_MB"]) * (1 << 20))
    if env.get("CK_TRITON_COL_REDUCE"):
        kw["col_reduce"] = env["CK_TRITON_COL_REDUCE"]
    if env.get("CK_TRITON_BWD"):
        kw["bwd_mode"] = env["CK_TRITON_BWD"]
    if env.get("CK_TRITON_DETERMINISTIC"):
        kw["deterministic"] = env["CK_TRITON_DETERMINISTIC"] not in ("0", "", "false", "False")
    return replace(t, **kw)


_OVERRIDE: dict = {}


@contextlib.contextmanager
def tuning(**overrides):
    """Temporarily override host-side choices (``Tuning`` fields), e.g. in tests and benchmarks."""
    bad = set(overrides) - set(Tuning.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown tuning fields {sorted(bad)}")
    old = dict(_OVERRIDE)
    _OVERRIDE.update(overrides)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def current_tuning() -> Tuning:
    t = replace(_env_tuning(), **_OVERRIDE)
    if t.col_reduce not in ("auto", "partial", "atomic"):
        raise ValueError(f"col_reduce must be auto|partial|atomic, got {t.col_reduce!r}")
    if t.bwd_mode not in ("auto", "fused", "two_pass", "gemm"):
        raise ValueError(f"bwd_mode must be auto|fused|two_pass|gemm, got {t.bwd_mode!r}")
    for f in ("fwd_block_m", "bwd_block_m", "chunk_d"):
        v = getattr(t, f)
        if v < 16 or v & (v - 1):
            raise ValueError(f"{f} must be a power of two >= 16, got {v}")
    return t


def _deterministic(t: Tuning) -> bool:
    if t.deterministic is not None:
        return t.deterministic
    return torch.are_deterministic_algorithms_enabled()


def _bucket(n: int) -> int:
    # autotune key: one tuning per size class, not per exact size
    return 0 if n < 8192 else (1 if n < 65536 else 2)


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the interpreter: one column split)."""
    props = _device_props(device)
    return props.multi_processor_count if props is not None else 0


_SPLIT_ALIGN = 256  # every BLOCK_N divides it, so split boundaries fall on tile boundaries


def _plan_split(row_blocks: int, ncols: int, device: torch.device, forced: int) -> tuple[int, int]:
    """Column splits so that row_blocks·split programs fill the GPU about twice over."""
    sms = _num_sms(device)
    if forced > 0:
        split = forced
    elif sms > 0:
        target = 2 * sms
        split = 1 if row_blocks >= target else -(-target // row_blocks)
        split = min(split, max(1, ncols // 1024))  # keep >= 1024 columns per split
    else:
        split = 1
    cols_per_split = -(-ncols // split)
    cols_per_split = -(-cols_per_split // _SPLIT_ALIGN) * _SPLIT_ALIGN
    split = -(-ncols // cols_per_split)  # no empty split
    return split, cols_per_split


def _block_d(D: int, max_single: int, chunk: int) -> tuple[int, bool]:
    bd = max(16, triton.next_power_of_2(D))
    if bd <= max_single:
        return bd, True
    return max(16, min(chunk, bd)), False


# FP contraction off: with it, LLVM/ptxas fuse `acc*scale - max` into an FMA in some places and not
# in others, so the forward and the backward would see differently rounded logits (the peaked-row
# weight exp(S_max - lse) would drift from exactly 1). Only scalar FP32 ops are affected: tl.dot
# is an MMA either way. (Ignored by the interpreter, whose numpy ops never contract.)
_LAUNCH_OPTS = dict(enable_fp_fusion=False)


def fp32_matmul_uses_tf32() -> bool:
    """Whether torch itself would run a float32 CUDA matmul on TF32 tensor cores right now.

    Reads ``torch.backends.cuda.matmul.fp32_precision`` (torch >= 2.9: already resolved against the
    global ``torch.backends.fp32_precision``, and it never raises), falling back to
    ``torch.get_float32_matmul_precision()`` on older torch. The fallback cannot be the first
    choice: since 2.9 it raises RuntimeError as soon as the new API was used (even alone, e.g.
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``).
    """
    try:
        precision = torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if isinstance(precision, str):
        return precision == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not _interpreting() and fp32_matmul_uses_tf32():
        return "tf32"
    if dtype == torch.float32:
        return "ieee"
    return "tf32"  # ignored for 16-bit operands (tensor cores, fp32 accumulation)


def _prepare(query, keys, labels):
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton backend supports float32/float16/bfloat16 inputs, got {query.dtype}")
    if _interpreting() and query.dtype == torch.bfloat16:
        # the interpreter computes bfloat16 silently wrong (numpy has no bfloat16): upcast exactly
        query, keys = query.float(), keys.float()
    query, keys = query.contiguous(), keys.contiguous()
    if labels is not None:
        labels = labels.contiguous()
    return query, keys, labels


@contextlib.contextmanager
def _device_guard(device: torch.device):
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def lse_fwd_triton(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                   labels: torch.Tensor | None, compute_col: bool):
    """Row/column log-sum-exp and positive logits of S = scale·query·keysᵀ.

    query (N, D), keys (M, D), scale 0-d float32 (read on device), labels None or (N,) int64.
    Returns row_lse (N,), col_lse (M,) or (0,), pos (N,), all float32.
    """
    query, keys, labels = _prepare(query, keys, labels)
    t = current_tuning()
    N, D = query.shape
    M = keys.shape[0]
    dev = query.device
    f32 = dict(dtype=torch.float32, device=dev)
    BM = t.fwd_block_m
    BD, d_single = _block_d(D, t.fwd_max_single_d, t.chunk_d)
    row_blocks = triton.cdiv(N, BM)
    split, cols_per_split = _plan_split(row_blocks, M, dev, t.split)
    det = _deterministic(t)

    mode = "none"
    if compute_col:
        # `auto` is `partial` at every size (over the budget in several launches): deterministic,
        # and its column loop stays software-pipelined, which the CAS loop of `atomic` prevents
        # (no cp.async in the compiled D-resident kernels). `atomic` only when asked for.
        mode = "partial" if det or t.col_reduce == "auto" else t.col_reduce
    # row blocks per launch: the whole grid unless the partial buffer would exceed the budget
    rb_per_launch = row_blocks
    if mode == "partial":
        fit = max(1, t.partial_budget_bytes // (8 * M))
        rb_per_launch = min(row_blocks, max(fit, _num_sms(dev)))

    row_m = torch.empty((split, N), **f32)
    row_l = torch.empty((split, N), **f32)
    pos = torch.empty((N,), **f32)
    dummy = torch.empty((1,), **f32)
    col_lse = torch.empty((M if compute_col else 0,), **f32)
    if mode == "partial":
        col_m = torch.empty((rb_per_launch, M), **f32)
        col_l = torch.empty((rb_per_launch, M), **f32)
        run_m = torch.empty((M,), **f32) if rb_per_launch < row_blocks else dummy
        run_l = torch.empty((M,), **f32) if rb_per_launch < row_blocks else dummy
    else:
        col_m = col_l = run_m = run_l = dummy
    packed = torch.zeros((M,), dtype=torch.int64, device=dev) if mode == "atomic" else \
        torch.zeros((1,), dtype=torch.int64, device=dev)
    lab = labels if labels is not None else torch.empty((1,), dtype=torch.int64, device=dev)
    prec = _input_precision(query.dtype)
    MERGE_BLOCK = 1024 if _num_sms(dev) else 256

    with _device_guard(dev):
        for rb0 in range(0, row_blocks, rb_per_launch):
            nrb = min(rb_per_launch, row_blocks - rb0)
            _lse_fwd_kernel[(nrb, split)](
                query, keys, scale, lab, row_m, row_l, col_m, col_l, packed, pos,
                N, M, D, rb0 * BM, cols_per_split, query.stride(0), keys.stride(0),
                _bucket(N), _bucket(M),
                BLOCK_M=BM, BLOCK_D=BD, D_SINGLE=d_single, HAS_LABELS=labels is not None,
                COMPUTE_COL=mode != "none", COL_ATOMIC=mode == "atomic", INPUT_PRECISION=prec,
                **_LAUNCH_OPTS,
            )
            if mode == "partial":
                last = rb0 + nrb >= row_blocks
                _lse_merge_kernel[(triton.cdiv(M, MERGE_BLOCK),)](
                    col_m, col_l, nrb, M, run_m, run_l, col_lse,
                    HAS_INIT=rb0 > 0, FINAL=last and rb0 == 0, BLOCK=MERGE_BLOCK)
                if last and rb0 > 0:
                    _lse_merge_kernel[(triton.cdiv(M, MERGE_BLOCK),)](
                        run_m, run_l, 1, M, dummy, dummy, col_lse,
                        HAS_INIT=False, FINAL=True, BLOCK=MERGE_BLOCK)
        row_lse = torch.empty((N,), **f32)
        _lse_merge_kernel[(triton.cdiv(N, MERGE_BLOCK),)](
            row_m, row_l, split, N, dummy, dummy, row_lse, HAS_INIT=False, FINAL=True, BLOCK=MERGE_BLOCK)
    if mode == "atomic":
        col_lse = _decode_packed(packed)
    return row_lse, col_lse, pos


def _decode_packed(packed: torch.Tensor) -> torch.Tensor:
    words = packed.view(torch.int32).view(-1, 2)  # little endian: [low = sum, high = max]
    m = torch.bitwise_xor(words[:, 1], _NEG_INF_BITS).view(torch.float32)
    l = words[:, 0].contiguous().view(torch.float32)
    return m + torch.log(l)


def _gscale(dtype, grads):
    # 2^-ceil(log2(Σ max|grad|)) for float16 (see module docstring); 1 otherwise
    if dtype != torch.float16:
        return None
    gmax = None
    for g in grads:
        if g is not None:
            a = g.abs().amax() if g.numel() else g.new_zeros(())
            gmax = a if gmax is None else gmax + a
    return torch.exp2(-torch.ceil(torch.log2(gmax.float().clamp_min(2.0 ** -100)))).clamp(max=2.0 ** 100)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with float32 output (16-bit operands on tensor cores, fp32 accumulation)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # aten::mm.dtype (CUDA, torch >= 2.8)
        except (TypeError, RuntimeError, NotImplementedError):
            return torch.mm(a, b).float()  # older torch: output rounded to the input dtype once
    return torch.mm(a.float(), b.float())


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc float32 (no M×D temporary where torch supports it)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)  # aten::addmm.dtype_out
            return
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    acc += _mm_f32(a, b)


def lse_bwd_triton(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                   labels: torch.Tensor | None, row_lse: torch.Tensor, col_lse: torch.Tensor,
                   grad_row: torch.Tensor | None, grad_col: torch.Tensor | None,
                   grad_pos: torch.Tensor | None):
    """Gradients of Σ grad_row·row_lse + Σ grad_col·col_lse + Σ grad_pos·pos.

    Returns grad_query (N, D) and grad_keys (M, D), float32. A ``None`` grad is zero; col_lse is
    not read when grad_col is None.
    """
    query, keys, labels = _prepare(query, keys, labels)
    t = current_tuning()
    N, D = query.shape
    M = keys.shape[0]
    dev = query.device
    f32 = dict(dtype=torch.float32, device=dev)
    if grad_row is None and grad_col is None and grad_pos is None:
        return torch.zeros((N, D), **f32), torch.zeros((M, D), **f32)
    BM = t.bwd_block_m
    BD, d_single = _block_d(D, t.bwd_max_single_d, t.chunk_d)
    mode = _bwd_mode(t, d_single)
    BD_G, d_single_g = _block_d(D, t.fwd_max_single_d, t.chunk_d)
    prec = _input_precision(query.dtype)
    gscale = _gscale(query.dtype, (grad_row, grad_col, grad_pos))
    dummy = torch.empty((1,), **f32)
    lab = labels if labels is not None else torch.empty((1,), dtype=torch.int64, device=dev)

    def c(x):
        return dummy if x is None else x.contiguous()

    def launch(A, B, lse_a, g_a, lse_b, g_b, labels_on_a, emit_db, atomic_da_ok,
               G=None, row_start=0, row_stop=None):
        NA, NB = A.shape[0], B.shape[0]
        row_stop = NA if row_stop is None else row_stop
        bm = BM if G is None else t.fwd_block_m  # the G writer is a GEMM + epilogue, like the forward
        row_blocks = triton.cdiv(row_stop - row_start, bm)
        split, cols_per_split = _plan_split(row_blocks, NB, dev, t.split)
        if G is not None:
            dA = dummy
            da_atomic = False
        elif split > 1 and atomic_da_ok:
            dA = torch.zeros((NA, D), **f32)
            da_atomic = True
        else:  # one private slice per split, summed below in a fixed order
            dA = torch.zeros((split, NA, D), **f32)
            da_atomic = False
        dB = torch.zeros((NB, D), **f32) if emit_db else dummy
        _lse_bwd_kernel[(row_blocks, split)](
            A, B, scale, gscale if gscale is not None else dummy, lab,
            c(lse_a) if g_a is not None else dummy, c(g_a),
            c(lse_b) if g_b is not None else dummy, c(g_b),
            c(grad_pos), dA, dB, G if G is not None else dummy,
            row_stop, NB, D, row_start, cols_per_split, A.stride(0), B.stride(0),
            G.stride(0) if G is not None else 0,
            _bucket(NA), _bucket(NB),
            BLOCK_M=bm, BLOCK_D=BD if G is None else BD_G, D_SINGLE=d_single if G is None else d_single_g,
            HAS_GA=g_a is not None, HAS_GB=g_b is not None, HAS_GPOS=grad_pos is not None,
            HAS_LABELS=labels is not None, LABELS_ON_A=labels_on_a, EMIT_DB=emit_db,
            DA_ATOMIC=da_atomic, STORE_G=G is not None, USE_GSCALE=gscale is not None,
            INPUT_PRECISION=prec, **_LAUNCH_OPTS,
        )
        if dA.dim() == 3:
            dA = dA[0] if dA.shape[0] == 1 else dA.sum(0)
        return dA, dB

    with _device_guard(dev):
        if mode == "fused":
            gq, gk = launch(query, keys, row_lse, grad_row, col_lse, grad_col, True, True, True)
        elif mode == "two_pass":
            gq, _ = launch(query, keys, row_lse, grad_row, col_lse, grad_col, True, False, False)
            gk, _ = launch(keys, query, col_lse, grad_col, row_lse, grad_row, False, False, False)
        else:
            # "gemm": G is written for a slab of rows (input dtype, ≤ gemm_budget_bytes), then
            # dQ[slab] = G·K and dK += Gᵀ·Q[slab] run on cuBLAS. Per slab: 2·R·M·D FLOPs in the
            # kernel, 4·R·M·D in the GEMMs, 3 passes of R·M·elem bytes; no atomics, deterministic.
            gdt = query.dtype
            esz = torch.finfo(gdt).bits // 8
            bm = t.fwd_block_m
            rows = max(t.gemm_min_rows, (t.gemm_budget_bytes // (M * esz)) // bm * bm)
            rows = min(rows, triton.cdiv(N, bm) * bm)
            G = torch.empty((rows, M), dtype=gdt, device=dev)
            gq = torch.empty((N, D), **f32)
            gk = torch.zeros((M, D), **f32)
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                launch(query, keys, row_lse, grad_row, col_lse, grad_col, True, False, False,
                       G=G, row_start=r0, row_stop=r1)
                Gc = G[: r1 - r0]
                gq[r0:r1] = _mm_f32(Gc, keys)
                _addmm_f32_(gk, Gc.t(), query[r0:r1])
            out_scale = scale.float() if gscale is None else scale.float() / gscale
            gq.mul_(out_scale)
            gk.mul_(out_scale)
    return gq, gk


def _bwd_mode(t: Tuning, d_single: bool) -> str:
    if t.bwd_mode != "auto":
        return t.bwd_mode
    if _deterministic(t):
        return "two_pass" if d_single else "gemm"
    return "fused" if d_single or _interpreting() else "gemm"


def describe() -> str:
    """One line of the host choices in force (for benchmark logs)."""
    t = current_tuning()
    return (f"fwd BLOCK_M={t.fwd_block_m} bwd BLOCK_M={t.bwd_block_m} single-D<= "
            f"{t.fwd_max_single_d}/{t.bwd_max_single_d} chunk_d={t.chunk_d} col_reduce={t.col_reduce} "
            f"bwd={t.bwd_mode} deterministic={_deterministic(t)} partial_budget={t.partial_budget_bytes >> 20}MiB")
