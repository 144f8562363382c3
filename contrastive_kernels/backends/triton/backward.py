"""Triton backward of both op families: feature gradients from one recomputation of each tile.

    lse_bwd(query, keys, scale, labels, row_classes, col_classes, exclude_self, row_lse, col_lse,
            grad_row, grad_col, grad_pos, row_groups=None, col_groups=None, guide_query=None,
            guide_keys=None, guide_threshold=None) -> (grad_query (N, D), grad_keys (M, D))
    sigmoid_bwd(...) (see ``sigmoid.py``) -> (grad_query, grad_keys, grad_bias_row (N,))

``_bwd_kernel`` is one generic "A against B" kernel: A-rows are owned by the program, B is swept
in tiles (``tiles.scaled_tile``, the forward's rounding). It forms the logit gradient G of the
tile from the family's weights —

    log-sum-exp:  G = [kept]·(g_a·exp(S − lse_a) + g_b·exp(S − lse_b)) + g_pos·[positive]
                  (both weights ≤ 1; excluded pairs — the self pair, same-group pairs, guided
                  false negatives, ``tiles.kept_pairs`` as in the forward — are dropped by a
                  select, and an excluded designated positive is no positive; in the transposed
                  launch the groups and guides swap sides and the thresholds are read per B row)
    sigmoid:      G = g·(−z)·σ(−z·(S + b)),  z = +1 on positive pairs, −1 elsewhere

— and emits dA = s·G·B (owned: registers or plain RMW) and, optionally, dB = s·Gᵀ·A (float32
``atomic_add``), and for the sigmoid family the row sums of G (the bias gradient). A ``None`` grad
is zero and its statistic is never read.

Backward modes (``CK_TRITON_BWD`` forces one; ``auto`` picks per ``tuning.bwd_mode``)
----------------------------------------------------------------------------------------
* ``fused`` (default while D ≤ 128, the dQ accumulator resident in registers): one launch, A = Q,
  B = K; dQ accumulated in registers over the column sweep (``D_SINGLE``) or read-modify-written by
  its owner per D-chunk; dK by float32 ``atomic_add`` — the order of the atomics varies run to run,
  so the last bits of dK do too. 6·N·M·D FLOPs.
* ``gemm`` (default for D > 128, where the fused kernel spills — offline sm_90 compile at D = 512 —
  and the deterministic choice there): G is written for a slab of rows (input dtype, ≤
  ``gemm_budget_bytes``), then dQ[slab] = G·K and dK += Gᵀ·Q[slab] run on cuBLAS. Per slab:
  2·R·M·D FLOPs in the kernel, 4·R·M·D in the GEMMs, 3 passes of R·M·elem bytes; no atomics.
  The sigmoid row sums of G land in their rows of one (N,) output: directly with one column split,
  else through one (split, R) scratch reused by every slab and summed over the splits in order.
* ``two_pass`` (deterministic while D ≤ 128): launch 1 A = Q, B = K emits dQ; launch 2 A = K,
  B = Q (weights, labels and classes swapped) emits dK. Each tile of S is computed twice:
  8·N·M·D instead of 6·N·M·D FLOPs, no atomics, bitwise identical run to run.
``CK_TRITON_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)`` selects ``two_pass`` /
``gemm`` (and the forward's ``partial`` column reduction).

16-bit inputs: the second-stage dots use G cast to the input dtype (tensor cores, as in
FlashAttention). For float16 G is first multiplied by a power of two 2^-k with
max|G| ≤ Σ max|grad| ≤ 2^k, so the largest entries sit near 1 and tiny ones (≈ grad/M) do not flush
to zero in fp16's narrow range; the factor is divided out exactly at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning as tu
from .tiles import LOG2E, kept_pairs, load_rows, scaled_tile, sigmoid_terms


@triton.autotune(configs=tu.bwd_configs(),
                 key=["D", "NA_KEY", "NB_KEY", "BLOCK_M", "BLOCK_D", "D_SINGLE", "SIGMOID", "EMIT_DB",
                      "DA_ATOMIC", "STORE_G", "HAS_CLASSES", "EXCLUDE_SELF", "HAS_GROUPS", "HAS_GUIDE",
                      "BLOCK_DG", "DG_SINGLE", "INPUT_PRECISION"],
                 reset_to_zero=["dA_ptr", "dB_ptr"])
@triton.jit
def _bwd_kernel(
    A, B, scale_ptr, gscale_ptr, bias_ptr, labels_ptr,
    ca_ptr, cb_ptr,            # classes of the A rows / B rows [HAS_CLASSES]
    gra_ptr, grb_ptr,          # groups of the A rows / B rows [HAS_GROUPS]
    GA, GB, thr_ptr,           # float32 guides of the A rows / B rows, the query rows' thresholds
                               # (A rows when LABELS_ON_A, else B rows) [HAS_GUIDE]
    lse_a_ptr, g_a_ptr,        # per A-row: natural-log lse and upstream weight
    lse_b_ptr, g_b_ptr,        # per B-row
    gpos_ptr,                  # per query row (A when LABELS_ON_A, else B)
    dA_ptr, dB_ptr,            # float32 (SPLIT, A rows, D) / (NB, D), zero-initialised
    G_ptr,                     # (rows of this launch, NB) G tile store [STORE_G]
    gsum_ptr,                  # float32 row sums of G [EMIT_GSUM], row r of split s at
                               # s·ld_gsum + (r − row_start): indexed from this launch's first row
    NA, NB, D, row_start, cols_per_split, stride_a, stride_b, ldg,
    ld_da, ld_gsum,            # elements between the splits' slices of dA (private) and of gsum
    DG, stride_ga, stride_gb,
    NA_KEY, NB_KEY,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, SIGMOID: tl.constexpr,
    HAS_GA: tl.constexpr, HAS_GB: tl.constexpr, HAS_GPOS: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_CLASSES: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    DIAGONAL: tl.constexpr, LABELS_ON_A: tl.constexpr, EMIT_DB: tl.constexpr,
    DA_ATOMIC: tl.constexpr, STORE_G: tl.constexpr, EMIT_GSUM: tl.constexpr,
    USE_GSCALE: tl.constexpr, HAS_GROUPS: tl.constexpr, HAS_GUIDE: tl.constexpr,
    MASKED: tl.constexpr, BLOCK_DG: tl.constexpr, DG_SINGLE: tl.constexpr,
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
    if SIGMOID:
        bias = tl.load(bias_ptr).to(tl.float32)
    cdt = A.dtype.element_ty  # dtype of the second-stage dot operands

    if HAS_GA:  # other=0 weight on padded rows; the final where() drops them anyway
        ga = tl.load(g_a_ptr + rows, mask=row_valid, other=0.0) * gs
        if not SIGMOID:
            lse_a = tl.load(lse_a_ptr + rows, mask=row_valid, other=0.0)
    if HAS_CLASSES:
        ca = tl.load(ca_ptr + rows, mask=row_valid, other=0)
    if HAS_GPOS:
        if LABELS_ON_A:
            gpa = tl.load(gpos_ptr + rows, mask=row_valid, other=0.0) * gs
    if HAS_GPOS or HAS_GUIDE:  # the labelled column of each A row (the designated positives)
        if LABELS_ON_A:
            if HAS_LABELS:
                lab_a = tl.load(labels_ptr + rows, mask=row_valid, other=-1).to(tl.int32)
            else:
                lab_a = rows
    if HAS_GROUPS:
        gra = tl.load(gra_ptr + rows, mask=row_valid, other=0)
    else:
        gra = 0
    if HAS_GUIDE:
        ga_off = rows64 * stride_ga
        if LABELS_ON_A:
            thr_a = tl.load(thr_ptr + rows, mask=row_valid, other=0.0)
    else:
        ga_off = 0
    if D_SINGLE:
        a = load_rows(A, a_off, row_valid, 0, D, BLOCK_D)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    else:
        a = 0  # unused: scaled_tile re-loads A chunks
    if EMIT_GSUM:
        gsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if DA_ATOMIC:  # all splits add into one buffer
        da_base = dA_ptr
    else:  # this split's private slice, summed on the host in a fixed order (deterministic).
        # The slice stride comes from the buffer, not from NA: NA is this launch's row stop.
        da_base = dA_ptr + pid_s.to(tl.int64) * ld_da

    col_lo = pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, NB)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        ss, cols, col_valid, b_off, b = scaled_tile(A, B, a, a_off, row_valid, n0, col_hi, stride_b,
                                                    scale, D, BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE,
                                                    INPUT_PRECISION)
        cols64 = cols.to(tl.int64)
        if HAS_CLASSES:
            cb = tl.load(cb_ptr + cols, mask=col_valid, other=0)
        if SIGMOID:
            # (−z)·σ(−z·L) with L = S + b: z = +1 on positives, where x = −L
            if HAS_CLASSES:
                posm = ca[:, None] == cb[None, :]
            elif DIAGONAL:
                posm = rows[:, None] == cols[None, :]
            else:
                posm = (rows[:, None] < 0) & (cols[None, :] < 0)  # no positives (all false)
            lg = ss + bias
            x = tl.where(posm, -lg, lg)
            _, sig = sigmoid_terms(x)
            w = tl.where(posm, -sig, sig)
            if HAS_GA:
                g = ga[:, None] * w
            else:
                gb = tl.load(g_b_ptr + cols, mask=col_valid, other=0.0) * gs
                g = gb[None, :] * w
        else:
            # G in fp32 from the same rounded S as the forward; each S - lse <= 0 up to rounding,
            # so every weight is <= 1 (see the forward for why log2(e) is not folded into the scale)
            g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            if HAS_GA:
                g += ga[:, None] * tl.exp2((ss - lse_a[:, None]) * LOG2E)
            if HAS_GB:
                gb = tl.load(g_b_ptr + cols, mask=col_valid, other=0.0) * gs
                lse_b = tl.load(lse_b_ptr + cols, mask=col_valid, other=0.0)
                g += gb[None, :] * tl.exp2((ss - lse_b[None, :]) * LOG2E)
            if HAS_GPOS or HAS_GUIDE:
                # the designated positives of the tile (in the query × key orientation)
                if HAS_CLASSES:
                    desig = ca[:, None] == cb[None, :]
                elif LABELS_ON_A:
                    desig = lab_a[:, None] == cols[None, :]
                else:  # A = keys, B = queries: B-row i is positive for A-row l_i
                    if HAS_LABELS:
                        lab_b = tl.load(labels_ptr + cols, mask=col_valid, other=-1).to(tl.int32)
                    else:
                        lab_b = cols
                    desig = rows[:, None] == lab_b[None, :]
            else:
                desig = 0
            if MASKED:
                if HAS_GUIDE:
                    if LABELS_ON_A:
                        thr = thr_a[:, None]
                    else:  # the thresholds belong to the query rows, here the B rows
                        thr = tl.load(thr_ptr + cols, mask=col_valid, other=0.0)[None, :]
                else:
                    thr = 0.0
                kp = kept_pairs(rows, cols, col_valid, gra, grb_ptr, desig, GA, GB, ga_off, row_valid,
                                cols64 * stride_gb, thr, DG, EXCLUDE_SELF, HAS_GROUPS, HAS_GUIDE,
                                BLOCK_M, BLOCK_N, BLOCK_DG, DG_SINGLE)
                # a select, not a multiply: exp(S - lse) of a row with nothing kept may be inf·0
                g = tl.where(kp, g, 0.0)
            if HAS_GPOS:
                hit = desig
                if MASKED:  # never a positive on an excluded pair
                    hit = hit & kp
                if LABELS_ON_A:
                    g += tl.where(hit, gpa[:, None], 0.0)
                else:
                    gpb = tl.load(gpos_ptr + cols, mask=col_valid, other=0.0) * gs
                    g += tl.where(hit, gpb[None, :], 0.0)
        # padded rows/columns: exp2 of a padded score may be anything, so zero G explicitly
        g = tl.where(row_valid[:, None] & col_valid[None, :], g, 0.0)
        if EMIT_GSUM:
            gsum += tl.sum(g, axis=1)
        gd = g.to(cdt)
        if STORE_G:
            # "gemm" mode: hand the tile to cuBLAS; 2 bytes per logit for 16-bit inputs
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
                bc = load_rows(B, b_off, col_valid, d0, D, BLOCK_D)
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
                    ac = load_rows(A, a_off, row_valid, d0, D, BLOCK_D)
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
    if EMIT_GSUM:
        # relative to row_start: a slab's sums fit a (SPLIT, slab rows) scratch, or go straight
        # into the output slice when SPLIT = 1 (NA is the row *stop*, not a buffer width)
        gsum_off = pid_s.to(tl.int64) * ld_gsum + (rows64 - row_start)
        tl.store(gsum_ptr + gsum_off, gsum / gs, mask=row_valid)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------

def _gscale(dtype, grads):
    # 2^-ceil(log2(Σ max|grad|)) for float16 (see module docstring); 1 otherwise. Computed on the
    # device: no host read.
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


def run_backward(query, keys, scale, *, sigmoid: bool, bias=None, labels=None, row_classes=None,
                 col_classes=None, exclude_self=False, diagonal=False, row_lse=None, col_lse=None,
                 grad_row=None, grad_col=None, grad_pos=None, row_groups=None, col_groups=None,
                 guide_query=None, guide_keys=None, guide_threshold=None):
    """The three backward modes for either family; returns (gq, gk) or, for sigmoid, (gq, gk, gsum).
    The masks (groups, guide) belong to the log-sum-exp family only."""
    query, keys, labels, row_classes, col_classes = tu.prepare(query, keys, labels, row_classes,
                                                                col_classes)
    row_groups, col_groups, guide_query, guide_keys, guide_threshold = tu.prepare_masks(
        query, keys, row_groups, col_groups, guide_query, guide_keys, guide_threshold)
    groups = row_groups is not None
    guide = guide_query is not None
    if sigmoid and (groups or guide):
        raise ValueError("the sigmoid family takes no group or guide masks")
    t = tu.current_tuning()
    N, D = query.shape
    M = keys.shape[0]
    dev = query.device
    f32 = dict(dtype=torch.float32, device=dev)
    if grad_row is None and grad_col is None and grad_pos is None:
        zeros = (torch.zeros((N, D), **f32), torch.zeros((M, D), **f32))
        return zeros + ((torch.zeros((N,), **f32),) if sigmoid else ())
    BM = t.bwd_block_m
    BD, d_single = tu.block_d(D, t.bwd_max_single_d, t.chunk_d)
    mode = tu.bwd_mode(t, d_single)
    BD_G, d_single_g = tu.block_d(D, t.fwd_max_single_d, t.chunk_d)
    prec = tu.input_precision(query.dtype)
    gscale = _gscale(query.dtype, (grad_row, grad_col, grad_pos))
    dummy = torch.empty((1,), **f32)
    no_ints = torch.empty((1,), dtype=torch.int64, device=dev)
    classes = row_classes is not None
    DG = guide_query.shape[1] if guide else 0
    BDG, dg_single = tu.block_dg(DG, t.guide_chunk_d)
    # sigmoid: the row sums of G, written per launch into their rows of one (N,) output; splits > 1
    # go through one flat scratch reused by every launch (grown only when a launch plans more
    # splits × rows), so the extra memory is O(N + split·slab rows) at any slab count
    gsum_out = torch.empty((N,), **f32) if sigmoid else None
    gsum_scratch = [torch.empty((0,), **f32)]

    def c(x):
        return dummy if x is None else x.contiguous()

    def launch(A, B, lse_a, g_a, lse_b, g_b, ca, cb, gra, grb, guide_a, guide_b, labels_on_a,
               emit_db, atomic_da_ok, emit_gsum=False, G=None, row_start=0, row_stop=None):
        NA, NB = A.shape[0], B.shape[0]
        row_stop = NA if row_stop is None else row_stop
        bm = BM if G is None else t.fwd_block_m  # the G writer is a GEMM + epilogue, like the forward
        row_blocks = triton.cdiv(row_stop - row_start, bm)
        split, cols_per_split = tu.plan_split(row_blocks, NB, dev, t.split)
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
        nr = row_stop - row_start
        if not emit_gsum:
            gsum, ld_gsum = dummy, 0
        elif split == 1:  # every row stored by exactly one program: straight into the output
            gsum, ld_gsum = gsum_out[row_start:row_stop], 0
        else:
            if gsum_scratch[0].numel() < split * nr:
                gsum_scratch[0] = torch.empty((split * nr,), **f32)
            gsum, ld_gsum = gsum_scratch[0][: split * nr].view(split, nr), nr
        _bwd_kernel[(row_blocks, split)](
            A, B, scale, gscale if gscale is not None else dummy, c(bias),
            labels if labels is not None else no_ints,
            ca if ca is not None else no_ints, cb if cb is not None else no_ints,
            gra if groups else no_ints, grb if groups else no_ints,
            guide_a if guide else dummy, guide_b if guide else dummy,
            guide_threshold if guide else dummy,
            c(lse_a) if g_a is not None and lse_a is not None else dummy, c(g_a),
            c(lse_b) if g_b is not None and lse_b is not None else dummy, c(g_b),
            c(grad_pos), dA, dB, G if G is not None else dummy, gsum,
            row_stop, NB, D, row_start, cols_per_split, A.stride(0), B.stride(0),
            G.stride(0) if G is not None else 0,
            dA.stride(0) if dA.dim() == 3 else 0, ld_gsum,
            DG, guide_a.stride(0) if guide else 0, guide_b.stride(0) if guide else 0,
            tu.bucket(NA), tu.bucket(NB),
            BLOCK_M=bm, BLOCK_D=BD if G is None else BD_G, D_SINGLE=d_single if G is None else d_single_g,
            SIGMOID=sigmoid, HAS_GA=g_a is not None, HAS_GB=g_b is not None,
            HAS_GPOS=grad_pos is not None, HAS_LABELS=labels is not None, HAS_CLASSES=classes,
            EXCLUDE_SELF=bool(exclude_self), DIAGONAL=bool(diagonal), LABELS_ON_A=labels_on_a,
            EMIT_DB=emit_db, DA_ATOMIC=da_atomic, STORE_G=G is not None, EMIT_GSUM=emit_gsum,
            USE_GSCALE=gscale is not None, HAS_GROUPS=groups, HAS_GUIDE=guide,
            MASKED=bool(exclude_self) or groups or guide, BLOCK_DG=BDG, DG_SINGLE=dg_single,
            INPUT_PRECISION=prec, **tu.LAUNCH_OPTS,
        )
        if emit_gsum and split > 1:  # fixed-order sum over the splits (deterministic)
            torch.sum(gsum, 0, out=gsum_out[row_start:row_stop])
        if dA.dim() == 3:
            dA = dA[0] if dA.shape[0] == 1 else dA.sum(0)
        return dA, dB

    fwd_args = (query, keys, row_lse, grad_row, col_lse, grad_col, row_classes, col_classes,
                row_groups, col_groups, guide_query, guide_keys)
    # the transposed launch: A = keys, B = queries, every per-row input swapped (the guide
    # thresholds stay with the queries: LABELS_ON_A = False reads them per B row)
    bwd_args = ((keys, query, None, None, None, grad_row, col_classes, row_classes, None, None,
                 None, None) if sigmoid else
                (keys, query, col_lse, grad_col, row_lse, grad_row, col_classes, row_classes,
                 col_groups, row_groups, guide_keys, guide_query))
    with tu.device_guard(dev):
        if mode == "fused":
            gq, gk = launch(*fwd_args, True, True, True, emit_gsum=sigmoid)
        elif mode == "two_pass":
            gq, _ = launch(*fwd_args, True, False, False, emit_gsum=sigmoid)
            gk, _ = launch(*bwd_args, False, False, False)
        else:
            # "gemm" (module docstring): G for a slab of rows, then the two GEMMs on cuBLAS
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
                launch(*fwd_args, True, False, False, emit_gsum=sigmoid, G=G, row_start=r0,
                       row_stop=r1)
                Gc = G[: r1 - r0]
                gq[r0:r1] = _mm_f32(Gc, keys)
                _addmm_f32_(gk, Gc.t(), query[r0:r1])
            out_scale = scale.float() if gscale is None else scale.float() / gscale
            gq.mul_(out_scale)
            gk.mul_(out_scale)
    if not sigmoid:
        return gq, gk
    return gq, gk, gsum_out


def lse_bwd(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
            labels: torch.Tensor | None, row_classes: torch.Tensor | None,
            col_classes: torch.Tensor | None, exclude_self: bool, row_lse: torch.Tensor,
            col_lse: torch.Tensor, grad_row: torch.Tensor | None, grad_col: torch.Tensor | None,
            grad_pos: torch.Tensor | None, row_groups: torch.Tensor | None = None,
            col_groups: torch.Tensor | None = None, guide_query: torch.Tensor | None = None,
            guide_keys: torch.Tensor | None = None, guide_threshold: torch.Tensor | None = None):
    """Gradients of Σ grad_row·row_lse + Σ grad_col·col_lse + Σ grad_pos·pos (module docstring)."""
    return run_backward(query, keys, scale, sigmoid=False, labels=labels, row_classes=row_classes,
                        col_classes=col_classes, exclude_self=exclude_self, row_lse=row_lse,
                        col_lse=col_lse, grad_row=grad_row, grad_col=grad_col, grad_pos=grad_pos,
                        row_groups=row_groups, col_groups=col_groups, guide_query=guide_query,
                        guide_keys=guide_keys, guide_threshold=guide_threshold)
