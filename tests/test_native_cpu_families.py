"""torch.ops.ck_native: self-exclusion and class positives of lse_fwd/lse_bwd, and the sigmoid
(SigLIP) ops sigmoid_fwd/sigmoid_bwd (csrc/cpu), against dense float64 formulas written here."""
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

ops = torch.ops.ck_native
INF = float("inf")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
STAT = {torch.float64: torch.float64, torch.float32: torch.float32,
        torch.bfloat16: torch.float32, torch.float16: torch.float32}
SHAPES = [(1, 1, 1), (7, 7, 7), (7, 37, 130), (37, 7, 257), (130, 257, 37), (257, 130, 1),
          (257, 257, 130), (1, 257, 7), (130, 1, 37), (37, 37, 37)]
ISAS = ["scalar", "avx2", "avx512"]


def dtype_id(t):
    return str(t).split(".")[-1]


# ---------------------------------------------------------------------------------------------
# dense formulas
# ---------------------------------------------------------------------------------------------

def lse_exact(q, k, scale, labels, row_cls, col_cls, exclude_self, grad_row, grad_col, grad_pos,
              dtype=torch.float64, grad_logits_dtype=None):
    """(row_lse, col_lse, pos, pos_count, grad_query, grad_keys) of the op contract, in `dtype`:
    the one dense oracle (contrastive_kernels.reference.lse_op)."""
    return reference.lse_op(q, k, scale, labels, row_cls, col_cls, exclude_self, grad_row,
                            grad_col, grad_pos, dtype=dtype, grad_logits_dtype=grad_logits_dtype)


def sigmoid_exact(q, k, scale, bias, row_cls, col_cls, diagonal, grad_row, dtype=torch.float64,
                  grad_logits_dtype=None):
    """(row_loss, grad_query, grad_keys, grad_bias_row) of SigLIP, in `dtype` (reference.sigmoid_op)."""
    return reference.sigmoid_op(q, k, scale, bias, row_cls, col_cls, diagonal, grad_row,
                                dtype=dtype, grad_logits_dtype=grad_logits_dtype)


# ---------------------------------------------------------------------------------------------
# inputs and comparison
# ---------------------------------------------------------------------------------------------

def features(n, m, d, dtype, *, seed=0, norm=True, same=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = q.clone() if same else torch.randn(m, d, generator=gen, dtype=torch.float64)
    if norm:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    return q.to(dtype), k.to(dtype)


def classes(n, m, n_classes, seed=1):
    """Arbitrary int64 class values (large, negative): the kernel may only compare them."""
    gen = torch.Generator().manual_seed(seed)
    rc = torch.randint(0, n_classes, (n,), generator=gen)
    cc = torch.randint(0, n_classes, (m,), generator=gen)
    return rc * 1_000_000_007 - 2 ** 40, cc * 1_000_000_007 - 2 ** 40


def labels_with_self(n, m, seed=2):
    """Random labels in [0, M) where some rows point at their own (excludable) column."""
    gen = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, m, (n,), generator=gen)
    lab[: min(n, m): 3] = torch.arange(min(n, m))[::3]
    return lab


def upstream(n, m, stat, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x, generator=gen, dtype=torch.float64).to(stat) for x in (n, m, n))


def assert_same_infinities(out, gt, name):
    assert torch.equal(torch.isinf(out), torch.isinf(gt)), f"{name}: ±inf pattern differs"
    assert torch.equal(out[torch.isinf(out)].double(), gt[torch.isinf(gt)].double()), name
    assert not torch.isnan(out).any(), f"{name} has NaN"


def compare(outs, gts, sames, dtype, names):
    """float64: ≤ 1e-10 of the tensor's max. Otherwise the relative rule against `sames`, the same
    formula in the dtype the op computes in (16-bit inputs are converted exactly to float32 and
    the kernel computes in float32, so that is float32 for them: the formula in bfloat16 itself
    would loosen the bound by orders of magnitude, its atol alone being 2^-7 of the max).
    Infinite entries must match exactly."""
    for name, out, gt, same in zip(names, outs, gts, sames):
        assert out.dtype == STAT[dtype], f"{name}: dtype {out.dtype}"
        assert out.shape == gt.shape, f"{name}: shape {tuple(out.shape)} vs {tuple(gt.shape)}"
        assert_same_infinities(out, gt, name)
        fin = torch.isfinite(gt)
        if dtype == torch.float64:
            assert_close_f64(out[fin], gt[fin], name)
        else:
            assert_relative_rule(out[fin], same[fin], gt[fin], STAT[dtype], name)


