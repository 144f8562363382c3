"""The exclusion masks of the native CPU log-sum-exp ops (csrc/cpu, lse_masks.h): same-group pairs
(row_groups / col_groups) and guided false negatives (guide_query / guide_keys / guide_threshold),
alone, together and with exclude_self, called through contrastive_kernels.backends.native against
the dense float64 oracle reference.lse_op."""
from __future__ import annotations

import itertools

import pytest
import torch

from contrastive_kernels import reference
from helpers import IN_CI, assert_close_f64, assert_relative_rule, grad_logits_dtype, select_isa

_native = pytest.importorskip("contrastive_kernels._native")
_ok, _why = _native.load()
if not _ok:
    if IN_CI:  # CI builds the extension: its absence is a failure there
        pytest.fail(_why, pytrace=False)
    pytest.skip(_why, allow_module_level=True)

from contrastive_kernels.backends import native  # noqa: E402 - needs the extension

STAT = {torch.float64: torch.float64, torch.float32: torch.float32,
        torch.bfloat16: torch.float32, torch.float16: torch.float32}
NAMES = ("row_lse", "col_lse", "pos", "pos_count", "grad_query", "grad_keys")
F64_RTOL = 1e-12
# The guide's similarities of the kernel (st GEMM) and of the oracle (float64) differ by rounding;
# every threshold keeps at least this distance from every similarity of its row, so both make
# the same decisions.
MARGIN = 1e-5


def dtype_id(t):
    return str(t).split(".")[-1]


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------

