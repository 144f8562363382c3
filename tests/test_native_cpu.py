"""torch.ops.ck_native.lse_fwd / lse_bwd (csrc/cpu) against a dense float64 formula written here."""
from __future__ import annotations

import itertools
import os
import platform

import pytest
import torch
import contrastive_kernels as ck
from contrastive_kernels import reference
from helpers import select_isa

_native = pytest.importorskip("contrastive_kernels._native")
_ok, _why = _native.load()
if not _ok:
    if os.environ.get("CI"):  # CI builds the extension: its absence is a failure there
        pytest.fail(_why, pytrace=False)
    pytest.skip(_why, allow_module_level=True)

SIZES = (1, 7, 37, 130, 257)
STAT = {torch.float64: torch.float64, torch.float32: torch.float32,
        torch.bfloat16: torch.float32, torch.float16: torch.float32}
# max|out − exact| ≤ TOL·max|exact| (+ the relative rule in test_large_scale). 16-bit inputs are
# upcast exactly to float32 and compared with the exact formula on the same rounded values, so their
# error is float32 accumulation error too; the extra factor covers the wider spread of 16-bit data
# sums (fewer cancellations) without hiding a bug (a wrong term is O(1) relative).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 4e-5, torch.float16: 4e-5}


def exact(q, k, scale, labels, grad_row, grad_col, grad_pos, dtype=torch.float64):
    """The op contract densely in `dtype` (the one oracle, reference.lse_op):
    (row_lse, col_lse, pos, grad_q, grad_k)."""
    r, c, pos, _, gq, gk = reference.lse_op(q, k, scale, labels, grad_row=grad_row,
                                            grad_col=grad_col, grad_pos=grad_pos, dtype=dtype)
    return r, c, pos, gq, gk


