"""The soft-target cross-entropy family on the native CPU backend (csrc/cpu/soft_xent_cpu.cpp):
``contrastive_kernels::soft_xent_fwd`` / ``soft_xent_bwd`` with backend="cpu" against
backend="reference" (docs/math.md §10; the reference is checked against open_clip in
tests/test_distill.py). float64 ≤ 1e-9 relative; float32 / bfloat16 by the relative rule against the
float64 truth; ragged shapes off the tile sizes (N = 1, M = 1, N ≠ M, D ≠ Dt, several row blocks
and column tiles), compute_col both ways, every subset of the four upstream gradients (the cross
terms' g, h and the student's log-sum-exp's u, v), the teacher's gradients both ways, distinct
scales up to 100; every SIMD path; the student's log-sum-exp bitwise that of the log-sum-exp op;
bitwise repeatability at a fixed thread count; the input checks; ``auto`` picking the kernels."""
from __future__ import annotations

import itertools

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import backends
from contrastive_kernels.backends import reference
from contrastive_kernels.ops.soft_xent import soft_xent_bwd, soft_xent_fwd
from helpers import assert_close_f64, assert_relative_rule, require_backend, select_isa

F64 = torch.float64
STAT = {F64: F64, torch.float32: torch.float32, torch.bfloat16: torch.float32}
# (N, M, D, Dt): N = 1, M = 1, N ≠ M, D ≠ Dt, none a multiple of 16; the last two cross several
# row blocks and (with SMALL_TILES) several column tiles
GEOMETRIES = [(1, 1, 3, 5), (1, 37, 8, 8), (37, 1, 5, 11), (37, 133, 13, 29), (130, 257, 40, 7),
              (300, 83, 17, 33)]
SMALL_TILES = {"CK_CPU_BLOCK_ROWS": "48", "CK_CPU_BLOCK_COLS": "40"}
SCALES = [(3.0, 7.0), (100.0, 37.5)]  # (student s, teacher t)
# the upstream gradients of the four outputs: g, h of the cross terms, u, v of the student's lse
UPSTREAMS = ("row", "col", "row_lse", "col_lse")


def subsets_of(names):
    """Every subset of `names`, the empty one included (then every gradient is 0)."""
    return [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


ALL_SUBSETS = subsets_of(UPSTREAMS)
ROW_SUBSETS = subsets_of(("row", "row_lse"))  # without columns: h and v are None
FEW_SUBSETS = [("row",), ("row_lse", "col_lse"), UPSTREAMS]


@pytest.fixture(autouse=True)
def _native_cpu():
    require_backend("cpu")  # loads the extension; skips locally, fails in CI when it is not built
    if not hasattr(torch.ops.ck_native, "soft_xent_fwd"):
        pytest.skip("the native extension predates the soft_xent ops: rebuild it")


# ---------------------------------------------------------------------------------------------
# inputs and runs
# ---------------------------------------------------------------------------------------------

def features(n, m, d, dt, dtype, t_dtype=None, seed=0):
    """(q, k, a, b): unit rows in float64, rounded to the student's / teacher's dtype and back."""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda rows, cols: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(rows, cols, generator=gen, dtype=F64), dim=1)
    t_dtype = t_dtype or dtype
    return (unit(n, d).to(dtype).to(F64), unit(m, d).to(dtype).to(F64),
            unit(n, dt).to(t_dtype).to(F64), unit(m, dt).to(t_dtype).to(F64))