def features(n, m, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    k = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return q.to(dtype), k.to(dtype)


def upstream(n, m, st, seed):
    g = torch.Generator().manual_seed(seed + 17)
    return tuple(torch.randn(x, generator=g, dtype=torch.float64).to(st) for x in (n, m, n))


def guide(n, m, dg, st, seed, frac=0.3):
    """(guide_query (n, dg), guide_keys (m, dg), threshold (n,)) in st, thresholds between two
    neighbouring similarities of their row near the (1 − frac) quantile (so ~frac of the pairs lie
    above), at the widest gap of a window there: no similarity within MARGIN of a threshold."""
    g = torch.Generator().manual_seed(seed + 101)
    gq = torch.nn.functional.normalize(torch.randn(n, dg, generator=g, dtype=torch.float64), dim=1)
    gk = torch.nn.functional.normalize(torch.randn(m, dg, generator=g, dtype=torch.float64), dim=1)
    gq, gk = gq.to(st), gk.to(st)
    sims = gq.double() @ gk.double().T
    srt = sims.sort(dim=1).values
    if m == 1:
        thr = srt[:, 0] + torch.where(torch.arange(n) % 2 == 0, 0.5, -0.5).double()
    else:
        k0 = min(max(int(round((1 - frac) * m)), 1), m - 1)
        lo, hi = max(1, k0 - max(2, m // 20)), min(m - 1, k0 + max(2, m // 20))
        gaps = srt[:, lo:hi + 1] - srt[:, lo - 1:hi]
        best = gaps.argmax(dim=1) + lo
        rows = torch.arange(n)
        thr = (srt[rows, best - 1] + srt[rows, best]) / 2
    thr = thr.to(st)
    margin = (sims - thr.double()[:, None]).abs().min().item()
    assert margin > MARGIN, f"test set-up: a guide similarity within {margin:.2g} of a threshold"
    return gq.contiguous(), gk.contiguous(), thr


def groups(n, m, pattern, seed):
    if pattern == "mod":  # one row per group, columns cycling through them
        return torch.arange(n), torch.arange(m) % n
    if pattern == "doc_to_doc":  # sentence-transformers: docs of query j % world (world = n)
        return torch.arange(n) * 7 - 3, (torch.arange(m) % n) * 7 - 3
    g = torch.Generator().manual_seed(seed + 7)  # "random": a few small ids, big int64 values
    k = 4
    return (torch.randint(0, k, (n,), generator=g) * 2 ** 40 - 5,
            torch.randint(0, k, (m,), generator=g) * 2 ** 40 - 5)


def positives(n, m, kind, seed):
    """(labels, row_classes, col_classes) for kind ∈ labels / none / classes."""
    g = torch.Generator().manual_seed(seed + 3)
    if kind == "labels":
        return torch.randint(0, m, (n,), generator=g), None, None
    if kind == "classes":
        return None, torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (m,), generator=g)
    assert m >= n
    return None, None, None


# ---------------------------------------------------------------------------------------------
# running and comparing
# ---------------------------------------------------------------------------------------------

def run(q, k, scale, labels, rc, cc, excl, grads, masks, compute_col=True):
    r, c, p, cnt = native.lse_fwd(q, k, scale, labels, rc, cc, excl, compute_col, **masks)
    dq, dk = native.lse_bwd(q, k, scale, labels, rc, cc, excl, r, c, *grads, **masks)
    return r, c, p, cnt, dq, dk


def oracle(q, k, scale, labels, rc, cc, excl, grads, masks, dtype=torch.float64, gl_dtype=None):
    return reference.lse_op(q, k, scale, labels, rc, cc, excl, *grads, dtype=dtype,
                            grad_logits_dtype=gl_dtype, **masks)


def compare(outs, q, k, scale, labels, rc, cc, excl, grads, masks, dtype, compute_col=True):
    st = STAT[dtype]
    gt = oracle(q, k, scale, labels, rc, cc, excl, grads, masks)
    same = oracle(q, k, scale, labels, rc, cc, excl, grads, masks, dtype=st,
                  gl_dtype=grad_logits_dtype(dtype))
    for i, (name, out) in enumerate(zip(NAMES, outs)):
        assert out.dtype == st, f"{name}: dtype {out.dtype}"
        assert not torch.isnan(out).any(), f"{name} has NaN"
        if name == "col_lse" and not compute_col:
            assert out.shape == (0,)
            continue
        if name == "pos_count":
            if rc is None:
                assert out.shape == (0,)
            else:
                assert torch.equal(out, gt[i].to(st)), "pos_count"
            continue
        ref = gt[i]
        assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
        assert torch.equal(torch.isinf(out), torch.isinf(ref)), f"{name}: ±inf pattern differs"
        assert torch.equal(out[torch.isinf(out)].double(), ref[torch.isinf(ref)]), name
        fin = torch.isfinite(ref)
        if dtype == torch.float64:
            assert_close_f64(out[fin], ref[fin], name, rtol=F64_RTOL)
        else:
            assert_relative_rule(out[fin], same[i][fin], ref[fin], st, name)
    return gt


def case(n, m, d, dg, dtype, *, kind, group_pattern=None, with_guide=False, excl=False, seed=0,
         frac=0.3):
    st = STAT[dtype]
    q, k = features(n, m, d, dtype, seed)
    labels, rc, cc = positives(n, m, kind, seed)
    masks = {}
    if group_pattern is not None:
        masks["row_groups"], masks["col_groups"] = groups(n, m, group_pattern, seed)
    if with_guide:
        masks["guide_query"], masks["guide_keys"], masks["guide_threshold"] = guide(
            n, m, dg, st, seed, frac)
    return q, k, torch.tensor([10.0], dtype=st), labels, rc, cc, excl, upstream(n, m, st, seed), masks


def check_case(args, dtype, compute_col=True):
    q, k, scale, labels, rc, cc, excl, grads, masks = args
    if not compute_col:
        grads = (grads[0], None, grads[2])
    outs = run(q, k, scale, labels, rc, cc, excl, grads, masks, compute_col)
    return outs, compare(outs, q, k, scale, labels, rc, cc, excl, grads, masks, dtype, compute_col)


DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SHAPES = [(37, 133, 13, 7), (130, 257, 37, 16), (300, 300, 24, 9)]
KINDS = ["labels", "none", "classes"]


# ---------------------------------------------------------------------------------------------
# groups, guide, both
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pattern", ["mod", "doc_to_doc", "random"])
@pytest.mark.parametrize("n,m,d,dg", SHAPES[:2], ids=str)
def test_groups(n, m, d, dg, pattern, kind, dtype):
    args = case(n, m, d, dg, dtype, kind=kind, group_pattern=pattern, seed=n + m)
    outs, gt = check_case(args, dtype)
    excluded, _ = reference._op_masks(n, m, args[3], args[4], args[5], False, "cpu",
                                      args[8]["row_groups"], args[8]["col_groups"])
    assert excluded.any(), "test set-up: nothing excluded"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m,d,dg", SHAPES, ids=str)
def test_guide(n, m, d, dg, kind, dtype):
    args = case(n, m, d, dg, dtype, kind=kind, with_guide=True, seed=2 * n + m)
    check_case(args, dtype)
    gq, gk, thr = (args[8][x] for x in ("guide_query", "guide_keys", "guide_threshold"))
    above = reference.guided_false_negatives(gq, gk, thr).double().mean().item()
    assert 0.2 < above < 0.4, f"test set-up: {above:.2f} of the pairs above the thresholds"


@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=dtype_id)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m,d,dg", SHAPES, ids=str)
def test_groups_guide_exclude_self(n, m, d, dg, kind, dtype):
    args = case(n, m, d, dg, dtype, kind=kind, group_pattern="random", with_guide=True,
                excl=True, seed=n + 5 * m)
    check_case(args, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("kind", ["labels", "classes"])
@pytest.mark.parametrize("which", list(itertools.product([False, True], repeat=3)),
                         ids=lambda w: "".join(x for x, on in zip("rcp", w) if on) or "none")
def test_optional_grads(which, kind, dtype):
    """Each subset of the upstream gradients (None: skipped, statistic unread), the label-only
    backward (no tiles) included."""
    n, m, d, dg = 37, 133, 13, 7
    q, k, scale, labels, rc, cc, excl, grads, masks = case(
        n, m, d, dg, dtype, kind=kind, group_pattern="random", with_guide=True, seed=11)
    grads = tuple(g if on else None for g, on in zip(grads, which))
    outs = run(q, k, scale, labels, rc, cc, excl, grads, masks, compute_col=which[1])
    compare(outs, q, k, scale, labels, rc, cc, excl, grads, masks, dtype, compute_col=which[1])
    if not any(which):
        assert (outs[4] == 0).all() and (outs[5] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_no_column_statistic(dtype):
    args = case(130, 257, 37, 16, dtype, kind="labels", group_pattern="random", with_guide=True,
                excl=True, seed=4)
    check_case(args, dtype, compute_col=False)


# ---------------------------------------------------------------------------------------------
# rows and columns with nothing left
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("kind", ["labels", "classes"])
def test_fully_excluded_rows(kind, dtype):
    """Rows 0..4 lose everything: the guide (threshold far below every similarity) takes every
    column but the designated ones, whose group takes them. Those rows get row_lse = −inf, pos 0,
    zero gradient rows, and no NaN anywhere."""
    n, m, d, dg = 37, 133, 13, 7
    q, k, scale, labels, rc, cc, excl, grads, masks = case(
        n, m, d, dg, dtype, kind=kind, with_guide=True, seed=21)
    thr = masks["guide_threshold"].clone()
    thr[:5] = -10.0
    masks["guide_threshold"] = thr
    rg = torch.arange(n) + 1000
    cg = torch.arange(m) + 5000
    if kind == "labels":
        labels = labels.clone()
        labels[:5] = torch.arange(5) * 3
        cg[labels[:5]] = rg[:5]
    else:
        rc, cc = rc.clone(), cc.clone()
        rc[:5] = 99  # a class of its own: rows 0..4 with the columns 0..9
        cc[:10] = 99
        cg[:10] = 1000  # row 0's group
        rg[:5] = 1000
    masks["row_groups"], masks["col_groups"] = rg, cg
    outs = run(q, k, scale, labels, rc, cc, excl, grads, masks)
    gt = compare(outs, q, k, scale, labels, rc, cc, excl, grads, masks, dtype)
    r, _, p, _, dq, _ = outs
    assert (r[:5] == -float("inf")).all() and torch.isfinite(r[5:]).all()
    assert (p[:5] == 0).all() and (dq[:5] == 0).all()
    assert (gt[0][:5] == -float("inf")).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_everything_excluded(dtype):
    """N = M, thresholds below every similarity, groups = arange: every pair is excluded (the
    guide takes the off-diagonal, the groups the designated diagonal). Every statistic −inf, pos
    0, every gradient exactly 0, no NaN."""
    n, d, dg = 45, 13, 7
    q, k, scale, labels, rc, cc, excl, grads, masks = case(
        n, n, d, dg, dtype, kind="none", with_guide=True, seed=5)
    masks["guide_threshold"] = torch.full((n,), -10.0, dtype=STAT[dtype])
    masks["row_groups"] = masks["col_groups"] = torch.arange(n)
    r, c, p, cnt, dq, dk = run(q, k, scale, labels, rc, cc, excl, grads, masks)
    assert (r == -float("inf")).all() and (c == -float("inf")).all()
    assert (p == 0).all() and cnt.shape == (0,)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


# ---------------------------------------------------------------------------------------------
# code paths, tiles, threads, repeatability
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env", [
    {"CK_CPU_ISA": "avx512"},
    {"CK_CPU_ISA": "avx2"},
    {"CK_CPU_ISA": "scalar"},
    {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "48"},
    {"CK_CPU_BLOCK_ROWS": "1", "CK_CPU_BLOCK_COLS": "1"},
], ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("kind", KINDS)
def test_code_paths(monkeypatch, env, kind):
    """Every SIMD path, and tiles small enough that masks, labels and classes straddle tiles."""
    for key, val in env.items():
        if key == "CK_CPU_ISA":
            select_isa(monkeypatch, val)
        else:
            monkeypatch.setenv(key, val)
    for dtype in (torch.float32, torch.bfloat16):
        args = case(37, 133, 13, 7, dtype, kind=kind, group_pattern="random", with_guide=True,
                    excl=True, seed=31)
        check_case(args, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_bitwise_repeatable(dtype):
    """Two calls, same bits: several row groups (N = M = 300 over 2 threads, and small tiles)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for kind in ("labels", "classes"):
            args = case(300, 300, 24, 9, dtype, kind=kind, group_pattern="random",
                        with_guide=True, excl=True, seed=41)
            q, k, scale, labels, rc, cc, excl, grads, masks = args
            one = run(q, k, scale, labels, rc, cc, excl, grads, masks)
            two = run(q, k, scale, labels, rc, cc, excl, grads, masks)
            for name, a, b in zip(NAMES, one, two):
                assert torch.equal(a, b), f"{name} differs between two identical calls"
    finally:
        torch.set_num_threads(old)


def test_thread_counts_agree():
    """1 and 2 threads split the rows differently: the mask decisions must not change."""
    args = case(300, 300, 24, 9, torch.float64, kind="classes", group_pattern="random",
                with_guide=True, excl=True, seed=43)
    q, k, scale, labels, rc, cc, excl, grads, masks = args
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, scale, labels, rc, cc, excl, grads, masks)
        torch.set_num_threads(2)
        two = run(q, k, scale, labels, rc, cc, excl, grads, masks)
    finally:
        torch.set_num_threads(old)
    for name, a, b in zip(NAMES, one, two):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), name
        fin = torch.isfinite(a)
        assert_close_f64(a[fin], b[fin], name, rtol=F64_RTOL)


def test_masks_change_the_result():
    """Sanity of the set-up: the masks are not no-ops on these inputs."""
    q, k, scale, labels, rc, cc, excl, grads, masks = case(
        37, 133, 13, 7, torch.float64, kind="labels", group_pattern="random", with_guide=True,
        seed=3)
    plain = run(q, k, scale, labels, rc, cc, excl, grads, {})
    masked = run(q, k, scale, labels, rc, cc, excl, grads, masks)
    for name, a, b in zip(NAMES, plain, masked):
        if a.numel():
            assert not torch.equal(a, b), f"{name} unchanged by the masks"


# ---------------------------------------------------------------------------------------------
# argument checks, fake kernels
# ---------------------------------------------------------------------------------------------

def _call(**over):
    q, k, scale, labels, rc, cc, excl, grads, masks = case(
        7, 9, 5, 3, torch.float32, kind="none", group_pattern="random", with_guide=True, seed=1)
    masks.update(over)
    masks = {key: v for key, v in masks.items() if v is not None}
    return native.lse_fwd(q, k, scale, labels, rc, cc, excl, True, **masks)


@pytest.mark.parametrize("over,match", [
    (dict(col_groups=None), "row_groups and col_groups must be given together"),
    (dict(row_groups=torch.zeros(7, dtype=torch.int32)), "row_groups must be an int64"),
    (dict(col_groups=torch.zeros(8, dtype=torch.long)), r"col_groups must be an int64 CPU tensor of shape \(9\)"),
    (dict(guide_threshold=None), "must be given together"),
    (dict(guide_keys=torch.zeros(9, 3, dtype=torch.float64)), "guide_query and guide_keys must be 2-D Float"),
    (dict(guide_keys=torch.zeros(9, 4)), r"shapes \(N, Dg\) and \(M, Dg\)"),
    (dict(guide_query=torch.zeros(6, 3)), r"shapes \(N, Dg\) and \(M, Dg\)"),
    (dict(guide_threshold=torch.zeros(6)), r"guide_threshold must be a Float CPU tensor of shape \(7\)"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_errors(over, match):
    with pytest.raises(RuntimeError, match=match):
        _call(**over)


def test_fake_kernels_accept_masks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, scale, labels, rc, cc, excl, grads, masks = case(
        7, 9, 5, 3, torch.float32, kind="none", group_pattern="random", with_guide=True, seed=1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        r, c, p, cnt = native.lse_fwd(q, k, scale, labels, rc, cc, excl, True, **masks)
        dq, dk = native.lse_bwd(q, k, scale, labels, rc, cc, excl, r, c, *grads, **masks)
    assert (r.shape, c.shape, p.shape, cnt.shape) == ((7,), (9,), (7,), (0,))
    assert dq.shape == (7, 5) and dk.shape == (9, 5) and dq.dtype == torch.float32
