"""The Triton log-sum-exp kernels with the two in-tile exclusion masks (same-group pairs, guided
false negatives), against the dense float64 oracle ``reference.lse_op``.

    E = {(i, i) : exclude_self} ∪ {(i, j) : row_groups_i = col_groups_j}
        ∪ {(i, j) : ⟨guide_query_i, guide_keys_j⟩ > guide_threshold_i, j not designated for i}

The backend callables ``lse_fwd`` / ``lse_bwd`` are called directly (float32 CPU tensors under
Triton's interpreter; conftest sets TRITON_INTERPRET=1) in every host-side variant that takes a
different kernel path — column splits, several forward launches, the CAS column merge, D and Dg
chunk loops, the fused / two_pass / gemm backward with slabs and splits, the deterministic modes —
forced through ``tuning.tuning`` with small tiles so that each one really has several tiles, slabs
or splits (a spy on ``tuning.plan_split`` checks the splits). Guide thresholds sit midway in a wide
gap between sorted float64 guide similarities (~30 % of the pairs masked), so no pair is near a tie
and float32 rounding of the guide dot cannot flip a decision.
"""
from __future__ import annotations


import pytest
import torch

from helpers import assert_relative_rule, triton_interpreter_module

triton = triton_interpreter_module()

from contrastive_kernels import reference  # noqa: E402
from contrastive_kernels.backends import triton as tk  # noqa: E402
from contrastive_kernels.backends.triton import tuning as tu  # noqa: E402

N, M, D, DG = 37, 133, 13, 7
SCALE = 10.0