def upstreams(n, m, seed=3):
    """{name: upstream gradient} for the four outputs, in float64."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n if name.startswith("row") else m, generator=gen, dtype=F64)
            for name in UPSTREAMS}


def subset_id(subset):
    return "+".join(subset) or "none"


def run(backend, feats, dtype, t_dtype, scales, compute_col, subsets, teacher_grad):
    """{output name: tensor} of one backend: the forward and a backward per gradient subset.
    The teacher's log-sum-exp comes from the reference logits in the teacher's statistic dtype."""
    st, t_st = STAT[dtype], STAT[t_dtype]
    q, k = (x.to(dtype) for x in feats[:2])
    a, b = (x.to(t_dtype) for x in feats[2:])
    s, t = (torch.tensor(v, dtype=st) for v in scales)
    tl = reference.logits(a, b, t.to(t_st))
    row_lse, col_lse = tl.logsumexp(dim=1), tl.logsumexp(dim=0)
    col_in = col_lse if compute_col else row_lse.new_empty(0)
    fwd = soft_xent_fwd(q, k, s, a, b, t, row_lse, col_in, compute_col, backend)
    outs = dict(zip(("row_cross", "col_cross", "row_lse", "col_lse"), fwd))
    up = {name: u.to(st) for name, u in upstreams(q.shape[0], k.shape[0]).items()}
    for subset in subsets:
        # the backward reads the backend's own student statistics, as the autograd site passes them
        grads = soft_xent_bwd(q, k, s, a, b, t, row_lse, col_in, outs["row_lse"], outs["col_lse"],
                              *(up[n] if n in subset else None for n in UPSTREAMS), teacher_grad,
                              backend)
        for name, g in zip(("grad_query", "grad_keys", "grad_t_query", "grad_t_keys"), grads):
            outs[f"{name}[{subset_id(subset)}]"] = g
    return outs


def compare(geometry, dtype, t_dtype=None, scales=SCALES[0], compute_col=True,
            subsets=FEW_SUBSETS, teacher_grad=True, ref="reference"):
    """Native against the float64 reference (and, below float64, the same-dtype reference)."""
    t_dtype = t_dtype or dtype
    feats = features(*geometry, dtype, t_dtype)
    args = (scales, compute_col, subsets, teacher_grad)
    ours = run("cpu", feats, dtype, t_dtype, *args)
    # a float64 student is compared with the reference on the very same inputs (its teacher's
    # statistics may come in float32); below float64 with the float64 truth of the rounded inputs
    truth = run(ref, feats, F64, t_dtype if dtype == F64 else F64, *args)
    same = run(ref, feats, dtype, t_dtype, *args) if dtype != F64 else truth
    assert ours.keys() == truth.keys()
    for name, gt in truth.items():
        out = ours[name]
        assert out.dtype == STAT[dtype] and out.shape == gt.shape, (name, out.dtype, out.shape,
                                                                    gt.shape)
        if dtype == F64:
            assert_close_f64(out, gt, name, rtol=1e-9)
        else:
            assert_relative_rule(out, same[name], gt, STAT[dtype], name)
    if not compute_col:
        assert ours["col_cross"].shape == ours["col_lse"].shape == (0,)
    if not teacher_grad:
        assert all(ours[f"{n}[{subset_id(s)}]"].shape == (0,)
                   for n in ("grad_t_query", "grad_t_keys") for s in subsets)


# ---------------------------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_grad", [True, False], ids=["teacher", "student"])
@pytest.mark.parametrize("compute_col", [True, False], ids=["cols", "rows"])
@pytest.mark.parametrize("scales", SCALES, ids=lambda s: f"s{s[0]:g}-t{s[1]:g}")
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_float64_matches_reference(geometry, scales, compute_col, teacher_grad):
    """Every subset of the upstream gradients (all four, or g and u without columns)."""
    subsets = ALL_SUBSETS if compute_col else ROW_SUBSETS
    compare(geometry, F64, scales=scales, compute_col=compute_col, subsets=subsets,
            teacher_grad=teacher_grad)


def test_student_lse_against_torch_logsumexp():
    """The student's statistics are the plain log-sum-exp of S = s·Q·Kᵀ (independent of the
    reference backend's code), whatever the teacher."""
    q, k, a, b = features(300, 83, 17, 33, F64)
    s, t = torch.tensor(100.0, dtype=F64), torch.tensor(3.0, dtype=F64)
    logits = s * (q @ k.T)
    tl = reference.logits(a, b, t)
    _, _, row_lse, col_lse = torch.ops.ck_native.soft_xent_fwd(q, k, s, a, b, t, tl.logsumexp(1),
                                                               tl.logsumexp(0), True)
    assert_close_f64(row_lse, logits.logsumexp(dim=1), "row_lse", rtol=1e-12)
    assert_close_f64(col_lse, logits.logsumexp(dim=0), "col_lse", rtol=1e-12)


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64], ids=["f32", "bf16", "f64"])
def test_student_lse_is_the_lse_ops_bitwise(dtype, blocks, monkeypatch):
    """The student's row / column log-sum-exp come from the same tiles, tile pass and group-order
    merge as ck_native::lse_fwd's: the very same bits, so the contrastive loss does not change when
    the distillation loss takes its statistics from this op."""
    if blocks == "small":
        for name, value in SMALL_TILES.items():
            monkeypatch.setenv(name, value)
    if dtype == torch.bfloat16:
        # The soft-target family keeps the upcast path for bfloat16: the same bits as the LSE op
        # on that path (on the bf16 dot-product path the LSE op's tiles differ in the last bits).
        monkeypatch.setenv("CK_CPU_ISA", "avx512")
    q, k, a, b = (x.to(dtype) for x in features(257, 300, 40, 7, F64, seed=7))
    st = STAT[dtype]
    s, t = torch.tensor(30.0, dtype=st), torch.tensor(5.0, dtype=st)
    tl = reference.logits(a, b, t).to(st)
    for compute_col in (True, False):
        t_col = tl.logsumexp(0) if compute_col else tl.new_empty(0)
        ours = torch.ops.ck_native.soft_xent_fwd(q, k, s, a, b, t, tl.logsumexp(1), t_col,
                                                 compute_col)
        lse = torch.ops.ck_native.lse_fwd(q, k, s, None, None, None, False, compute_col)
        assert torch.equal(ours[2], lse[0]) and torch.equal(ours[3], lse[1]), compute_col