def make(n, m, d, dtype, *, labels=False, seed=0, norm=True, scale=10.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(m, d, generator=gen, dtype=torch.float64)
    if norm:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    lab = torch.randint(0, m, (n,), generator=gen) if labels else None
    stat = STAT[dtype]
    grads = (torch.randn(n, generator=gen, dtype=torch.float64).to(stat),
             torch.randn(m, generator=gen, dtype=torch.float64).to(stat),
             torch.randn(n, generator=gen, dtype=torch.float64).to(stat))
    return q.to(dtype), k.to(dtype), torch.tensor(scale, dtype=stat), lab, grads


def run(q, k, scale, labels, grads, compute_col=True):
    r, c, p, _ = torch.ops.ck_native.lse_fwd(q, k, scale, labels, None, None, False, compute_col)
    gr, gc, gp = grads
    dq, dk = torch.ops.ck_native.lse_bwd(q, k, scale, labels, None, None, False, r, c, gr, gc, gp)
    return r, c, p, dq, dk


def rel_err(out, ref):
    return (out.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-300)


def check(outs, refs, tol, names=("row_lse", "col_lse", "pos", "grad_query", "grad_keys")):
    for name, o, r in zip(names, outs, refs):
        if r is None:
            continue
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        e = rel_err(o, r)
        assert e <= tol, f"{name}: max error {e:.3g} (relative to max |exact|) > {tol:.1g}"


SHAPES = [(1, 1, 1), (7, 7, 7), (7, 37, 130), (37, 7, 257), (130, 257, 37), (257, 130, 1),
          (257, 257, 130), (1, 257, 7), (130, 1, 37), (257, 37, 257)]


# Without labels the positive of row i is column i, which needs M >= N: those shapes run with labels only.
SHAPE_LABEL_CASES = [pytest.param(n, m, d, labels, id=f"{(n, m, d)}-{'labels' if labels else 'diag'}")
                     for (n, m, d) in SHAPES for labels in (False, True) if labels or m >= n]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,m,d,labels", SHAPE_LABEL_CASES)
def test_fwd_bwd_matches_exact(monkeypatch, n, m, d, dtype, labels):
    if dtype == torch.bfloat16:
        # The upcast path, held to float32 accuracy; the bf16 dot-product path (G rounded to bf16)
        # is tested against its own model in test_native_cpu_families.py (test_*_bf16_paths).
        monkeypatch.setenv("CK_CPU_ISA", "avx512")
    q, k, scale, lab, grads = make(n, m, d, dtype, labels=labels)
    outs = run(q, k, scale, lab, grads)
    assert all(o.dtype == STAT[dtype] for o in outs)
    check(outs, exact(q, k, scale, lab, *grads), TOL[dtype])


@pytest.mark.parametrize("n,m,d", list(itertools.product(SIZES, SIZES, SIZES)), ids=str)
def test_forward_grid_float32(n, m, d):
    q, k, scale, lab, _ = make(n, m, d, torch.float32, labels=True, seed=n * 1000 + m * 10 + d)
    r, c, p, _ = torch.ops.ck_native.lse_fwd(q, k, scale, lab, None, None, False, True)
    check((r, c, p), exact(q, k, scale, lab, None, None, None)[:3], TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("which", list(itertools.product([False, True], repeat=3)),
                         ids=lambda w: "".join(x for x, on in zip("rcp", w) if on) or "none")
def test_optional_grads(dtype, which):
    n, m, d = 130, 257, 37
    q, k, scale, lab, grads = make(n, m, d, dtype, labels=True, seed=3)
    grads = tuple(g if on else None for g, on in zip(grads, which))
    compute_col = which[1]
    r, c, p, _ = torch.ops.ck_native.lse_fwd(q, k, scale, lab, None, None, False, compute_col)
    if not compute_col:
        assert c.shape == (0,) and c.dtype == STAT[dtype]
    dq, dk = torch.ops.ck_native.lse_bwd(q, k, scale, lab, None, None, False, r, c, *grads)
    ref = exact(q, k, scale, lab, *grads)
    if not any(which):
        assert (dq == 0).all() and (dk == 0).all()
        return
    check((r, p, dq, dk), (ref[0], ref[2], ref[3], ref[4]), TOL[dtype],
          names=("row_lse", "pos", "grad_query", "grad_keys"))


def test_expanded_grads_are_accepted():
    """Autograd hands over stride-0 gradients (e.g. from .mean()): they must read correctly."""
    q, k, scale, _, _ = make(37, 37, 16, torch.float32)
    r, c, p, _ = torch.ops.ck_native.lse_fwd(q, k, scale, None, None, None, False, True)
    g = torch.tensor(0.5).expand(37)
    dq, dk = torch.ops.ck_native.lse_bwd(q, k, scale, None, None, None, False, r, c, g, g, -2 * g)
    ref = exact(q, k, scale, None, g, g, -2 * g)
    check((dq, dk), ref[3:], TOL[torch.float32], names=("grad_query", "grad_keys"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("scale", [1.0, 30.0, 100.0])
def test_large_scale_unnormalised(dtype, scale):
    """|S| reaches ~10^4 here: an unshifted exp would overflow. float32 logits of that size carry
    ~1e-3 absolute error, so the float32 kernel is held to the relative rule: no worse than twice
    the dense PyTorch computation in float32, plus a small absolute term."""
    q, k, scale_t, lab, grads = make(130, 257, 37, dtype, labels=True, norm=False, scale=scale)
    outs = run(q, k, scale_t, lab, grads)
    ref = exact(q, k, scale_t, lab, *grads)
    names = ("row_lse", "col_lse", "pos", "grad_query", "grad_keys")
    for o in outs:
        assert torch.isfinite(o).all()
    if dtype == torch.float64:
        check(outs, ref, 1e-9)
        return
    same = exact(q, k, scale_t, lab, *grads, dtype=torch.float32)
    for name, o, r, s in zip(names, outs, ref, same):
        bound = 2 * rel_err(s, r) + 1e-5
        assert rel_err(o, r) <= bound, f"{name}: {rel_err(o, r):.3g} > {bound:.3g}"


def test_losses_are_nonnegative_in_floating_point():
    """pos is read from the tile the log-sum-exps saw, so −pos + lse ≥ 0 holds exactly."""
    q, k, scale, _, _ = make(257, 257, 37, torch.float32, norm=False, scale=100.0, seed=9)
    r, c, p, _ = torch.ops.ck_native.lse_fwd(q, k, scale, None, None, None, False, True)
    assert (r - p >= 0).all() and (c - p >= 0).all()


def test_thread_count_independence():
    q, k, scale, lab, grads = make(257, 257, 130, torch.float32, labels=True, seed=5)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(q, k, scale, lab, grads)
        torch.set_num_threads(2)
        two = run(q, k, scale, lab, grads)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert rel_err(a, b.double()) <= 1e-6


@pytest.mark.parametrize("env", [
    {"CK_CPU_ISA": "avx512"},
    {"CK_CPU_ISA": "avx2"},
    {"CK_CPU_ISA": "scalar"},
    {"CK_CPU_BLOCK_ROWS": "16", "CK_CPU_BLOCK_COLS": "48"},
    {"CK_CPU_BLOCK_ROWS": "1", "CK_CPU_BLOCK_COLS": "1"},
], ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_code_paths(monkeypatch, env):
    """Every SIMD path and small tiles (many partial tiles) on one machine.
    The environment variables are read at every call; a path the CPU lacks would fall back
    silently, so the SIMD path that runs is asserted (and the case skipped where the CPU lacks it)."""
    for key, val in env.items():
        if key == "CK_CPU_ISA":
            select_isa(monkeypatch, val)
        else:
            monkeypatch.setenv(key, val)
    for n, m, d in [(37, 130, 7), (130, 37, 130)]:
        q, k, scale, lab, grads = make(n, m, d, torch.float32, labels=True, seed=n + m)
        check(run(q, k, scale, lab, grads), exact(q, k, scale, lab, *grads), TOL[torch.float32])


def _hardware_isa():
    """The best path by the CPU's own flags (Linux), independent of the extension's cpuid code."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")),
                         None)
    except OSError:
        flags = None
    if flags is None:
        return None
    if {"avx512f", "avx2", "fma"} <= set(flags):
        return "avx512_bf16" if {"avx512_bf16", "avx512bw", "avx512vl"} <= set(flags) else "avx512"
    return "avx2" if {"avx2", "fma"} <= set(flags) else "scalar"


@pytest.mark.parametrize("want", ["scalar", "avx2", "avx512", "avx512_bf16"])
def test_cpu_isa_reports_the_path(monkeypatch, want):
    """cpu_isa() names the path CK_CPU_ISA selects, lowered to what the hardware supports."""
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    monkeypatch.delenv("CK_CPU_ISA", raising=False)
    hw = torch.ops.ck_native.cpu_isa()
    assert hw in order
    if _hardware_isa() is not None and platform.machine() in ("x86_64", "AMD64"):
        assert hw == _hardware_isa()
    monkeypatch.setenv("CK_CPU_ISA", want)
    expected = order[min(order.index(want), order.index(hw))]
    assert torch.ops.ck_native.cpu_isa() == expected
    assert ck.cpu_isa() == expected  # the public name reports the same path


def test_bad_tile_env(monkeypatch):
    monkeypatch.setenv("CK_CPU_BLOCK_ROWS", "zero")
    q, k, scale, _, _ = make(7, 7, 7, torch.float32)
    with pytest.raises(RuntimeError, match="CK_CPU_BLOCK_ROWS must be a positive integer"):
        torch.ops.ck_native.lse_fwd(q, k, scale, None, None, None, False, True)


def test_nan_propagates():
    q, k, scale, _, _ = make(37, 37, 16, torch.float32)
    q[3, 5] = float("nan")
    r, c, p, _ = torch.ops.ck_native.lse_fwd(q, k, scale, None, None, None, False, True)
    assert torch.isnan(r[3]) and torch.isnan(c).all() and torch.isnan(p[3])
    assert torch.isfinite(r[torch.arange(37) != 3]).all()


def _bad(**over):
    q, k, scale, _, _ = make(7, 9, 5, torch.float32)
    args = {"query": q, "keys": k, "scale": scale, "labels": None}
    args.update(over)
    return args


@pytest.mark.parametrize("args,match", [
    (lambda: _bad(keys=torch.randn(9, 5, dtype=torch.float64)), "same dtype"),
    (lambda: _bad(query=torch.randn(7, 5, dtype=torch.float64), keys=torch.zeros(9, 5).long()),
     "same dtype"),
    (lambda: _bad(query=torch.randn(7, 5).long(), keys=torch.randn(9, 5).long()), "dtype must be"),
    (lambda: _bad(keys=torch.randn(9, 4)), "same feature size"),
    (lambda: _bad(query=torch.randn(7, 5, 1)), "must be 2-D"),
    (lambda: _bad(query=torch.randn(5, 7).T), "contiguous"),
    (lambda: _bad(query=torch.randn(0, 5)), "must be >= 1"),
    (lambda: _bad(scale=torch.tensor(0.0)), "finite and > 0"),
    (lambda: _bad(scale=torch.tensor(float("inf"))), "finite and > 0"),
    (lambda: _bad(scale=torch.tensor(1.0, dtype=torch.float64)), "scale must be a one-element Float"),
    (lambda: _bad(scale=torch.ones(2)), "scale must be a one-element Float"),
    (lambda: _bad(query=torch.randn(11, 5)), "M >= N"),
    (lambda: _bad(labels=torch.tensor([0, 1, 2, 3, 4, 5, 9])), r"labels\[6\] = 9"),
    (lambda: _bad(labels=torch.tensor([0, 1, 2, 3, 4, 5, -1])), r"labels\[6\] = -1"),
    (lambda: _bad(labels=torch.zeros(6, dtype=torch.long)), "labels must be an int64"),
    (lambda: _bad(labels=torch.zeros(7, dtype=torch.int32)), "labels must be an int64"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_errors(args, match):
    a = args()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.ck_native.lse_fwd(a["query"], a["keys"], a["scale"], a["labels"], None, None,
                                    False, True)


def test_bwd_errors():
    q, k, scale, _, _ = make(7, 9, 5, torch.float32)
    r, c, _, _ = torch.ops.ck_native.lse_fwd(q, k, scale, None, None, None, False, False)
    g = torch.ones(7)
    with pytest.raises(RuntimeError, match=r"grad_col must be a Float CPU tensor of shape \(9\)"):
        torch.ops.ck_native.lse_bwd(q, k, scale, None, None, None, False, r, c, g, torch.ones(7),
                                    None)
    with pytest.raises(RuntimeError, match=r"col_lse must be a Float CPU tensor of shape \(9\)"):
        torch.ops.ck_native.lse_bwd(q, k, scale, None, None, None, False, r, c, g, torch.ones(9),
                                    None)
    with pytest.raises(RuntimeError, match="grad_row must be a Float"):
        torch.ops.ck_native.lse_bwd(q, k, scale, None, None, None, False, r, c, g.double(), None,
                                    None)
    # col_lse of shape (0,) is fine while grad_col is None.
    dq, dk = torch.ops.ck_native.lse_bwd(q, k, scale, None, None, None, False, r, c, g, None, g)
    assert dq.shape == (7, 5) and dk.shape == (9, 5)


def test_extension_metadata():
    assert _native.has_cpu_kernels()
    if torch.version.cuda is None:
        assert not _native.has_cuda_kernels()
    assert _native.load() == (True, "")