def _thresholds(gq: torch.Tensor, gk: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """Per row, a threshold midway in the widest gap between the sorted float64 guide similarities
    around the (1 − frac) quantile: about ``frac`` of the row's pairs lie above it, none near it."""
    sim = gq.double() @ gk.double().T
    srt, _ = sim.sort(dim=1)
    m = sim.shape[1]
    lo, hi = max(1, int(m * (1 - frac - 0.1))), min(m - 1, int(m * (1 - frac + 0.1)))
    gaps = srt[:, lo:hi + 1] - srt[:, lo - 1:hi]
    idx = gaps.argmax(dim=1) + lo
    thr = 0.5 * (srt.gather(1, idx[:, None] - 1) + srt.gather(1, idx[:, None]))[:, 0]
    assert float(gaps.max(dim=1).values.min()) > 1e-3  # far from ties at float32 precision
    return thr.float()


def problem(*, n=N, m=M, d=D, dg=DG, seed=0, labels="none", classes=False, groups=None,
            guide=False, exclude_self=False, dead=False, dtype=torch.float32):
    """Inputs of one masked problem as keyword arguments of the backend calls.

    groups: None | "doc_to_doc" (row_groups = arange(N), col_groups = arange(M) % N: every row's
    own documents, its labelled positive among them) | "random" (small random group ids).
    dead: rows 0, 5 and n−1 lose every pair (guide threshold −inf, the self pair excluded), and
    two columns ≥ n (never designated) are guide-excluded for every row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    kw = dict(query=q.to(dtype), keys=k.to(dtype), scale=torch.tensor([SCALE]),
              labels=None, row_classes=None, col_classes=None, exclude_self=exclude_self)
    if labels == "rand":
        lab = torch.randint(0, m, (n,), generator=g)
        lab[-1] = m - 1  # a positive in the last (ragged) column tile
        kw["labels"] = lab
    if classes:
        kw["row_classes"] = torch.randint(0, 6, (n,), generator=g)
        kw["col_classes"] = torch.randint(0, 6, (m,), generator=g)
        if dead:  # the dead columns: a class no row has (never designated)
            kw["col_classes"][[n + 3, m - 1]] = 99
    if groups == "doc_to_doc":
        kw["row_groups"], kw["col_groups"] = torch.arange(n), torch.arange(m) % n
    elif groups == "random":
        kw["row_groups"] = torch.randint(0, 5, (n,), generator=g)
        kw["col_groups"] = torch.randint(0, 5, (m,), generator=g)
    if guide or dead:
        gq = torch.randn(n, dg, generator=g)
        gk = torch.randn(m, dg, generator=g)
        if dead:
            gq[:, 0] = gq[:, 0].abs() + 1.0
            gk[[n + 3, m - 1], 0] = 1e3  # above every row's threshold: two dead columns
        thr = _thresholds(gq, gk)
        if dead:
            thr[[0, 5, n - 1]] = float("-inf")
        kw.update(guide_query=gq, guide_keys=gk, guide_threshold=thr)
    grads = [torch.randn(x, generator=g, dtype=torch.float64).float() for x in (n, m, n)]
    return kw, grads


MASK_KEYS = ("row_groups", "col_groups", "guide_query", "guide_keys", "guide_threshold")


def run(kw, grads, compute_col=True):
    masks = {key: kw[key] for key in MASK_KEYS if key in kw}
    args = (kw["query"], kw["keys"], kw["scale"], kw["labels"], kw["row_classes"],
            kw["col_classes"], kw["exclude_self"])
    r, c, pos, cnt = tk.lse_fwd(*args, compute_col, **masks)
    gr, gc, gp = grads
    gq, gk = tk.lse_bwd(*args, r, c, gr, gc if compute_col else None, gp, **masks)
    return r, c, pos, cnt, gq, gk


def oracle(kw, grads, dtype, compute_col=True):
    masks = {key: kw[key] for key in MASK_KEYS if key in kw}
    gr, gc, gp = grads
    return reference.lse_op(kw["query"].to(dtype), kw["keys"].to(dtype), SCALE, kw["labels"],
                            kw["row_classes"], kw["col_classes"], kw["exclude_self"], grad_row=gr,
                            grad_col=gc if compute_col else None, grad_pos=gp, dtype=dtype, **masks)


def check(kw, grads, outs, compute_col=True):
    """Every output against the float64 oracle by the relative rule; −inf statistics (nothing
    kept) exactly where the oracle has them; gradients finite."""
    dtype = kw["query"].dtype
    gt = oracle(kw, grads, torch.float64, compute_col)
    same = oracle(kw, grads, dtype, compute_col)
    names = ("row_lse", "col_lse", "pos", "pos_count", "grad_query", "grad_keys")
    for name, o, ref, g in zip(names, outs, same, gt):
        if name == "col_lse" and not compute_col:
            assert o.shape == (0,)
            continue
        assert o.dtype == torch.float32, f"{name}: {o.dtype}"
        assert o.shape == g.shape, f"{name}: {tuple(o.shape)} vs {tuple(g.shape)}"
        if name == "pos_count":
            assert torch.equal(o.double(), g), f"{name}: counts differ"
            continue
        if name in ("row_lse", "col_lse"):
            dead = torch.isneginf(g)
            assert torch.equal(torch.isneginf(o), dead), f"{name}: −inf where nothing is kept"
            o, ref, g = o[~dead], ref[~dead], g[~dead]
        assert not bool(o.isnan().any()), f"{name}: NaN"
        if o.numel():
            assert_relative_rule(o, ref, g, dtype, name=name)
    return gt


def masked_fraction(kw) -> float:
    exc, _ = reference._op_masks(kw["query"].shape[0], kw["keys"].shape[0], kw["labels"],
                                 kw["row_classes"], kw["col_classes"], kw["exclude_self"], "cpu",
                                 *(kw.get(key) for key in MASK_KEYS))
    return float(exc.double().mean())


# ------------------------------------------------------------------------------------------------
# the masks alone and together, default tuning
# ------------------------------------------------------------------------------------------------

SCENARIOS = {
    "groups_doc_to_doc": dict(groups="doc_to_doc"),
    "groups_doc_to_doc_labels": dict(groups="doc_to_doc", labels="rand"),
    "groups_random": dict(groups="random", labels="rand"),
    "groups_random_classes": dict(groups="random", classes=True),
    "guide_no_labels": dict(guide=True),
    "guide_labels": dict(guide=True, labels="rand"),
    "guide_classes": dict(guide=True, classes=True),
    "all_labels_self": dict(groups="random", guide=True, labels="rand", exclude_self=True),
    "all_classes_self": dict(groups="random", guide=True, classes=True, exclude_self=True),
    "all_doc_to_doc_self": dict(groups="doc_to_doc", guide=True, exclude_self=True),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_masks(scenario):
    kw, grads = problem(seed=1, **SCENARIOS[scenario])
    if kw.get("guide_query") is not None:
        assert kw["guide_query"].shape[1] != kw["query"].shape[1]  # Dg ≠ D
    frac = masked_fraction(kw)
    assert 0.01 < frac < 0.6, frac
    gt = check(kw, grads, run(kw, grads))
    if SCENARIOS[scenario].get("groups") == "doc_to_doc" and kw["labels"] is None:
        # the designated positive (i, i) is same-group excluded: no positive
        assert not gt[2].any()


def test_masks_compute_col_false():
    kw, grads = problem(seed=2, groups="random", guide=True, labels="rand", exclude_self=True)
    check(kw, grads, run(kw, grads, compute_col=False), compute_col=False)


def test_masks_float16_inputs():
    kw, grads = problem(seed=3, groups="random", guide=True, labels="rand", dtype=torch.float16)
    check(kw, grads, run(kw, grads))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: log(0), inf − inf
@pytest.mark.parametrize("classes", [False, True], ids=["labels_none", "classes"])
def test_dead_rows_and_columns(classes):
    """Rows with every pair excluded: row_lse −inf, zero gradient rows, no NaN anywhere; likewise
    two columns excluded for every row (col_lse −inf, zero key gradients)."""
    kw, grads = problem(seed=4, dead=True, exclude_self=True, classes=classes,
                        groups="random" if classes else None)
    if classes:  # same-group exclusion takes the class positives of the dead rows too
        dead_rows = torch.tensor([0, 5, N - 1])
        kw["row_groups"][dead_rows] = 100
        kw["col_groups"][torch.isin(kw["col_classes"], kw["row_classes"][dead_rows])] = 100
    outs = run(kw, grads)
    gt = check(kw, grads, outs)
    r, c, pos, cnt, gq, gk = outs
    for i in (0, 5, N - 1):
        assert r[i] == float("-inf") and gt[0][i] == float("-inf")
        assert pos[i] == 0 and not gq[i].any()
        if classes:
            assert cnt[i] == 0
    for j in (N + 3, M - 1):
        assert c[j] == float("-inf") and not gk[j].any()
    for o in outs:
        assert not bool(o.isnan().any())


# ------------------------------------------------------------------------------------------------
# every host-side variant with several tiles / launches / slabs / splits
# ------------------------------------------------------------------------------------------------

SPLIT_M = 600  # 256-aligned column splits: 3 with split=3, 2 with split=2
SMALL_D = dict(fwd_max_single_d=16, bwd_max_single_d=16, chunk_d=16, guide_chunk_d=16)
# (tuning, sizes, expected largest planned column split, expected plan_split calls: one per
# forward and one per backward launch — 1 fused, 2 two_pass, one per row slab of the gemm mode:
# 3 slabs of 16 rows at N = 37)
VARIANTS = {
    "default": (dict(), {}, 1, 2),
    "block16": (dict(fwd_block_m=16, bwd_block_m=16), {}, 1, 2),
    # D = 37 in 3 chunks of 16, Dg = 40 in 3 chunks of 16 (the guide's K-loop), fused RMW dQ
    "chunked_d_dg": (dict(bwd_mode="fused", **SMALL_D), dict(d=37, dg=40), 1, 2),
    "split3_fused_atomic": (dict(split=3, bwd_mode="fused"), dict(m=SPLIT_M), 3, 2),
    "split3_chunked": (dict(split=3, bwd_mode="fused", **SMALL_D), dict(m=SPLIT_M, d=37, dg=40), 3, 2),
    "col_atomic": (dict(col_reduce="atomic"), {}, 1, 2),
    # 3 forward launches of one 16-row block each, column partials folded between them
    "partial_multi_launch": (dict(col_reduce="partial", partial_budget_bytes=1, fwd_block_m=16), {}, 1, 2),
    "two_pass_split3": (dict(bwd_mode="two_pass", split=3), dict(m=SPLIT_M), 3, 3),
    "gemm_slabs": (dict(bwd_mode="gemm", gemm_min_rows=16, gemm_budget_bytes=1), {}, 1, 4),
    "gemm_slabs_split2_chunked": (dict(bwd_mode="gemm", gemm_min_rows=16, gemm_budget_bytes=1,
                                       split=2, **SMALL_D), dict(m=SPLIT_M, d=37, dg=40), 2, 4),
    "deterministic_two_pass": (dict(deterministic=True, partial_budget_bytes=1, split=2),
                               dict(m=SPLIT_M), 2, 3),
    "deterministic_gemm": (dict(deterministic=True, gemm_min_rows=16, gemm_budget_bytes=1,
                                fwd_block_m=16, **SMALL_D), dict(d=37, dg=40), 1, 4),
}


@pytest.mark.parametrize("classes", [False, True], ids=["labels", "classes"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants(variant, classes, split_spy):
    over, sizes, want_split, want_calls = VARIANTS[variant]
    kw, grads = problem(seed=5, groups="random", guide=True, exclude_self=True,
                        labels="none" if classes else "rand", classes=classes, **sizes)
    with tu.tuning(**over):
        outs = run(kw, grads)
    check(kw, grads, outs)
    assert max(split_spy) == want_split and len(split_spy) == want_calls, split_spy


def test_deterministic_bitwise_with_masks():
    kw, grads = problem(seed=6, groups="random", guide=True, exclude_self=True, labels="rand",
                        m=SPLIT_M)
    with tu.tuning(deterministic=True, split=2):
        a = run(kw, grads)
        b = run(kw, grads)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_mask_arguments_come_together():
    kw, grads = problem(seed=7, groups="random", guide=True)
    args = (kw["query"], kw["keys"], kw["scale"], None, None, None, False, True)
    with pytest.raises(ValueError, match="both or neither"):
        tk.lse_fwd(*args, row_groups=kw["row_groups"])
    with pytest.raises(ValueError, match="all or none"):
        tk.lse_fwd(*args, guide_query=kw["guide_query"], guide_keys=kw["guide_keys"])
