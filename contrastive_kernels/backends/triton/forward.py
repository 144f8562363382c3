"""Triton forward of the log-sum-exp family: row/column LSE and positives of S = s·Q·Kᵀ.

    lse_fwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, compute_col,
            row_groups=None, col_groups=None, guide_query=None, guide_keys=None,
            guide_threshold=None) -> (row_lse, col_lse, pos, pos_count)

query (N, D), keys (M, D), scale 0-d float32 (read on the device: no host sync), labels None or
(N,) int64, row/col_classes None or (N,)/(M,) int64; row_lse/pos (N,), col_lse (M,) or (0,),
pos_count (N,) with classes else (0,), all float32. 2·N·M·D FLOPs; S is never stored.

Exclusion masks (op contract, csrc/ops.cpp), each a constexpr specialisation, so the plain kernel
is compiled exactly as without them: the self pair (``EXCLUDE_SELF``); same-group pairs
(``HAS_GROUPS``: row_groups (N,) / col_groups (M,) int64, read per tile); guided false negatives
(``HAS_GUIDE``: guide_query (N, Dg) / guide_keys (M, Dg) float32, guide_threshold (N,): a pair
with ⟨g_q_i, g_k_j⟩ > t_i is excluded unless it is a designated positive — the labelled column, or
a same-class column). The guide dot is a second, small dot per tile (``tiles.guide_tile``: IEEE
fp32, a K-loop over Dg only when Dg exceeds one chunk); no N×M mask exists anywhere. An excluded
pair enters neither statistic nor the positives; a row or column with nothing left gets −inf.

Kernels
-------
``_lse_fwd_kernel``    grid (row blocks, column splits). One program holds BLOCK_M rows of Q and
                       sweeps its columns in BLOCK_N tiles (``tiles.scaled_tile``): online row
                       max/sum, per-tile column (max, sum) over its rows, and the positives read
                       from the same tile elements (the labelled column, or every same-class
                       column with its count), all without the self pair under ``EXCLUDE_SELF``;
                       every exponential is one ``exp2`` of (S − max)·log2(e). Row statistics and
                       positives are stored per column split and folded in a fixed order.
``_lse_merge_kernel``  merges (max, sum) partials of rows (over column splits) and of columns (over
                       row blocks) in a fixed order: deterministic.

Column reduction (see benchmarks/NOTES.md for the trade-off)
------------------------------------------------------------
* ``partial`` (default, deterministic): every (row block, column) pair is visited by exactly one
  program, which stores its column (max, sum) into a (num_row_blocks, M) float32 buffer pair; a
  merge kernel folds them in row-block order. The buffer is N·M/BLOCK_M·2 floats — O(N·M) divided
  by BLOCK_M (=128 on a GPU): 64 MiB at N = M = 32768, but 64 GiB at N = M = 2^20. So it is capped
  (``CK_TRITON_PARTIAL_MB``, default 1024): above the cap the rows are processed in several
  launches whose column partials are folded into a running (max, sum) after each launch.
* ``atomic`` (lock-free, not deterministic, O(M) memory): a column's running (max, sum) in the
  natural-log domain is packed into one 64-bit word (float32 max bits XOR the bits of -inf in the
  high half, so that an all-zero word is the identity (-inf, 0); float32 sum in the low half) and
  merged with a compare-and-swap loop: read, merge (m, l) ⊕ (m', l') = (max, l·e^(m−max) +
  l'·e^(m'−max)), CAS; a failed CAS returns the current word and the lane retries. The pair is
  updated as a unit, so no reader ever sees a max that does not belong to its sum — the reason a
  plain ``atomic_max`` + ``atomic_add`` cannot work. Merges commute up to rounding.
  ``auto`` is ``partial`` at every size (in several launches over the cap); ``atomic`` runs only
  when asked for (``CK_TRITON_COL_REDUCE=atomic``): besides being deterministic, ``partial`` keeps
  the column loop software-pipelined, while the CAS retry loop stops Triton from pipelining the
  D-resident kernels (no cp.async in their sm_90 code), and every row block sweeps the columns in
  the same order, so the CAS words would be contended by all resident programs at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning as tu
from .tiles import LOG2E, kept_pairs, load_rows, safe_max, scaled_tile

_NEG_INF_BITS_U32 = tl.constexpr(0xFF800000)  # float32 -inf bits, for the packed column words
_NEG_INF_BITS = -8388608  # int32 bit pattern of float32 -inf (0xFF800000), host-side decode


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
        nm = tl.maximum(em, cm)
        shift = safe_max(nm)  # both -inf: a column with nothing kept yet (self pair excluded)
        nl = el * tl.exp2((em - shift) * LOG2E) + cl * tl.exp2((cm - shift) * LOG2E)
        new = tl.where(pending, _pack_ml(nm, nl), expected)
        prev = tl.atomic_cas(ptrs, expected, new)
        pending = pending & (prev != expected)
        expected = prev


# The keys hold every host choice that changes the compiled kernel's resources (BLOCK_M, D_SINGLE,
# INPUT_PRECISION): a config tuned under one must not be reused under another (it may not even fit
# in shared memory there). The autotuner adds the tensors' dtypes itself.
@triton.autotune(configs=tu.fwd_configs(),
                 key=["D", "N_KEY", "M_KEY", "BLOCK_M", "BLOCK_D", "D_SINGLE", "COMPUTE_COL", "COL_ATOMIC",
                      "HAS_CLASSES", "EXCLUDE_SELF", "HAS_GROUPS", "HAS_GUIDE", "BLOCK_DG", "DG_SINGLE",
                      "INPUT_PRECISION"],
                 reset_to_zero=["col_packed_ptr"], prune_configs_by={"early_config_prune": tu.prune_fwd_by_smem})
@triton.jit
def _lse_fwd_kernel(
    Q, K, scale_ptr, labels_ptr, rclass_ptr, cclass_ptr,
    rgroup_ptr, cgroup_ptr,    # (N,) / (M,) int64 groups [HAS_GROUPS]
    GQ, GK, thr_ptr,           # (N, DG) / (M, DG) float32 guides, (N,) thresholds [HAS_GUIDE]
    row_m_ptr, row_l_ptr,      # (SPLIT, N) float32 partial row (max, sum): lse = max + log(sum)
    col_m_ptr, col_l_ptr,      # (row blocks of this launch, M) partial column (max, sum)
    col_packed_ptr,            # (M,) int64 packed running column (max, sum) [COL_ATOMIC]
    pos_ptr, cnt_ptr,          # (SPLIT, N) float32 partial positives (sum) and counts [HAS_CLASSES]
    N, M, D, row_start, cols_per_split, stride_q, stride_k,
    DG, stride_gq, stride_gk,
    N_KEY, M_KEY,              # autotune size buckets only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_CLASSES: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, COMPUTE_COL: tl.constexpr, COL_ATOMIC: tl.constexpr,
    HAS_GROUPS: tl.constexpr, HAS_GUIDE: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_DG: tl.constexpr, DG_SINGLE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < N
    q_off = rows.to(tl.int64) * stride_q  # int64: N·D overflows int32 at N = 2^20, D = 2048
    scale = tl.load(scale_ptr).to(tl.float32)

    if D_SINGLE:  # the whole (padded) row block stays resident over the sweep
        q = load_rows(Q, q_off, row_valid, 0, D, BLOCK_D)
    else:
        q = 0  # unused: scaled_tile re-loads Q chunks
    if HAS_CLASSES:
        rc = tl.load(rclass_ptr + rows, mask=row_valid, other=0)
        cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    elif HAS_LABELS:
        lab = tl.load(labels_ptr + rows, mask=row_valid, other=-1)
    else:
        lab = rows
    if not HAS_CLASSES:
        # the column range holding this block's positives: only the tiles that cross it pay for
        # the positive's compare-and-select (one or two tiles on the diagonal)
        lab_lo = tl.min(tl.where(row_valid, lab, M), axis=0)
        lab_hi = tl.max(tl.where(row_valid, lab, -1), axis=0) + 1
    pos = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_GROUPS:
        rg = tl.load(rgroup_ptr + rows, mask=row_valid, other=0)
    else:
        rg = 0
    if HAS_GUIDE:
        gq_off = rows.to(tl.int64) * stride_gq
        thr = tl.load(thr_ptr + rows, mask=row_valid, other=0.0)[:, None]
    else:
        gq_off = 0
        thr = 0.0

    col_lo = pid_s * cols_per_split  # cols_per_split is a multiple of every BLOCK_N
    col_hi = tl.minimum(col_lo + cols_per_split, M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        # S rounded once to float32 (as torch rounds its logits); the backward recomputes exactly
        # these bits, so the largest weight exp(S_max - lse) of a peaked row is exactly 1 in both
        # kernels. log2(e) multiplies the small difference S - max, not the scale: folded into the
        # scale it would put a relative error of 2^-24 on every logit (~3e-5 absolute at |S| = 500).
        ss, cols, col_valid, _, _ = scaled_tile(Q, K, q, q_off, row_valid, n0, col_hi, stride_k,
                                                scale, D, BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE,
                                                INPUT_PRECISION)
        if HAS_CLASSES:
            cc = tl.load(cclass_ptr + cols, mask=col_valid, other=0)
            same = rc[:, None] == cc[None, :]
        if MASKED:
            if HAS_GUIDE:  # the designated positives, which the guide never excludes
                if HAS_CLASSES:
                    desig = same
                else:
                    desig = lab[:, None] == cols[None, :]
            else:
                desig = 0
            kp = kept_pairs(rows, cols, col_valid, rg, cgroup_ptr, desig, GQ, GK, gq_off, row_valid,
                            cols.to(tl.int64) * stride_gk, thr, DG, EXCLUDE_SELF, HAS_GROUPS,
                            HAS_GUIDE, BLOCK_M, BLOCK_N, BLOCK_DG, DG_SINGLE)
            keep = col_valid[None, :] & kp
        else:
            keep = col_valid[None, :]
        s_r = tl.where(keep, ss, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s_r, axis=1))
        # online row max: the rescale of the running sum is exactly 0 on the first tile; with
        # excluded pairs a row may have seen nothing yet (max -inf): shift by 0 there
        shift = safe_max(m_new) if MASKED else m_new
        p = tl.exp2((s_r - shift[:, None]) * LOG2E)
        l_i = l_i * tl.exp2((m_i - shift) * LOG2E) + tl.sum(p, axis=1)
        m_i = m_new
        # positives from the very elements the LSE saw: row_lse - pos >= 0 in floating point
        if HAS_CLASSES:
            hit = keep & same
            cnt += tl.sum(hit.to(tl.float32), axis=1)
            pos += tl.sum(tl.where(hit, ss, 0.0), axis=1)
        elif (n0 < lab_hi) & (n0 + BLOCK_N > lab_lo):
            hit = keep & (lab[:, None] == cols[None, :])  # never on an excluded element
            pos += tl.sum(tl.where(hit, ss, 0.0), axis=1)
        if COMPUTE_COL:
            # column statistic of this tile over this block's rows: the second exp per element
            if MASKED:
                ckeep = row_valid[:, None] & kp
            else:
                ckeep = row_valid[:, None]
            s_c = tl.where(ckeep, ss, float("-inf"))
            cm = tl.max(s_c, axis=0)
            cshift = safe_max(cm) if MASKED else cm
            cl = tl.sum(tl.exp2((s_c - cshift[None, :]) * LOG2E), axis=0)
            if COL_ATOMIC:
                _col_cas_merge(col_packed_ptr, cols, col_valid, cm, cl)
            else:
                c_off = pid_m.to(tl.int64) * M + cols
                tl.store(col_m_ptr + c_off, cm, mask=col_valid)
                tl.store(col_l_ptr + c_off, cl, mask=col_valid)
    r_off = pid_s.to(tl.int64) * N + rows
    tl.store(row_m_ptr + r_off, m_i, mask=row_valid)
    tl.store(row_l_ptr + r_off, l_i, mask=row_valid)
    tl.store(pos_ptr + r_off, pos, mask=row_valid)
    if HAS_CLASSES:
        tl.store(cnt_ptr + r_off, cnt, mask=row_valid)


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


def _decode_packed(packed: torch.Tensor) -> torch.Tensor:
    words = packed.view(torch.int32).view(-1, 2)  # little endian: [low = sum, high = max]
    m = torch.bitwise_xor(words[:, 1], _NEG_INF_BITS).view(torch.float32)
    l = words[:, 0].contiguous().view(torch.float32)
    return m + torch.log(l)


def lse_fwd(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
            labels: torch.Tensor | None, row_classes: torch.Tensor | None,
            col_classes: torch.Tensor | None, exclude_self: bool, compute_col: bool,
            row_groups: torch.Tensor | None = None, col_groups: torch.Tensor | None = None,
            guide_query: torch.Tensor | None = None, guide_keys: torch.Tensor | None = None,
            guide_threshold: torch.Tensor | None = None):
    """Row/column log-sum-exp and positives of S = scale·query·keysᵀ (module docstring)."""
    query, keys, labels, row_classes, col_classes = tu.prepare(query, keys, labels, row_classes,
                                                                col_classes)
    row_groups, col_groups, guide_query, guide_keys, guide_threshold = tu.prepare_masks(
        query, keys, row_groups, col_groups, guide_query, guide_keys, guide_threshold)
    groups = row_groups is not None
    guide = guide_query is not None
    t = tu.current_tuning()
    N, D = query.shape
    M = keys.shape[0]
    dev = query.device
    f32 = dict(dtype=torch.float32, device=dev)
    BM = t.fwd_block_m
    BD, d_single = tu.block_d(D, t.fwd_max_single_d, t.chunk_d)
    row_blocks = triton.cdiv(N, BM)
    split, cols_per_split = tu.plan_split(row_blocks, M, dev, t.split)
    det = tu.deterministic(t)
    classes = row_classes is not None
    DG = guide_query.shape[1] if guide else 0
    BDG, dg_single = tu.block_dg(DG, t.guide_chunk_d)

    mode = "none"
    if compute_col:
        # `auto` is `partial` at every size (over the budget in several launches): deterministic,
        # and its column loop stays software-pipelined, which the CAS loop of `atomic` prevents.
        mode = "partial" if det or t.col_reduce == "auto" else t.col_reduce
    # row blocks per launch: the whole grid unless the partial buffer would exceed the budget
    rb_per_launch = row_blocks
    if mode == "partial":
        fit = max(1, t.partial_budget_bytes // (8 * M))
        rb_per_launch = min(row_blocks, max(fit, tu.num_sms(dev)))

    row_m = torch.empty((split, N), **f32)
    row_l = torch.empty((split, N), **f32)
    pos_part = torch.empty((split, N), **f32)
    cnt_part = torch.empty((split, N), **f32) if classes else torch.empty((1,), **f32)
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
    no_ints = torch.empty((1,), dtype=torch.int64, device=dev)
    prec = tu.input_precision(query.dtype)
    MERGE_BLOCK = 1024 if tu.num_sms(dev) else 256

    with tu.device_guard(dev):
        for rb0 in range(0, row_blocks, rb_per_launch):
            nrb = min(rb_per_launch, row_blocks - rb0)
            _lse_fwd_kernel[(nrb, split)](
                query, keys, scale, labels if labels is not None else no_ints,
                row_classes if classes else no_ints, col_classes if classes else no_ints,
                row_groups if groups else no_ints, col_groups if groups else no_ints,
                guide_query if guide else dummy, guide_keys if guide else dummy,
                guide_threshold if guide else dummy,
                row_m, row_l, col_m, col_l, packed, pos_part, cnt_part,
                N, M, D, rb0 * BM, cols_per_split, query.stride(0), keys.stride(0),
                DG, guide_query.stride(0) if guide else 0, guide_keys.stride(0) if guide else 0,
                tu.bucket(N), tu.bucket(M),
                BLOCK_M=BM, BLOCK_D=BD, D_SINGLE=d_single, HAS_LABELS=labels is not None,
                HAS_CLASSES=classes, EXCLUDE_SELF=bool(exclude_self),
                COMPUTE_COL=mode != "none", COL_ATOMIC=mode == "atomic",
                HAS_GROUPS=groups, HAS_GUIDE=guide, MASKED=bool(exclude_self) or groups or guide,
                BLOCK_DG=BDG, DG_SINGLE=dg_single, INPUT_PRECISION=prec,
                **tu.LAUNCH_OPTS,
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
    # Per-split partials folded in a fixed order (deterministic); a single split is exact.
    pos = pos_part[0] if split == 1 else pos_part.sum(0)
    count = (cnt_part[0] if split == 1 else cnt_part.sum(0)) if classes else dummy[:0]
    return row_lse, col_lse, pos, count
