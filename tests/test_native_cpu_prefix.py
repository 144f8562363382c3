"""torch.ops.ck_native's prefix (Matryoshka) ops on CPU (csrc/cpu/prefix_cpu.cpp) through
``backends.native``'s callables, against ``backends.reference``'s same-named callables in float64
(the reference itself is checked against a dense per-prefix loop in tests/test_matryoshka.py):
dims off the tile boundaries, k = 1, ragged shapes, the factors r / c, every positive rule,
exclusion and the masks, every gradient subset; float32 and bfloat16 by the relative rule;
bitwise repeatability; the fake kernels."""
from __future__ import annotations

import itertools

import pytest
import torch

from helpers import IN_CI, assert_relative_rule, select_isa

_native = pytest.importorskip("contrastive_kernels._native")
_ok, _why = _native.load()
if not _ok:
    if IN_CI:
        pytest.fail(_why, pytrace=False)
    pytest.skip(_why, allow_module_level=True)
if not hasattr(torch.ops.ck_native, "lse_prefix_fwd"):
    pytest.skip("the native extension predates the prefix ops: rebuild it", allow_module_level=True)

from contrastive_kernels.backends import native, reference  # noqa: E402

F64 = torch.float64
STAT = {torch.float64: torch.float64, torch.float32: torch.float32,
        torch.bfloat16: torch.float32}
# (N, M, D, dims): dims off the 16/64-element boundaries, d_k < D, k = 1
GEOMETRIES = [(37, 133, 13, (1, 5, 13)), (130, 257, 40, (8, 16, 40)),
              (37, 133, 40, (3, 17, 29)), (130, 257, 13, (13,)), (37, 133, 40, (7,))]
GRAD_SUBSETS = [s for n in (1, 2, 3) for s in itertools.combinations(("row", "col", "pos"), n)]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def features(n, m, d, dtype, seed=0):
    """float64 features rounded to ``dtype`` (so the float64 truth sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=F64) / d ** 0.5
    k = torch.randn(m, d, generator=gen, dtype=F64) / d ** 0.5
    return q.to(dtype).to(F64), k.to(dtype).to(F64)


def factors(n, m, kk, st, seed=5):
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(n, kk, generator=gen, dtype=F64) * 1.5 + 0.5
    c = torch.rand(m, kk, generator=gen, dtype=F64) * 1.5 + 0.5
    return r.to(st).to(F64), c.to(st).to(F64)


def positives(kind, n, m, seed=2):
    """(labels, row_classes, col_classes) of a positive rule."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "diag":
        return None, None, None
    if kind == "labels":
        lab = torch.randint(0, m, (n,), generator=gen)
        lab[::3] = torch.arange(n)[::3]  # some labels on the (excludable) self pair
        return lab, None, None
    rc = torch.randint(0, 5, (n,), generator=gen) * 1_000_003 - 7
    cc = torch.randint(0, 5, (m,), generator=gen) * 1_000_003 - 7
    return None, rc, cc


def masks(kind, n, m, st, seed=4, empty_row=True):
    """The optional exclusion masks as keyword arguments; with a guide, row 3's threshold is
    −1e30 so that every non-designated pair of it is excluded (a row with nothing left once its
    designated positive is excluded too)."""
    if kind == "none":
        return {}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    if kind in ("groups", "both"):
        out["row_groups"] = torch.randint(0, 7, (n,), generator=gen)
        out["col_groups"] = torch.randint(0, 7, (m,), generator=gen)
    if kind in ("guide", "both"):
        gq = torch.randn(n, 6, generator=gen, dtype=F64).to(st)
        gk = torch.randn(m, 6, generator=gen, dtype=F64).to(st)
        thr = torch.full((n,), 1.0, dtype=F64).to(st)
        if empty_row:
            thr[3] = -1e30
        out.update(guide_query=gq, guide_keys=gk, guide_threshold=thr)
    return out


def upstreams(kk, n, m, st, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(kk, x, generator=gen, dtype=F64).to(st)
            for name, x in (("row", n), ("col", m), ("pos", n))}


def cast(x, dtype):
    return None if x is None else (x.to(dtype) if x.is_floating_point() else x)


def cast_masks(mk, st):
    return {name: cast(t, st) for name, t in mk.items()}


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------