LSE_NAMES = ("row_lse", "col_lse", "pos", "pos_count", "grad_query", "grad_keys")


def run_lse(q, k, scale, labels, rc, cc, excl, grads, compute_col=True):
    r, c, p, cnt = ops.lse_fwd(q, k, scale, labels, rc, cc, excl, compute_col)
    dq, dk = ops.lse_bwd(q, k, scale, labels, rc, cc, excl, r, c, *grads)
    return r, c, p, cnt, dq, dk


def check_lse(q, k, scale, labels, rc, cc, excl, grads, dtype, compute_col=True):
    outs = run_lse(q, k, scale, labels, rc, cc, excl, grads, compute_col)
    gt = lse_exact(q, k, scale, labels, rc, cc, excl, *grads)
    same = lse_exact(q, k, scale, labels, rc, cc, excl, *grads, dtype=STAT[dtype],
                     grad_logits_dtype=grad_logits_dtype(dtype))
    keep = [i for i in range(6) if i != 1 or compute_col]
    if not compute_col:
        assert outs[1].shape == (0,) and outs[1].dtype == STAT[dtype]
    if rc is None:
        assert outs[3].shape == (0,)
    else:
        assert torch.equal(outs[3], gt[3].to(outs[3].dtype)), "pos_count"
    compare([outs[i] for i in keep], [gt[i] for i in keep], [same[i] for i in keep], dtype,
            [LSE_NAMES[i] for i in keep])
    return outs


# ---------------------------------------------------------------------------------------------
# LSE family: exclusion and classes
# ---------------------------------------------------------------------------------------------

MODES = ["exclude", "classes", "both"]


