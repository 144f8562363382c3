"""The Triton soft-target cross-entropy kernels (``backends/triton/soft_xent.py``) against the
reference backend's same-named callables (``backends/_soft_xent.py``, the contract), judged by the
relative rule: the reference in float64 on the same values is the truth, the reference in the
kernel's dtype the yardstick.

Student ``S = s·Q·Kᵀ`` (D), teacher ``T = t·A·Bᵀ`` (its own Dt, scale and dtype), the teacher's
row / column log-sum-exp given; the forward returns the cross terms and the student's row / column
log-sum-exp, the backward takes the upstream gradients of all four (each may be None), the
student's log-sum-exp being each backend's own forward output. The backend callables are called
directly on CPU tensors under Triton's interpreter (conftest sets TRITON_INTERPRET=1), with small
tiles forced so that the problems have several row blocks, column tiles and D chunks: BLOCK_M = 16
(37 rows: 3 blocks, the transposed launch's 70: 5), BLOCK_N = 32 (the interpreter's config; 70
columns: 3 tiles, the last ragged), BLOCK_D = 16 with the feature row resident only up to 16
(D = 40: three chunks, the last ragged; D = 13: resident), so each case runs one side resident and
the other chunked. The Triton kernels take no float64 (as every Triton kernel of the package):
float32, bfloat16 (upcast under the interpreter) and float16 here.
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

SMALL = dict(fwd_block_m=16, bwd_block_m=16, chunk_d=16, fwd_max_single_d=16,
             bwd_max_single_d=16)
GRAD_NAMES = ("grad_query", "grad_keys", "grad_t_query", "grad_t_keys")
STAT_NAMES = ("row_cross", "col_cross", "row_lse", "col_lse")
ALL = (True, True, True, True)  # given: grad_row, grad_col, grad_row_lse, grad_col_lse


def problem(n=37, m=70, d=40, dt=13, scale=17.0, t_scale=100.0, dtype=torch.float32,
            t_dtype=None, seed=0):
    """Unit feature rows in ``dtype`` (the teacher's in ``t_dtype``, default the same), the
    scales, the teacher's log-sum-exp in float64 of exactly these values, the upstream gradients
    (g (N,), h (M,), u (N,), v (M,))."""
    t_dtype = t_dtype or dtype
    g = torch.Generator().manual_seed(seed)

    def unit(rows, width, dt_):
        x = torch.randn(rows, width, generator=g, dtype=torch.float64)
        return torch.nn.functional.normalize(x, dim=1).to(dt_)
    q, k, a, b = unit(n, d, dtype), unit(m, d, dtype), unit(n, dt, t_dtype), unit(m, dt, t_dtype)
    s, t = torch.tensor(scale, dtype=dtype), torch.tensor(t_scale, dtype=t_dtype)
    logits = t.double() * (a.double() @ b.double().T)
    grads = tuple(torch.randn(x, generator=g, dtype=torch.float64) for x in (n, m, n, m))
    return dict(query=q, keys=k, scale=s, t_query=a, t_keys=b, t_scale=t,
                t_row_lse=logits.logsumexp(1), t_col_lse=logits.logsumexp(0)), grads


def _args(kw, f64: bool):
    """The positional inputs: every float tensor in float64 (the truth), or the features and
    scales as given with the statistics in float32 (the statistic dtype of the kernels)."""
    names = ("query", "keys", "scale", "t_query", "t_keys", "t_scale", "t_row_lse", "t_col_lse")
    if f64:
        return tuple(kw[n].double() for n in names)
    return tuple(kw[n].float() if n.endswith("lse") else kw[n] for n in names)


def run(mod, kw, grads, f64, compute_col=True, use=ALL, teacher=True):
    """Forward and backward of ``mod``'s callables: {name: output}. ``use``: which of the upstream
    gradients (g, h, u, v) are given (the columns' only with ``compute_col``, as the op does); the
    backward gets the forward's own row_lse / col_lse."""
    args = _args(kw, f64)
    st = torch.float64 if f64 else torch.float32
    stats = mod.soft_xent_fwd(*args, compute_col)
    ups = [x.to(st) if on and (compute_col or i % 2 == 0) else None
           for i, (x, on) in enumerate(zip(grads, use))]
    out = dict(zip(STAT_NAMES, stats))
    out.update(zip(GRAD_NAMES, mod.soft_xent_bwd(*args, stats[2], stats[3], *ups, teacher)))
    return out


def check(kw, grads, **spec):
    """Triton (small tiles) vs the reference in the same dtype and in float64; returns Triton's."""
    dtype = kw["query"].dtype
    with tu.tuning(**SMALL):
        outs = run(tk, kw, grads, False, **spec)
    same, gt = run(rb, kw, grads, False, **spec), run(rb, kw, grads, True, **spec)
    assert outs.keys() == gt.keys()
    for name, o in outs.items():
        assert o.dtype == torch.float32, f"{name}: {o.dtype}"
        assert o.shape == gt[name].shape, f"{name}: {tuple(o.shape)} vs {tuple(gt[name].shape)}"
        if o.numel():
            assert_relative_rule(o, same[name], gt[name], dtype, name=name)
    return outs


# (n, m, d, dt): several blocks with ragged ends, one row, one column, D resident and chunked on
# either side (resident up to 16 under SMALL)
SHAPES = {
    "37x70_d40_dt13": (37, 70, 40, 13),
    "37x70_d13_dt40": (37, 70, 13, 40),
    "n1_d24_dt7": (1, 45, 24, 7),
    "m1_d9_dt33": (33, 1, 9, 33),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("compute_col", [True, False], ids=["col", "no_col"])
def test_fwd_bwd_float32(shape, compute_col):
    n, m, d, dt = SHAPES[shape]
    kw, grads = problem(n, m, d, dt, seed=len(shape))
    outs = check(kw, grads, compute_col=compute_col)
    assert outs["col_cross"].shape == outs["col_lse"].shape == ((m,) if compute_col else (0,))
    # the student's log-sum-exp also against torch directly (float64 logits of the same values)
    logits = kw["scale"].double() * (kw["query"].double() @ kw["keys"].double().T)
    torch.testing.assert_close(outs["row_lse"].double(), logits.logsumexp(1), rtol=0, atol=1e-5)
    if compute_col:
        torch.testing.assert_close(outs["col_lse"].double(), logits.logsumexp(0), rtol=0,
                                   atol=1e-5)


def _use_id(use):
    return "+".join(n for n, on in zip("ghuv", use) if on)


# every non-empty subset of the upstream gradients (g, h, u, v); without columns only g, u exist
SUBSETS = [(cc, use) for cc in (True, False) for use in itertools.product((True, False), repeat=4)
           if any(use) and (cc or not (use[1] or use[3]))]


@pytest.mark.parametrize("teacher", [True, False], ids=["teacher", "frozen"])
@pytest.mark.parametrize("compute_col,use", SUBSETS,
                         ids=[("col-" if cc else "no_col-") + _use_id(u) for cc, u in SUBSETS])
def test_upstream_subsets(compute_col, use, teacher):
    """Each of g, h, u, v None or given (every combination; h, v only with columns), teacher_grad
    both ways (False: (0,) teacher gradients; True without g and h: exactly zero ones, the teacher
    tile never formed); distinct scales (s = 3, t = 50), a smaller problem (2 row blocks, 2 column
    tiles, D chunked, Dt resident)."""
    kw, grads = problem(n=21, m=35, d=20, dt=12, scale=3.0, t_scale=50.0, seed=3)
    outs = check(kw, grads, compute_col=compute_col, use=use, teacher=teacher)
    if not teacher:
        assert outs["grad_t_query"].shape == outs["grad_t_keys"].shape == (0,)
    elif not (use[0] or use[1]):
        assert not outs["grad_t_query"].any() and not outs["grad_t_keys"].any()


@pytest.mark.parametrize("teacher", [True, False])
def test_no_upstream_gradient(teacher):
    """All four upstream gradients None (the op never asks; a direct caller may): exactly zero
    gradients of the features' shapes, nothing launched."""
    kw, _ = problem(n=5, m=7, d=6, dt=3)
    with tu.tuning(**SMALL):
        row_lse, col_lse = tk.soft_xent_fwd(*_args(kw, False), True)[2:]
    outs = tk.soft_xent_bwd(*_args(kw, False), row_lse, col_lse, None, None, None, None, teacher)
    shapes = [(5, 6), (7, 6), (5, 3), (7, 3)] if teacher else [(5, 6), (7, 6), (0,), (0,)]
    for name, o, shape in zip(GRAD_NAMES, outs, shapes):
        assert o.dtype == torch.float32 and o.shape == shape and not o.any(), name


@pytest.mark.parametrize("dtype,t_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                           (torch.bfloat16, torch.float32)],
                         ids=["bfloat16", "float16", "bf16_student_fp32_teacher"])
def test_16bit(dtype, t_dtype):
    kw, grads = problem(dtype=dtype, t_dtype=t_dtype, seed=5)
    check(kw, grads)


def test_rejects_float64():
    kw, grads = problem(n=4, m=4, d=8, dt=8)
    with pytest.raises(TypeError, match="float64"):
        tk.soft_xent_fwd(*_args(kw, True), True)


def test_bitwise_repeatable():
    kw, grads = problem(seed=9)
    with tu.tuning(**SMALL):
        one, two = run(tk, kw, grads, False), run(tk, kw, grads, False)
    for name in one:
        assert torch.equal(one[name], two[name]), name


@pytest.mark.parametrize("n,m", [(37, 300), (290, 37)], ids=["row_launch_split",
                                                              "col_launch_split"])
def test_column_splits(n, m, split_spy):
    """Forced column splits (3 asked; aligned to 256 columns: 256 + 44 of 300, 256 + 34 of 290):
    per-split sums, per-split log-sum-exps (merged by ``torch.logsumexp``) and private gradient
    slices folded in order. A spy checks that a launch split."""
    kw, grads = problem(n=n, m=m, d=24, dt=20, seed=11)
    with tu.tuning(split=3):
        check(kw, grads)
    assert max(split_spy) >= 2, split_spy


@pytest.mark.parametrize("dtype,frozen", [(torch.float32, False), (torch.bfloat16, False),
                                          (torch.float32, True)],
                         ids=["float32", "bfloat16", "float32_frozen_teacher"])
def test_distill_clip_loss_through_the_ops(dtype, frozen):
    """``ck.distill_clip_loss`` end to end with backend='triton' (the log-sum-exp ops and the
    soft-target op, autograd adding the scale and log-sum-exp gradients): both losses and the
    gradients of the four feature matrices and both scales (the student's only for a frozen
    teacher: teacher_grad False) against the reference backend in ``dtype`` (yardstick) and
    float64 (truth)."""
    import contrastive_kernels as ck
    from contrastive_kernels import backends

    assert backends.resolve("triton", torch.device("cpu"), torch.float32,
                            backends.features_of(soft_xent=True)) == "triton"
    g = torch.Generator().manual_seed(7)
    feats = [torch.randn(40, w, generator=g, dtype=torch.float64).to(dtype)
             for w in (24, 24, 12, 12)]

    def go(backend, dt):
        xs = [f.to(dt).clone().requires_grad_(not (frozen and i >= 2))
              for i, f in enumerate(feats)]
        s = torch.tensor(9.0, dtype=dt, requires_grad=True)
        t = torch.tensor(4.0, dtype=dt, requires_grad=not frozen)
        contrastive, distill = ck.distill_clip_loss(xs[0], xs[1], s, xs[2], xs[3], t,
                                                    backend=backend)
        (contrastive + 2.0 * distill).backward()
        return [contrastive.detach(), distill.detach()] + [x.grad for x in xs + [s, t]]

    with tu.tuning(**SMALL):
        outs = go("triton", dtype)
    same, gt = go("reference", dtype), go("reference", torch.float64)
    names = ("contrastive", "distill", "grad_img", "grad_txt", "grad_t_img", "grad_t_txt",
             "grad_scale", "grad_t_scale")
    for name, o, r, t in zip(names, outs, same, gt):
        if frozen and "_t_" in name:
            assert o is None and t is None, name
            continue
        assert o is not None, name
        assert_relative_rule(o.float().reshape(-1), r.float().reshape(-1), t.reshape(-1), dtype,
                             name=name)