def close64(out, gt, name, rtol=1e-12):
    """float64: equal ±inf patterns, finite entries within rtol of the tensor's largest |gt|."""
    assert out.dtype == F64 and out.shape == gt.shape, (name, out.dtype, out.shape, gt.shape)
    assert not torch.isnan(out).any(), f"{name}: NaN"
    assert torch.equal(torch.isinf(out), torch.isinf(gt)), f"{name}: ±inf pattern differs"
    assert torch.equal(out[torch.isinf(out)], gt[torch.isinf(gt)]), f"{name}: ±inf signs differ"
    fin = torch.isfinite(gt)
    if not fin.any():
        return
    err = float((out[fin] - gt[fin]).abs().max())
    bound = rtol * max(float(gt[fin].abs().max()), 1e-300)
    assert err <= bound, f"{name}: max |err| {err:.3e} > {bound:.3e}"


def relative(out, same, gt, dtype, name):
    assert out.dtype == STAT[dtype] and out.shape == gt.shape, (name, out.dtype, out.shape)
    assert torch.equal(torch.isinf(out), torch.isinf(gt)), f"{name}: ±inf pattern differs"
    fin = torch.isfinite(gt)
    if fin.all():
        assert_relative_rule(out, same, gt, STAT[dtype], name)
    else:
        assert_relative_rule(out[fin], same[fin], gt[fin], STAT[dtype], name)


# ---------------------------------------------------------------------------------------------
# log-sum-exp family
# ---------------------------------------------------------------------------------------------

def lse_call(mod, q, k, scale, dims, r, c, pos, excl, compute_col, mk, grads):
    lab, rc, cc = pos
    fwd = mod.lse_prefix_fwd(q, k, scale, list(dims), r, c, lab, rc, cc, excl, compute_col, **mk)
    outs = {name: t for name, t in zip(("row_lse", "col_lse", "pos", "pos_count"), fwd)}
    row_lse, col_lse = fwd[0], fwd[1]
    for subset, (gr, gc, gp) in grads.items():
        bwd = mod.lse_prefix_bwd(q, k, scale, list(dims), r, c, lab, rc, cc, excl, row_lse,
                                 col_lse, gr, gc, gp, **mk)
        for name, t in zip(("grad_query", "grad_keys", "row_dot", "col_dot"), bwd):
            outs[f"{name}[{'+'.join(subset)}]"] = t
    return outs


def lse_case(dtype, geometry, pos_kind, excl, mask_kind, scaled, compute_col, subsets=None,
             empty_row=True):
    """{output name: (native, float64 truth, same-dtype reference)}."""
    n, m, d, dims = geometry
    st = STAT[dtype]
    kk = len(dims)
    q, k = features(n, m, d, dtype)
    r, c = factors(n, m, kk, st) if scaled else (None, None)
    pos = positives(pos_kind, n, m)
    mk = masks(mask_kind, n, m, st, empty_row=empty_row)
    up = upstreams(kk, n, m, st)
    subsets = subsets or [s for s in GRAD_SUBSETS if compute_col or "col" not in s]

    def grads_in(dt):
        return {s: tuple(up[g].to(dt) if g in s else None for g in ("row", "col", "pos"))
                for s in subsets}

    def run(mod, in_dtype, stat):
        scale = torch.tensor(4.0, dtype=stat)
        return lse_call(mod, q.to(in_dtype), k.to(in_dtype), scale, dims, cast(r, stat),
                        cast(c, stat), pos, excl, compute_col, cast_masks(mk, stat),
                        grads_in(stat))

    ours = run(native, dtype, st)
    truth = run(reference, F64, F64)
    same = run(reference, dtype, st) if dtype != F64 else truth
    return {name: (ours[name], truth[name], same[name]) for name in truth}


def check_lse(results, dtype):
    for name, (out, gt, same) in results.items():
        if dtype == F64:
            close64(out, gt, name)
        else:
            relative(out, same, gt, dtype, name)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "rc"])
