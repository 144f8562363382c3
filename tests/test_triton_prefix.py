"""The Triton prefix (Matryoshka) kernels (``backends/triton/prefix.py``) against the reference
backend's same-named callables (``backends/_prefix.py``, the contract) run in float64 on the same
values, judged by the relative rule with the float32 reference as the same-dtype yardstick.

For ``dims = (d_1 < … < d_k)`` the logit of prefix t is ``S^t = s·r_t·c_t·⟨q[:d_t], k[:d_t]⟩``.
The four backend callables are called directly on float32 CPU tensors under Triton's interpreter
(conftest sets TRITON_INTERPRET=1), with small tiles forced so that every problem has several row
blocks, column tiles and D chunks per segment: BLOCK_M = 16 (37 rows: 3 blocks), BLOCK_N = 32 (the
interpreter's config; 133 columns: 5 tiles, the last ragged), BLOCK_D = 16 (the segment [16, 40)
of D = 40 takes two chunks, the first starting off a chunk boundary). Segment bounds off the tile
boundaries: D = 13 with dims (1, 5, 13), D = 40 with dims (8, 16, 40), and k = 1 with d_k < D
(the tail of the features gets an exactly zero gradient).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import assert_relative_rule, triton_interpreter_module

triton = triton_interpreter_module()

from contrastive_kernels.backends import reference as rb  # noqa: E402
from contrastive_kernels.backends import triton as tk  # noqa: E402
from contrastive_kernels.backends.triton import tuning as tu  # noqa: E402

N, M, DG = 37, 133, 7
SCALE = 10.0
SMALL = dict(fwd_block_m=16, bwd_block_m=16, chunk_d=16, guide_chunk_d=16)
MASK_KEYS = ("row_groups", "col_groups", "guide_query", "guide_keys", "guide_threshold")


def _thresholds(gq: torch.Tensor, gk: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """Per row, a threshold midway in the widest gap between the sorted float64 guide similarities
    near the (1 − frac) quantile: no pair near a tie at float32 precision."""
    sim = gq.double() @ gk.double().T
    srt, _ = sim.sort(dim=1)
    m = sim.shape[1]
    lo, hi = max(1, int(m * (1 - frac - 0.1))), min(m - 1, int(m * (1 - frac + 0.1)))
    gaps = srt[:, lo:hi + 1] - srt[:, lo - 1:hi]
    idx = gaps.argmax(dim=1) + lo
    thr = 0.5 * (srt.gather(1, idx[:, None] - 1) + srt.gather(1, idx[:, None]))[:, 0]
    assert float(gaps.max(dim=1).values.min()) > 1e-3
    return thr.float()


def problem(*, d=13, dims=(1, 5, 13), seed=0, rc=False, labels="none", classes=False,
            groups=None, guide=False, dead=False, exclude_self=False, n=N, m=M):
    """Inputs of one problem (float32 values; every float64 copy sees exactly these values)."""
    N, M = n, m  # noqa: N806  (the module's sizes unless given)
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(M, d, generator=g, dtype=torch.float64), dim=1)
    kk = len(dims)
    kw = dict(query=q.float(), keys=k.float(), scale=torch.tensor(SCALE), dims=tuple(dims),
              row_scale=None, col_scale=None, labels=None, row_classes=None, col_classes=None,
              exclude_self=exclude_self)
    if rc:  # factors around the inverse prefix norms of unit rows: 1/sqrt(d_t/d)
        base = torch.tensor([(d / t) ** 0.5 for t in dims])
        kw["row_scale"] = (base * (0.7 + 0.6 * torch.rand(N, kk, generator=g))).float()
        kw["col_scale"] = (base * (0.7 + 0.6 * torch.rand(M, kk, generator=g))).float()
    if labels == "rand":
        lab = torch.randint(0, M, (N,), generator=g)
        lab[-1] = M - 1  # a positive in the last (ragged) column tile
        kw["labels"] = lab
    if classes:
        kw["row_classes"] = torch.randint(0, 6, (N,), generator=g)
        kw["col_classes"] = torch.randint(0, 6, (M,), generator=g)
    if groups == "doc_to_doc":
        kw["row_groups"], kw["col_groups"] = torch.arange(N), torch.arange(M) % N
    elif groups == "random":
        kw["row_groups"] = torch.randint(0, 5, (N,), generator=g)
        kw["col_groups"] = torch.randint(0, 5, (M,), generator=g)
    if guide or dead:
        gq = torch.randn(N, DG, generator=g)
        gk = torch.randn(M, DG, generator=g)
        thr = _thresholds(gq, gk)
        if dead:  # rows 0 and 5 lose every pair (with the self pair excluded): −inf, zero grads
            thr[[0, 5]] = float("-inf")
        kw.update(guide_query=gq, guide_keys=gk, guide_threshold=thr)
    grads = [torch.randn(kk, x, generator=g, dtype=torch.float64).float() for x in (N, M, N)]
    return kw, grads


def _cast(kw, dtype):
    """The float inputs in ``dtype`` (the guide and the integer vectors stay as they are)."""
    out = dict(kw)
    for key in ("query", "keys", "scale", "row_scale", "col_scale", "bias"):
        if out.get(key) is not None:
            out[key] = out[key].to(dtype)
    return out


def _masks(kw):
    return {key: kw[key] for key in MASK_KEYS if key in kw}


def lse_run(mod, kw, grads, compute_col, dtype, subset=("row", "col", "pos"), cache=None):
    """Forward and backward of ``mod``'s callables; ``cache``: a dict keeping the forward's
    statistics per (module, dtype) for further calls on the same problem."""
    kw = _cast(kw, dtype)
    args = (kw["query"], kw["keys"], kw["scale"], kw["dims"], kw["row_scale"], kw["col_scale"],
            kw["labels"], kw["row_classes"], kw["col_classes"], kw["exclude_self"])
    key = (mod.__name__, dtype, compute_col)
    if cache is not None and key in cache:
        r, c, pos, cnt = cache[key]
    else:
        r, c, pos, cnt = mod.lse_prefix_fwd(*args, compute_col, **_masks(kw))
        if cache is not None:
            cache[key] = (r, c, pos, cnt)
    gr, gc, gp = (x.to(dtype) if name in subset else None
                  for name, x in zip(("row", "col", "pos"), grads))
    if not compute_col:
        gc = None
    gq, gk, rd, cd = mod.lse_prefix_bwd(*args, r, c, gr, gc, gp, **_masks(kw))
    return dict(row_lse=r, col_lse=c, pos=pos, pos_count=cnt, grad_query=gq, grad_keys=gk,
                row_dot=rd, col_dot=cd)


def sigmoid_run(mod, kw, grads, dtype):
    kw = _cast(kw, dtype)
    args = (kw["query"], kw["keys"], kw["scale"], kw["bias"], kw["dims"], kw["row_scale"],
            kw["col_scale"], kw["row_classes"], kw["col_classes"], kw["diagonal"])
    out = mod.sigmoid_prefix_fwd(*args)
    gq, gk, rd, cd, gb = mod.sigmoid_prefix_bwd(*args, grads[0].to(dtype))
    return dict(row=out, grad_query=gq, grad_keys=gk, row_dot=rd, col_dot=cd, grad_bias_row=gb)


def compare(outs, same, gt):
    """Every Triton output against the float64 reference by the relative rule (float32 reference as
    the yardstick); −inf statistics exactly where the float64 reference has them."""
    assert outs.keys() == gt.keys()
    for name, o in outs.items():
        ref, g = same[name], gt[name]
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
            assert_relative_rule(o, ref, g, torch.float32, name=name)


def check_lse(kw, grads, compute_col=True, subset=("row", "col", "pos"), cache=None, **tuning):
    with tu.tuning(**{**SMALL, **tuning}):
        outs = lse_run(tk, kw, grads, compute_col, torch.float32, subset, cache)
    same = lse_run(rb, kw, grads, compute_col, torch.float32, subset, cache)
    gt = lse_run(rb, kw, grads, compute_col, torch.float64, subset, cache)
    compare(outs, same, gt)
    dk = kw["dims"][-1]
    assert not outs["grad_query"][:, dk:].any() and not outs["grad_keys"][:, dk:].any()
    return outs, gt


LSE_CASES = {
    "d13_plain": dict(),
    "d13_rc_labels_self": dict(rc=True, labels="rand", exclude_self=True),
    "d40_rc_labels": dict(d=40, dims=(8, 16, 40), rc=True, labels="rand"),
    "d40_classes_self": dict(d=40, dims=(8, 16, 40), classes=True, exclude_self=True),
    "k1_rc_classes": dict(d=40, dims=(24,), rc=True, classes=True),
    "k1_full_d": dict(d=13, dims=(13,), labels="rand"),
    "d40_groups_guide_labels_self_rc": dict(d=40, dims=(8, 16, 40), rc=True, labels="rand",
                                            groups="random", guide=True, exclude_self=True),
    "d13_doc_to_doc_guide_classes": dict(groups="doc_to_doc", guide=True, classes=True, rc=True),
    "d13_dead_rows": dict(dead=True, exclude_self=True, rc=True),  # (i, i) the only designated
}


# compute_col=False on a subset of the cases (interpreter time)
NO_COL = ("d40_rc_labels", "d40_groups_guide_labels_self_rc", "d13_doc_to_doc_guide_classes")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy: exp of inf etc.
@pytest.mark.parametrize("case,compute_col",
                         [(c, True) for c in LSE_CASES] + [(c, False) for c in NO_COL])
def test_lse_prefix(case, compute_col):
    kw, grads = problem(seed=len(case), **LSE_CASES[case])
    outs, gt = check_lse(kw, grads, compute_col)
    if not compute_col:
        assert outs["col_lse"].shape == (len(kw["dims"]), 0)
    if case == "d13_dead_rows":
        assert torch.isneginf(gt["row_lse"][:, [0, 5]]).all()
        assert not outs["grad_query"][[0, 5]].any()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_lse_prefix_gradient_subsets():
    """Every subset of (grad_row, grad_col, grad_pos), the empty one included."""
    kw, grads = problem(seed=7, rc=True, labels="rand", exclude_self=True)
    cache = {}  # one forward per implementation
    for n in range(4):
        for subset in itertools.combinations(("row", "col", "pos"), n):
            outs, _ = check_lse(kw, grads, True, subset, cache)
            if not subset:
                assert not outs["grad_query"].any() and not outs["row_dot"].any()


SIGMOID_CASES = {
    "d13_diag_rc": dict(kw=dict(rc=True), diagonal=True),
    "d40_diag": dict(kw=dict(d=40, dims=(8, 16, 40)), diagonal=True),
    "d40_classes_rc": dict(kw=dict(d=40, dims=(8, 16, 40), classes=True, rc=True), diagonal=False),
    "k1_no_positives": dict(kw=dict(d=40, dims=(24,), rc=True), diagonal=False),
}


@pytest.mark.parametrize("case", list(SIGMOID_CASES))
def test_sigmoid_prefix(case):
    spec = SIGMOID_CASES[case]
    kw, grads = problem(seed=len(case) + 100, **spec["kw"])
    kw = dict(kw, bias=torch.tensor(-5.0), diagonal=spec["diagonal"])
    with tu.tuning(**SMALL):
        outs = sigmoid_run(tk, kw, grads, torch.float32)
    compare(outs, sigmoid_run(rb, kw, grads, torch.float32),
            sigmoid_run(rb, kw, grads, torch.float64))
    dk = kw["dims"][-1]
    assert not outs["grad_query"][:, dk:].any() and not outs["grad_keys"][:, dk:].any()


def test_rejects_bad_dims():
    kw, grads = problem()
    for dims in ((5, 5), (3, 14), ()):
        with pytest.raises(ValueError, match="dims"):
            tk.lse_prefix_fwd(kw["query"], kw["keys"], kw["scale"], dims, None, None, None, None,
                              None, False, True)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n,m", [(37, 300), (290, 37)],
                         ids=["row_launch_split", "col_launch_split"])
def test_column_splits(n, m, split_spy):
    """Forced column splits (3 asked; aligned to 256 columns: 256 + 44 columns of the 300, 256 +
    34 of the transposed launch's 290): per-split statistics and private gradient slices folded in
    order, for both families. A spy checks that the launches really split."""
    kw, grads = problem(seed=11, n=n, m=m, rc=True, labels="rand", exclude_self=True,
                        groups="random")
    check_lse(kw, grads, split=3)
    assert max(split_spy) >= 2, split_spy
    kw, grads = problem(seed=12, n=n, m=m, rc=True, classes=True)
    kw = dict(kw, bias=torch.tensor(-5.0), diagonal=False)
    with tu.tuning(**SMALL, split=3):
        outs = sigmoid_run(tk, kw, grads, torch.float32)
    compare(outs, sigmoid_run(rb, kw, grads, torch.float32),
            sigmoid_run(rb, kw, grads, torch.float64))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_losses_through_the_ops(loss):
    """The registered prefix ops end to end with backend='triton' (autograd: the factor and scale
    gradients from row_dot/col_dot): loss and the gradients of both features, the logit scale and
    the bias against the reference backend in float32 (yardstick) and float64 (truth)."""
    import contrastive_kernels as ck

    g = torch.Generator().manual_seed(5)
    a64, b64 = torch.randn(40, 24, generator=g, dtype=torch.float64), \
        torch.randn(40, 24, generator=g, dtype=torch.float64)
    dims = (4, 9, 24)

    def run(backend, dtype):
        a, b = (x.to(dtype).requires_grad_() for x in (a64.float(), b64.float()))
        s = torch.tensor(8.0, dtype=dtype, requires_grad=True)
        bias = torch.tensor(-4.0, dtype=dtype, requires_grad=True)
        if loss == "clip":
            out = ck.clip_loss(a, b, s, matryoshka_dims=dims, backend=backend)
            inputs = (a, b, s)
        else:
            out = ck.siglip_loss(a, b, s, bias, matryoshka_dims=dims, backend=backend)
            inputs = (a, b, s, bias)
        out.backward()
        return [out.detach()] + [x.grad for x in inputs]

    with tu.tuning(**SMALL):
        outs = run("triton", torch.float32)
    same, gt = run("reference", torch.float32), run("reference", torch.float64)
    names = ("loss", "grad_a", "grad_b", "grad_scale", "grad_bias")
    for name, o, r, t in zip(names, outs, same, gt):
        assert o.dtype == torch.float32
        assert_relative_rule(o.reshape(-1), r.reshape(-1), t.reshape(-1), torch.float32, name=name)