def lse_case(n, m, mode, seed):
    excl = mode in ("exclude", "both")
    if mode == "exclude":
        return labels_with_self(n, m, seed), None, None, excl
    n_classes = [1, 2, 3, max(1, n // 2), n][seed % 5]
    rc, cc = classes(n, m, n_classes, seed)
    return None, rc, cc, excl


@pytest.mark.parametrize("compute_col", [True, False], ids=["col", "nocol"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,m,d", SHAPES, ids=str)
def test_lse_matches_exact(n, m, d, mode, dtype, compute_col):
    seed = n + 3 * m + d
    q, k = features(n, m, d, dtype, seed=seed)
    labels, rc, cc, excl = lse_case(n, m, mode, seed)
    gr, gc, gp = upstream(n, m, STAT[dtype], seed)
    grads = (gr, gc if compute_col else None, gp)
    check_lse(q, k, torch.tensor(10.0, dtype=STAT[dtype]), labels, rc, cc, excl, grads, dtype,
              compute_col)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", list(itertools.product([False, True], repeat=3)),
                         ids=lambda w: "".join(x for x, on in zip("rcp", w) if on) or "none")
def test_lse_optional_grads(which, mode, dtype):
    n, m, d = 130, 257, 37
    q, k = features(n, m, d, dtype, seed=4)
    labels, rc, cc, excl = lse_case(n, m, mode, 4)
    grads = tuple(g if on else None for g, on in zip(upstream(n, m, STAT[dtype]), which))
    outs = check_lse(q, k, torch.tensor(10.0, dtype=STAT[dtype]), labels, rc, cc, excl, grads,
                     dtype, compute_col=which[1])
    if not any(which):
        assert (outs[4] == 0).all() and (outs[5] == 0).all()


@pytest.mark.parametrize("n_classes", [1, 2, 5, 18, 37])
def test_lse_class_counts(n_classes):
    q, k = features(37, 37, 16, torch.float64, seed=5, same=True)
    rc, _ = classes(37, 37, n_classes, seed=n_classes)
    check_lse(q, k, torch.tensor(10.0, dtype=torch.float64), None, rc, rc.clone(), True,
              upstream(37, 37, torch.float64), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("with_classes", [False, True], ids=["labels", "classes"])
def test_lse_single_excluded_element(dtype, with_classes):
    """N = M = 1 with exclusion: nothing is left, the statistics are −inf and every gradient 0."""
    q, k = features(1, 1, 3, dtype)
    rc = cc = torch.tensor([7]) if with_classes else None
    labels = None if with_classes else torch.tensor([0])
    gr, gc, gp = upstream(1, 1, STAT[dtype])
    r, c, p, cnt, dq, dk = run_lse(q, k, torch.tensor(10.0, dtype=STAT[dtype]), labels, rc, cc,
                                   True, (gr, gc, gp))
    assert r.item() == -INF and c.item() == -INF and p.item() == 0
    assert cnt.tolist() == ([0.0] if with_classes else [])
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


@pytest.mark.parametrize("n,m", [(1, 5), (5, 1), (2, 2), (3, 2)], ids=str)
def test_lse_empty_rows_and_columns(n, m):
    """Rows or columns whose only element is excluded get −inf and contribute nothing."""
    q, k = features(n, m, 4, torch.float64, seed=n * 10 + m)
    rc, cc = classes(n, m, 2, seed=6)
    check_lse(q, k, torch.tensor(3.0, dtype=torch.float64), None, rc, cc, True,
              upstream(n, m, torch.float64), torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("mode", MODES)
def test_lse_scale_100_unnormalised(dtype, mode):
    """|S| reaches ~10^4, and keys = query makes the self-logit s·|x|² the largest of its row by
    far (excluded in two of the modes): no overflow, no NaN, and float64 still within 1e-10."""
    n = 130
    q, k = features(n, n, 37, dtype, seed=7, norm=False, same=True)
    labels, rc, cc, excl = lse_case(n, n, mode, 7)
    if labels is not None:
        labels = (torch.arange(n) + n // 2) % n
    outs = check_lse(q, k, torch.tensor(100.0, dtype=STAT[dtype]), labels, rc, cc, excl,
                     upstream(n, n, STAT[dtype]), dtype)
    assert all(torch.isfinite(o).all() for o in outs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mode", ["exclude", "classes"])
def test_lse_rounding_contract(monkeypatch, isa, mode):
    """With a single positive per row, pos is the very tile element the row's log-sum-exp saw, so
    row_lse − pos ≥ 0 exactly in float32 (scale 100, unnormalised: |S| ~ 10^4)."""
    select_isa(monkeypatch, isa)
    n = 257
    q, k = features(n, n, 37, torch.float32, seed=9, norm=False, same=mode == "exclude")
    scale = torch.tensor(100.0)
    if mode == "exclude":  # SimCLR-like: the positive is the other view, the self-pair is excluded
        labels, rc, cc = (torch.arange(n) + 1) % n, None, None
    else:  # one positive per row: a permutation of distinct classes
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        labels, rc, cc = None, torch.arange(n) * 3, perm * 3
    r, _, p, _ = ops.lse_fwd(q, k, scale, labels, rc, cc, mode == "exclude", True)
    assert torch.isfinite(r).all()
    assert (r - p >= 0).all()


@pytest.mark.parametrize("env", [
    {"CK_CPU_BLOCK_ROWS": "1", "CK_CPU_BLOCK_COLS": "1"},
    {"CK_CPU_BLOCK_ROWS": "1", "CK_CPU_BLOCK_COLS": "48"},
    {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "1"},
    {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "48"},
], ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
@pytest.mark.parametrize("isa", ISAS)
def test_lse_code_paths(monkeypatch, isa, env):
    """Every SIMD path, and tiles whose rows or columns hold only an excluded element (the online
    max rescale then sees −inf on both sides and must stay NaN-free)."""
    select_isa(monkeypatch, isa)
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    for n, m, d in [(37, 40, 7), (41, 33, 19)]:
        q, k = features(n, m, d, torch.float32, seed=n + m)
        rc, cc = classes(n, m, 4, seed=m)
        grads = upstream(n, m, torch.float32)
        check_lse(q, k, torch.tensor(10.0), None, rc, cc, True, grads, torch.float32)
        check_lse(q, k, torch.tensor(10.0), labels_with_self(n, m), None, None, True, grads,
                  torch.float32)


def test_lse_exclusion_without_labels():
    """labels None under exclusion: every positive is the excluded self-pair, so pos = 0 and
    grad_pos has no effect; the row statistics are the self-excluded log-sum-exps."""
    q, k = features(37, 40, 8, torch.float64, seed=11)
    grads = upstream(37, 40, torch.float64)
    outs = check_lse(q, k, torch.tensor(5.0, dtype=torch.float64), None, None, None, True, grads,
                     torch.float64)
    assert (outs[2] == 0).all()
    no_pos = run_lse(q, k, torch.tensor(5.0, dtype=torch.float64), None, None, None, True,
                     (grads[0], grads[1], None))
    assert torch.equal(outs[4], no_pos[4]) and torch.equal(outs[5], no_pos[5])


# ---------------------------------------------------------------------------------------------
# sigmoid family
# ---------------------------------------------------------------------------------------------

SIG_NAMES = ("row_loss", "grad_query", "grad_keys", "grad_bias_row")


def check_sigmoid(q, k, scale, bias, rc, cc, diagonal, grad_row, dtype):
    loss = ops.sigmoid_fwd(q, k, scale, bias, rc, cc, diagonal)
    dq, dk, db = ops.sigmoid_bwd(q, k, scale, bias, rc, cc, diagonal, grad_row)
    outs = (loss, dq, dk, db)
    gt = sigmoid_exact(q, k, scale, bias, rc, cc, diagonal, grad_row)
    same = sigmoid_exact(q, k, scale, bias, rc, cc, diagonal, grad_row, dtype=STAT[dtype],
                         grad_logits_dtype=grad_logits_dtype(dtype))
    compare(outs, gt, same, dtype, SIG_NAMES)
    return outs


def sigmoid_case(n, m, mode, seed):
    if mode == "classes":
        rc, cc = classes(n, m, [1, 2, 3, max(1, n // 2), n][seed % 5], seed)
        return rc, cc, seed % 2 == 0  # diagonal is ignored when classes are given
    return None, None, mode == "diagonal"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", ["diagonal", "negatives", "classes"])
@pytest.mark.parametrize("n,m,d", SHAPES, ids=str)
def test_sigmoid_matches_exact(n, m, d, mode, dtype):
    seed = n + 3 * m + d
    q, k = features(n, m, d, dtype, seed=seed)
    rc, cc, diagonal = sigmoid_case(n, m, mode, seed)
    stat = STAT[dtype]
    check_sigmoid(q, k, torch.tensor(10.0, dtype=stat), torch.tensor(-10.0, dtype=stat), rc, cc,
                  diagonal, upstream(n, m, stat, seed)[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("mode", ["diagonal", "classes"])
def test_sigmoid_extreme_logits(dtype, scale, mode):
    """bias −12.5 with scale up to 100 on unnormalised inputs: |L| reaches ~10^4, most terms are
    softplus of a very negative or very positive argument."""
    n, m = 130, 257
    q, k = features(n, m, 37, dtype, seed=12, norm=False)
    rc, cc, diagonal = sigmoid_case(n, m, mode, 12)
    stat = STAT[dtype]
    outs = check_sigmoid(q, k, torch.tensor(scale, dtype=stat), torch.tensor(-12.5, dtype=stat),
                         rc, cc, diagonal, upstream(n, m, stat)[0], dtype)
    assert all(torch.isfinite(o).all() for o in outs)


def test_sigmoid_small_terms_keep_relative_accuracy():
    """Every logit far from its target (a well-trained batch): each row loss is a sum of terms
    ≈ exp(x) ≪ 2^-24, which log(1 + t) would lose entirely. Relative error per row, float32."""
    n = 64
    q, k = features(n, n, 256, torch.float32, seed=13, same=True)
    scale, bias = torch.tensor(80.0), torch.tensor(-40.0)
    loss = ops.sigmoid_fwd(q, k, scale, bias, None, None, True)
    gt = sigmoid_exact(q, k, scale, bias, None, None, True, torch.ones(n))[0]
    assert (gt < 2.0 ** -24).all()
    assert ((loss.double() - gt).abs() / gt).max() < 1e-5


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("env", [{}, {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "48"}],
                         ids=["default", "small-tiles"])
def test_sigmoid_code_paths(monkeypatch, isa, env):
    select_isa(monkeypatch, isa)
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    cases = [(37, 40, 7, "diagonal"), (41, 33, 19, "classes"), (23, 50, 5, "negatives")]
    for n, m, d, mode in cases:
        q, k = features(n, m, d, torch.float32, seed=n + m)
        rc, cc, diagonal = sigmoid_case(n, m, mode, n)
        check_sigmoid(q, k, torch.tensor(10.0), torch.tensor(-10.0), rc, cc, diagonal,
                      upstream(n, m, torch.float32)[0], torch.float32)


def test_sigmoid_nan_propagates():
    q, k = features(37, 37, 16, torch.float32)
    q[3, 5] = float("nan")
    loss = ops.sigmoid_fwd(q, k, torch.tensor(10.0), torch.tensor(-10.0), None, None, True)
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(37) != 3]).all()


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------

def _args(n=7, m=9, d=5):
    q, k = features(n, m, d, torch.float32)
    return q, k, torch.tensor(2.0)


def _lse_fwd(labels=None, rc=None, cc=None, **kw):
    q, k, s = _args(**kw)
    return ops.lse_fwd(q, k, s, labels, rc, cc, False, True)


def _lse_bwd(labels=None, rc=None, cc=None):
    q, k, s = _args()
    return ops.lse_bwd(q, k, s, labels, rc, cc, True, torch.zeros(7), torch.zeros(9),
                       torch.ones(7), None, None)


def _sig_fwd(bias=torch.tensor(-1.0), rc=None, cc=None, scale=None):
    q, k, s = _args()
    return ops.sigmoid_fwd(q, k, s if scale is None else scale, bias, rc, cc, True)


def _sig_bwd(grad_row=torch.ones(7), bias=torch.tensor(-1.0), rc=None, cc=None):
    q, k, s = _args()
    return ops.sigmoid_bwd(q, k, s, bias, rc, cc, False, grad_row)


ROW, COL = torch.zeros(7, dtype=torch.long), torch.zeros(9, dtype=torch.long)


@pytest.mark.parametrize("call,match", [
    (lambda: _lse_fwd(rc=ROW), r"row_classes and col_classes must be given together \(both or "
                               r"neither\), got row_classes of shape \[7\] and col_classes None"),
    (lambda: _lse_fwd(cc=COL), r"got row_classes None and col_classes of shape \[9\]"),
    (lambda: _lse_fwd(rc=ROW.int(), cc=COL),
     r"row_classes must be an int64 CPU tensor of shape \(7\), got dtype Int"),
    (lambda: _lse_fwd(rc=torch.zeros(8, dtype=torch.long), cc=COL),
     r"row_classes must be an int64 CPU tensor of shape \(7\), got dtype Long, shape \[8\]"),
    (lambda: _lse_fwd(rc=ROW, cc=torch.zeros(9, 1, dtype=torch.long)),
     r"col_classes must be an int64 CPU tensor of shape \(9\), got dtype Long, shape \[9, 1\]"),
    (lambda: _lse_fwd(labels=torch.zeros(7, dtype=torch.long), rc=ROW, cc=COL),
     r"labels must be None when row_classes and col_classes are given .*got labels of shape \[7\]"),
    (lambda: _lse_bwd(rc=ROW), "must be given together"),
    (lambda: _lse_bwd(rc=ROW, cc=COL.float()),
     r"col_classes must be an int64 CPU tensor of shape \(9\)"),
    (lambda: _lse_bwd(labels=torch.zeros(7, dtype=torch.long), rc=ROW, cc=COL),
     "labels must be None"),
    (lambda: _sig_fwd(bias=torch.tensor(1.0, dtype=torch.float64)),
     r"sigmoid_fwd: bias must be a one-element Float CPU tensor .*dtype Double"),
    (lambda: _sig_fwd(bias=torch.ones(2)),
     r"bias must be a one-element Float CPU tensor .*shape \[2\]"),
    (lambda: _sig_fwd(bias=torch.tensor(float("inf"))), "bias must be finite, got inf"),
    (lambda: _sig_fwd(bias=torch.tensor(float("nan"))), "bias must be finite, got nan"),
    (lambda: _sig_fwd(scale=torch.tensor(-1.0)), "scale must be finite and > 0, got -1"),
    (lambda: _sig_fwd(rc=ROW), "sigmoid_fwd: row_classes and col_classes must be given together"),
    (lambda: _sig_fwd(rc=ROW, cc=COL[:4]),
     r"col_classes must be an int64 CPU tensor of shape \(9\)"),
    (lambda: _sig_bwd(grad_row=torch.ones(9)),
     r"sigmoid_bwd: grad_row must be a Float CPU tensor of shape \(7\), got dtype Float, "
     r"shape \[9\]"),
    (lambda: _sig_bwd(grad_row=torch.ones(7, dtype=torch.float64)), "grad_row must be a Float"),
    (lambda: _sig_bwd(bias=torch.tensor([float("-inf")])), "sigmoid_bwd: bias must be finite"),
    (lambda: _sig_bwd(cc=COL), "sigmoid_bwd: row_classes and col_classes must be given together"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_errors(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_classes_need_no_m_ge_n():
    """Without labels and classes M >= N is required; with classes it is not."""
    q, k, s = _args(n=11, m=9)
    with pytest.raises(RuntimeError, match="M >= N"):
        ops.lse_fwd(q, k, s, None, None, None, False, True)
    r, c, p, cnt = ops.lse_fwd(q, k, s, None, torch.zeros(11, dtype=torch.long),
                               torch.zeros(9, dtype=torch.long), True, True)
    assert cnt.tolist() == [8.0] * 9 + [9.0] * 2


def test_sigmoid_checks_features_like_lse():
    q, k, s = _args()
    with pytest.raises(RuntimeError, match="sigmoid_fwd: query and keys must have the same dtype"):
        ops.sigmoid_fwd(q, k.double(), s, torch.tensor(0.0), None, None, True)
    with pytest.raises(RuntimeError, match="sigmoid_bwd: query and keys must be contiguous"):
        ops.sigmoid_bwd(q, torch.randn(5, 9).T, s, torch.tensor(0.0), None, None, True,
                        torch.ones(7))


def test_bad_isa_env(monkeypatch):
    monkeypatch.setenv("CK_CPU_ISA", "AVX2")
    with pytest.raises(RuntimeError,
                       match="CK_CPU_ISA must be avx512_bf16, avx512, avx2 or scalar .*got 'AVX2'"):
        ops.cpu_isa()
    with pytest.raises(RuntimeError, match="CK_CPU_ISA must be"):
        _sig_fwd()


# ---------------------------------------------------------------------------------------------
# bfloat16 inputs: the bf16 dot-product path and the upcast path
# ---------------------------------------------------------------------------------------------

BF16_PATHS = ["bf16_units", "upcast"]
# Ragged on purpose: odd D (an unpaired last k), N, M and D off the 6-row strips and 64-column
# panels of the bf16 GEMM, one-element and one-row problems.
BF16_SHAPES = [(1, 1, 1), (5, 3, 2), (13, 70, 33), (37, 130, 7), (130, 37, 130), (257, 200, 64),
               (7, 300, 257)]
BF16_TILES = [{}, {"CK_CPU_BLOCK_ROWS": "7", "CK_CPU_BLOCK_COLS": "33"}]


def use_bf16_path(monkeypatch, path):
    """bf16_units: bfloat16 tile GEMMs on the bf16 dot-product units (skipped on a CPU without
    them); upcast: bfloat16 converted to float32 once, float32 GEMMs (CK_CPU_ISA=avx512)."""
    if path == "bf16_units":
        select_isa(monkeypatch, "avx512_bf16")
    else:
        monkeypatch.setenv("CK_CPU_ISA", "avx512")
        assert ops.cpu_isa() != "avx512_bf16"


@pytest.mark.parametrize("tiles", BF16_TILES, ids=["default-tiles", "odd-tiles"])
@pytest.mark.parametrize("mode", ["diagonal", "labels", *MODES])
@pytest.mark.parametrize("path", BF16_PATHS)
def test_lse_bf16_paths(monkeypatch, path, mode, tiles):
    """Every output of the LSE op with bfloat16 inputs on both paths, against the float64 truth
    by the relative rule (check_lse: the statistics as float32, the gradients as their model with
    G rounded to bf16 on the bf16 path)."""
    use_bf16_path(monkeypatch, path)
    for key, val in tiles.items():
        monkeypatch.setenv(key, val)
    for n, m, d in BF16_SHAPES:
        if mode == "diagonal" and m < n:
            continue
        seed = n + 3 * m + d
        q, k = features(n, m, d, torch.bfloat16, seed=seed)
        if mode == "diagonal":
            labels, rc, cc, excl = None, None, None, False
        elif mode == "labels":
            labels, rc, cc, excl = labels_with_self(n, m, seed), None, None, False
        else:
            labels, rc, cc, excl = lse_case(n, m, mode, seed)
        check_lse(q, k, torch.tensor(10.0), labels, rc, cc, excl,
                  upstream(n, m, torch.float32, seed), torch.bfloat16)


@pytest.mark.parametrize("tiles", BF16_TILES, ids=["default-tiles", "odd-tiles"])
@pytest.mark.parametrize("mode", ["diagonal", "negatives", "classes"])
@pytest.mark.parametrize("path", BF16_PATHS)
def test_sigmoid_bf16_paths(monkeypatch, path, mode, tiles):
    use_bf16_path(monkeypatch, path)
    for key, val in tiles.items():
        monkeypatch.setenv(key, val)
    for n, m, d in BF16_SHAPES:
        seed = n + 3 * m + d
        q, k = features(n, m, d, torch.bfloat16, seed=seed)
        rc, cc, diagonal = sigmoid_case(n, m, mode, seed)
        check_sigmoid(q, k, torch.tensor(10.0), torch.tensor(-10.0), rc, cc, diagonal,
                      upstream(n, m, torch.float32, seed)[0], torch.bfloat16)


def test_bf16_path_switch(monkeypatch):
    """CK_CPU_ISA switches the bf16 units on and off for bfloat16 inputs only: their gradients
    differ between the paths (G rounded to bf16 on one), their statistics agree to float32
    accuracy, and float32 inputs give the same bits on both settings."""
    select_isa(monkeypatch, "avx512_bf16")
    n, m, d = 130, 257, 37
    grads = upstream(n, m, torch.float32)
    outs = {}
    for dtype in (torch.bfloat16, torch.float32):
        q, k = features(n, m, d, dtype, seed=12)
        for isa in ("avx512_bf16", "avx512"):
            monkeypatch.setenv("CK_CPU_ISA", isa)
            outs[dtype, isa] = run_lse(q, k, torch.tensor(10.0), None, None, None, False, grads)
    for a, b in zip(outs[torch.float32, "avx512_bf16"], outs[torch.float32, "avx512"]):
        assert torch.equal(a, b)
    bf, up = outs[torch.bfloat16, "avx512_bf16"], outs[torch.bfloat16, "avx512"]
    for i in (0, 1, 2):
        assert (bf[i] - up[i]).abs().max() <= 1e-5 * up[i].abs().max()
    for i in (4, 5):
        assert not torch.equal(bf[i], up[i])


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_bf16_units_at_least_as_accurate_as_dense_bf16_autograd(monkeypatch, loss):
    """What a user training under bf16 gets: the loss and every gradient of ck's bf16 path are no
    further from the float64 truth than PyTorch's own dense bf16 computation of the same loss
    (logits, softmax/sigmoid and both gradient products in bf16, as under autocast), element by
    element within the relative rule at factor 1."""
    import contrastive_kernels as ck
    select_isa(monkeypatch, "avx512_bf16")
    n, d = 300, 96

    def dense(q, k, scale, bias):
        logits = scale * q @ k.T
        if loss == "clip":
            target = torch.arange(n)
            return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                          + torch.nn.functional.cross_entropy(logits.T, target))
        z = 2 * torch.eye(n, dtype=logits.dtype) - 1
        return -torch.nn.functional.logsigmoid(z * (logits + bias)).sum() / n

    def fused(q, k, scale, bias):
        if loss == "clip":
            return ck.clip_loss(q, k, scale, backend="cpu")
        return ck.siglip_loss(q, k, scale, bias, backend="cpu")

    q0, k0 = features(n, n, d, torch.bfloat16, seed=5)
    results = {}
    for name, fn, dtype in (("truth", dense, torch.float64), ("dense_bf16", dense, torch.bfloat16),
                            ("ck_bf16", fused, torch.bfloat16)):
        q = q0.to(dtype).requires_grad_()
        k = k0.to(dtype).requires_grad_()
        scale = torch.tensor(10.0, dtype=dtype, requires_grad=True)
        bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
        out = fn(q, k, scale, bias)
        grads = torch.autograd.grad(out, (q, k, scale, bias), allow_unused=True)
        results[name] = (out, *grads)
    names = ("loss", "grad_query", "grad_keys", "grad_scale", "grad_bias")
    for i, name in enumerate(names):
        gt = results["truth"][i]
        if gt is None:  # clip: the bias is not an input
            continue
        assert_relative_rule(results["ck_bf16"][i].reshape(gt.shape),
                             results["dense_bf16"][i].reshape(gt.shape), gt, torch.bfloat16,
                             name=f"{loss} {name}", factor=1.0)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