@pytest.mark.parametrize("mask_kind", ["none", "groups", "guide", "both"])
@pytest.mark.parametrize("excl", [False, True], ids=["all", "exclude_self"])
@pytest.mark.parametrize("pos_kind", ["diag", "labels", "classes"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}x{g[2]}-{g[3]}")
def test_lse_prefix_float64(geometry, pos_kind, excl, mask_kind, scaled):
    compute_col = mask_kind in ("none", "guide") or not scaled  # both settings, deterministic
    check_lse(lse_case(F64, geometry, pos_kind, excl, mask_kind, scaled, compute_col), F64)


@pytest.mark.parametrize("pos_kind", ["diag", "classes"])
def test_lse_prefix_float64_no_columns(pos_kind):
    """compute_col off: col_lse is (k, 0) and the backward never reads it."""
    res = lse_case(F64, GEOMETRIES[1], pos_kind, True, "both", True, False)
    assert res["col_lse"][0].shape == (3, 0)
    check_lse(res, F64)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "rc"])
@pytest.mark.parametrize("pos_kind,excl,mask_kind", [("diag", False, "none"),
                                                     ("labels", True, "groups"),
                                                     ("classes", True, "both")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=lambda g: f"{g[0]}x{g[1]}x{g[2]}-{g[3]}")
def test_lse_prefix_low_precision(geometry, dtype, pos_kind, excl, mask_kind, scaled):
    check_lse(lse_case(dtype, geometry, pos_kind, excl, mask_kind, scaled, True,
                       empty_row=False), dtype)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_lse_prefix_isa_paths(monkeypatch, isa):
    select_isa(monkeypatch, isa)
    check_lse(lse_case(torch.float32, GEOMETRIES[1], "classes", True, "groups", True, True,
                       subsets=[("row", "col", "pos")]), torch.float32)


# ---------------------------------------------------------------------------------------------
# sigmoid family
# ---------------------------------------------------------------------------------------------

def sigmoid_case(dtype, geometry, pos_kind, scaled, diagonal=True):
    n, m, d, dims = geometry
    st = STAT[dtype]
    kk = len(dims)
    q, k = features(n, m, d, dtype, seed=7)
    r, c = factors(n, m, kk, st, seed=8) if scaled else (None, None)
    _, rc, cc = positives("classes", n, m) if pos_kind == "classes" else (None, None, None)
    up = upstreams(kk, n, m, st, seed=9)["row"]

    def run(mod, in_dtype, stat):
        scale, bias = torch.tensor(6.0, dtype=stat), torch.tensor(-2.5, dtype=stat)
        qq, kq = q.to(in_dtype), k.to(in_dtype)
        rr, cr = cast(r, stat), cast(c, stat)
        loss = mod.sigmoid_prefix_fwd(qq, kq, scale, bias, list(dims), rr, cr, rc, cc, diagonal)
        bwd = mod.sigmoid_prefix_bwd(qq, kq, scale, bias, list(dims), rr, cr, rc, cc, diagonal,
                                     up.to(stat))
        names = ("row_loss", "grad_query", "grad_keys", "row_dot", "col_dot", "grad_bias_row")
        return dict(zip(names, (loss,) + tuple(bwd)))

    ours = run(native, dtype, st)
    truth = run(reference, F64, F64)
    same = run(reference, dtype, st) if dtype != F64 else truth
    return {name: (ours[name], truth[name], same[name]) for name in truth}


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "rc"])
@pytest.mark.parametrize("pos_kind,diagonal", [("none", True), ("none", False), ("classes", True)])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}x{g[1]}x{g[2]}-{g[3]}")
def test_sigmoid_prefix_float64(geometry, pos_kind, diagonal, scaled):
    check_lse(sigmoid_case(F64, geometry, pos_kind, scaled, diagonal), F64)


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "rc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=lambda g: f"{g[0]}x{g[1]}x{g[2]}-{g[3]}")
def test_sigmoid_prefix_low_precision(geometry, dtype, scaled):
    check_lse(sigmoid_case(dtype, geometry, "classes", scaled), dtype)


# ---------------------------------------------------------------------------------------------
# repeatability, errors, fake kernels
# ---------------------------------------------------------------------------------------------