@pytest.mark.parametrize("geometry", GEOMETRIES[3:], ids=lambda g: "x".join(map(str, g)))
def test_float64_small_tiles(geometry, monkeypatch):
    """Several row groups and column tiles: the per-group column sums, column statistics and key
    gradients merge."""
    for name, value in SMALL_TILES.items():
        monkeypatch.setenv(name, value)
    compare(geometry, F64, scales=SCALES[1], subsets=ALL_SUBSETS)


@pytest.mark.parametrize("t_dtype", [None, torch.float32, torch.bfloat16],
                         ids=["same", "t-f32", "t-bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[3], GEOMETRIES[5]],
                         ids=lambda g: "x".join(map(str, g)))
def test_low_precision_relative_rule(geometry, dtype, t_dtype):
    compare(geometry, dtype, t_dtype, scales=SCALES[1])


def test_float64_student_with_a_float32_teacher():
    """The teacher's features and statistics in another dtype are converted to the student's
    statistic dtype, as the chunked backend does (the reference forms T in the teacher's own)."""
    compare(GEOMETRIES[5], F64, torch.float32, scales=SCALES[1], ref="chunked")


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_isa_paths(monkeypatch, isa):
    select_isa(monkeypatch, isa)
    for name, value in SMALL_TILES.items():
        monkeypatch.setenv(name, value)
    compare(GEOMETRIES[4], torch.float32, scales=SCALES[1], subsets=ALL_SUBSETS)


def test_no_upstream_gradient_gives_zeros():
    q, k, a, b = features(9, 11, 8, 5, F64)
    s, t = torch.tensor(2.0, dtype=F64), torch.tensor(5.0, dtype=F64)
    tl, sl = reference.logits(a, b, t), reference.logits(q, k, s)
    outs = torch.ops.ck_native.soft_xent_bwd(q, k, s, a, b, t, tl.logsumexp(1), tl.logsumexp(0),
                                             sl.logsumexp(1), sl.logsumexp(0), None, None, None,
                                             None, True)
    assert [tuple(x.shape) for x in outs] == [(9, 8), (11, 8), (9, 5), (11, 5)]
    assert all(not x.any() for x in outs)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_distill_clip_loss_matches_reference(dtype):
    """Through the public loss (autograd, both directions, the teacher's and the scales'
    gradients): backend="cpu" against backend="reference"."""
    feats = features(70, 70, 24, 10, F64, seed=5)

    def go(backend):
        leaves = [f.to(dtype).clone().requires_grad_(True) for f in feats]
        scales = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (30.0, 55.0)]
        c, d = ck.distill_clip_loss(leaves[0], leaves[1], scales[0], leaves[2], leaves[3],
                                    scales[1], backend=backend)
        (c + 3.0 * d).backward()
        return [c.detach(), d.detach()] + [x.grad for x in leaves + scales]

    ours, truth = go("cpu"), go("reference")
    names = ["contrastive", "distill", "grad_img", "grad_txt", "grad_t_img", "grad_t_txt",
             "grad_scale", "grad_t_scale"]
    for name, out, gt in zip(names, ours, truth):
        rtol = 1e-9 if dtype == F64 else 1e-4
        assert_close_f64(out, gt, name, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# repeatability
# ---------------------------------------------------------------------------------------------

def _all_outputs(dtype):
    """Every output at a shape with several row groups and column tiles."""
    feats = features(1030, 300, 40, 24, dtype, seed=11)
    outs = run("cpu", feats, dtype, dtype, (9.0, 20.0), True,
               [UPSTREAMS, ("row", "col"), ("row_lse", "col_lse")], True)
    return list(outs.values())


@pytest.mark.parametrize("blocks", ["default", "small"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_bitwise_repeatable(dtype, threads, blocks, monkeypatch):
    """At a fixed thread count repeats give the same bits (the kernels' tasks claim row groups
    dynamically; the column results are merged per group in group order, csrc/cpu/tiling.h).
    Different thread counts may differ in the last bits, as for every native CPU kernel."""
    if blocks == "small":
        for name, value in {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "40"}.items():
            monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        if torch.get_num_threads() != threads:
            pytest.skip(f"cannot run on {threads} threads here")
        first = _all_outputs(dtype)
        for _ in range(2):
            for i, (x, y) in enumerate(zip(first, _all_outputs(dtype))):
                assert torch.equal(x, y), f"output {i} differs between repeats"
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# backend selection, input checks
# ---------------------------------------------------------------------------------------------

def test_auto_picks_the_native_kernels_on_cpu():
    for dtype in (torch.float32, torch.bfloat16, F64):
        assert backends.resolve("auto", torch.device("cpu"), dtype, "soft_xent") == "cpu"
    assert "soft_xent" not in backends.MISSING["cpu"]
    # CUDA tensors never reach the CPU kernels: auto skips cpu there, an explicit "cpu" says why
    assert backends.resolve("auto", torch.device("cuda"), torch.float32, "soft_xent") != "cpu"
    with pytest.raises(RuntimeError, match="needs CPU tensors"):
        backends.resolve("cpu", torch.device("cuda"), torch.float32, "soft_xent")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("ck_native::soft_xent_fwd", "CUDA")


def _op_inputs(n=5, m=6, d=8, dt=3, dtype=F64):
    q, k, a, b = (x.to(dtype) for x in features(n, m, d, dt, F64))
    st = STAT[dtype]
    s, t = torch.tensor(2.0, dtype=st), torch.tensor(3.0, dtype=st)
    return q, k, s, a, b, t, torch.zeros(n, dtype=st), torch.zeros(m, dtype=st)


def _fwd(*args, compute_col=True):
    return torch.ops.ck_native.soft_xent_fwd(*args, compute_col)


def _bwd(*args, lse=None, grads=None, teacher_grad=True):
    """The backward on the forward's inputs `args`; the student's statistics `lse` (default
    zeros) and the four upstream gradients `grads` (default ones)."""
    n, m = args[0].shape[0], args[1].shape[0]
    st = args[2].dtype
    lse = lse if lse is not None else (torch.zeros(n, dtype=st), torch.zeros(m, dtype=st))
    if grads is None:
        grads = tuple(torch.ones(n if i % 2 == 0 else m, dtype=st) for i in range(4))
    return torch.ops.ck_native.soft_xent_bwd(*args, *lse, *grads, teacher_grad)


@pytest.mark.parametrize("call", [_fwd, _bwd], ids=["fwd", "bwd"])
def test_empty_inputs_are_refused(call):
    """As every native op: N, M, D ≥ 1 (the public losses refuse an empty batch earlier, with a
    ValueError), and Dt ≥ 1."""
    q, k, s, a, b, t, ra, cb = _op_inputs()
    with pytest.raises(RuntimeError, match="N, M and D must be >= 1"):
        call(q[:0], k, s, a[:0], b, t, ra[:0], cb)
    with pytest.raises(RuntimeError, match="N, M and D must be >= 1"):
        call(q, k[:0], s, a, b[:0], t, ra, cb[:0])
    with pytest.raises(RuntimeError, match="Dt >= 1"):
        call(q, k, s, a[:, :0], b[:, :0], t, ra, cb)
    with pytest.raises(ValueError, match="empty batch"):
        ck.distill_clip_loss(q[:0], k[:0], 2.0, a[:0], b[:0], 3.0, backend="cpu")


@pytest.mark.parametrize("call", [_fwd, _bwd], ids=["fwd", "bwd"])
def test_bad_inputs_are_refused(call):
    q, k, s, a, b, t, ra, cb = _op_inputs()
    cases = [
        ((q, k, s, a[:4], b, t, ra, cb), r"t_query and t_keys must have shapes \(N, Dt\)"),
        ((q, k, s, a, b[:, :2], t, ra, cb), r"t_query and t_keys must have shapes \(N, Dt\)"),
        ((q, k, s, a, b.float(), t, ra, cb), "t_query and t_keys must have one dtype"),
        ((q, k, s, a.int(), b.int(), t, ra, cb), "t_query and t_keys must have one dtype"),
        ((q, k, s, a.t().contiguous().t(), b, t, ra, cb), "t_query and t_keys must be contiguous"),
        ((q, k, s, a, b, t.float(), ra, cb), "t_scale must be a one-element"),
        ((q, k, s, a, b, torch.ones(2, dtype=F64), ra, cb), "t_scale must be a one-element"),
        ((q, k, s, a, b, torch.tensor(-1.0, dtype=F64), ra, cb), "t_scale must be finite and > 0"),
        ((q, k, s, a, b, torch.tensor(float("inf"), dtype=F64), ra, cb), "t_scale must be finite"),
        ((q, k, torch.tensor(0.0, dtype=F64), a, b, t, ra, cb), "scale must be finite and > 0"),
        ((q, k, s, a, b, t, ra[:4], cb), "t_row_lse must be a"),
        ((q, k, s, a, b, t, ra, cb.float()), "t_col_lse must be a"),
        ((q, k[:, :5], s, a, b, t, ra, cb), "same feature size"),
    ]  # (meta tensors reach the ops' fake kernels, contrastive_kernels/_native.py: shapes only)
    for args, msg in cases:
        with pytest.raises((RuntimeError, NotImplementedError), match=msg):
            call(*args)


def test_bad_upstream_gradients_are_refused():
    args = _op_inputs()
    ok_n, ok_m = torch.ones(5, dtype=F64), torch.ones(6, dtype=F64)
    cases = [
        ((torch.ones(5, dtype=torch.float32), None, None, None), "grad_row must be a"),
        ((None, torch.ones(7, dtype=F64), None, None), "grad_col must be a"),
        ((None, None, torch.ones(4, dtype=F64), None), "grad_row_lse must be a"),
        ((None, None, ok_n.float(), None), "grad_row_lse must be a"),
        ((None, None, None, torch.ones(6, 1, dtype=F64)), "grad_col_lse must be a"),
        ((None, None, None, ok_m.float()), "grad_col_lse must be a"),
    ]
    for grads, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            _bwd(*args, grads=grads)


def test_bad_student_statistics_are_refused():
    """row_lse / col_lse (the forward's student statistics) are checked where they are read."""
    args = _op_inputs()
    ok_n, ok_m = torch.zeros(5, dtype=F64), torch.zeros(6, dtype=F64)
    cases = [
        ((ok_n[:4], ok_m), "row_lse must be a"),
        ((ok_n.float(), ok_m), "row_lse must be a"),
        ((ok_n, ok_m[:5]), "col_lse must be a"),
        ((ok_n, ok_m.float()), "col_lse must be a"),
        ((ok_n, ok_m.expand(2, 6)), "col_lse must be a"),
    ]
    for lse, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            _bwd(*args, lse=lse)


def test_statistics_not_needed_are_not_read():
    """compute_col=False reads no t_col_lse (the front door passes (0,)) and returns (0,) columns;
    likewise a backward without grad_col / grad_row / grad_col_lse / grad_row_lse reads no
    t_col_lse / t_row_lse / col_lse / row_lse."""
    q, k, s, a, b, t, ra, cb = _op_inputs()
    empty = ra.new_empty(0)
    row, col, row_lse, col_lse = _fwd(q, k, s, a, b, t, ra, empty, compute_col=False)
    assert row.shape == row_lse.shape == (5,) and col.shape == col_lse.shape == (0,)
    gn, gm = torch.ones(5, dtype=F64), torch.ones(6, dtype=F64)
    # the forward without columns: h and v are None, t_col_lse and col_lse (0,)
    _bwd(q, k, s, a, b, t, ra, empty, lse=(row_lse, col_lse), grads=(gn, None, gn, None))
    _bwd(q, k, s, a, b, t, empty, cb, lse=(empty, empty), grads=(None, gm, None, None))
    _bwd(q, k, s, a, b, t, empty, empty, lse=(row_lse, empty), grads=(None, None, gn, None))
    _bwd(q, k, s, a, b, t, empty, empty, lse=(empty, cb), grads=(None, None, None, gm))