def _all_outputs(dtype):
    """Every output of both families at a shape with several row groups and column tiles."""
    n, m, d, dims = 1030, 300, 40, (8, 16, 40)
    q, k = features(n, m, d, dtype, seed=11)
    q, k = q.to(dtype), k.to(dtype)
    st = STAT[dtype]
    r, c = (t.to(st) for t in factors(n, m, 3, st))
    rc, cc = positives("classes", n, m)[1:]
    mk = cast_masks(masks("both", n, m, st, empty_row=False), st)
    up = upstreams(3, n, m, st)
    scale = torch.tensor(5.0, dtype=st)
    fwd = native.lse_prefix_fwd(q, k, scale, dims, r, c, None, rc, cc, True, True, **mk)
    bwd = native.lse_prefix_bwd(q, k, scale, dims, r, c, None, rc, cc, True, fwd[0], fwd[1],
                                up["row"], up["col"], up["pos"], **mk)
    bias = torch.tensor(-1.0, dtype=st)
    sf = native.sigmoid_prefix_fwd(q, k, scale, bias, dims, r, c, None, None, True)
    sb = native.sigmoid_prefix_bwd(q, k, scale, bias, dims, r, c, None, None, True, up["row"])
    return fwd + bwd + (sf,) + sb


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_prefix_bitwise_repeatable(dtype):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        first = _all_outputs(dtype)
        for _ in range(2):
            again = _all_outputs(dtype)
            for i, (a, b) in enumerate(zip(first, again)):
                assert torch.equal(a, b), f"output {i} differs between repeats"
    finally:
        torch.set_num_threads(threads)


def test_prefix_bad_dims():
    q, k = features(5, 6, 8, F64)
    s = torch.tensor(1.0, dtype=F64)
    for dims in ([], [4, 4], [0, 4], [3, 9], [5, 2]):
        with pytest.raises(RuntimeError, match="dims"):
            native.lse_prefix_fwd(q, k, s, dims, None, None, None, None, None, False, True)
    with pytest.raises(RuntimeError, match="row_scale"):
        native.lse_prefix_fwd(q, k, s, [4, 8], torch.ones(5, 3, dtype=F64),
                              torch.ones(6, 2, dtype=F64), None, None, None, False, True)


def test_prefix_no_upstream_gradient():
    q, k = features(9, 11, 8, F64)
    s = torch.tensor(2.0, dtype=F64)
    r, c, *_ = native.lse_prefix_fwd(q, k, s, [3, 8], None, None, None, None, None, False, True)
    outs = native.lse_prefix_bwd(q, k, s, [3, 8], None, None, None, None, None, False, r, c,
                                 None, None, None)
    assert [tuple(t.shape) for t in outs] == [(9, 8), (11, 8), (2, 9), (2, 11)]
    assert all(not t.any() for t in outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_prefix_fake_kernels(dtype):
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, m, d, dims = 7, 9, 12, [2, 5, 12]
    st = STAT[dtype]
    ops = torch.ops.ck_native
    with FakeTensorMode():
        q, k = torch.empty(n, d, dtype=dtype), torch.empty(m, d, dtype=dtype)
        s, b = torch.empty((), dtype=st), torch.empty((), dtype=st)
        r, c = torch.empty(n, 3, dtype=st), torch.empty(m, 3, dtype=st)
        rc, cc = torch.empty(n, dtype=torch.int64), torch.empty(m, dtype=torch.int64)
        for compute_col, classes in ((True, True), (False, False)):
            cls = (rc, cc) if classes else (None, None)
            fwd = ops.lse_prefix_fwd(q, k, s, dims, r, c, None, *cls, True, compute_col)
            assert [tuple(t.shape) for t in fwd] == [(3, n), (3, m if compute_col else 0),
                                                     (3, n), (n if classes else 0,)]
            assert all(t.dtype == st for t in fwd)
        g = torch.empty(3, n, dtype=st)
        bwd = ops.lse_prefix_bwd(q, k, s, dims, r, c, None, None, None, False, g,
                                 torch.empty(3, m, dtype=st), g, None, None)
        assert [tuple(t.shape) for t in bwd] == [(n, d), (m, d), (3, n), (3, m)]
        assert all(t.dtype == st for t in bwd)
        loss = ops.sigmoid_prefix_fwd(q, k, s, b, dims, None, None, None, None, True)
        assert tuple(loss.shape) == (3, n) and loss.dtype == st
        sb = ops.sigmoid_prefix_bwd(q, k, s, b, dims, r, c, None, None, True, g)
        assert [tuple(t.shape) for t in sb] == [(n, d), (m, d), (3, n), (3, m), (3, n)]
        assert all(t.dtype == st for t in sb)
