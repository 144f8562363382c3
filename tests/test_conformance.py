"""The conformance suite: every backend through the public API against the one dense oracle
(``contrastive_kernels.reference``, float64), with one input maker (``helpers.make_features``) and
one tolerance rule (``helpers.assert_relative_rule``; float64 paths at 1e-10 relative). Triton runs
here under its interpreter (32- and 16-bit, small shapes); knob variants stay in the per-backend
files (test_triton.py, test_native_cpu*.py, test_cuda.py)."""
import math
import os

import pytest
import torch

import contrastive_kernels as ck
from helpers import (assert_close_f64, assert_relative_rule, grads_of, leaf, make_features,
                     make_labels, reference, require_backend)

REDUCTIONS = ("mean", "sum", "none")

# (N, M, D, labels): M > N, M < N with labels, repeated labels, D = 1, awkward primes.
INFO_CASES = [
    (1, 1, 1, None),
    (7, 37, 130, None),
    (37, 37, 7, None),
    (130, 257, 37, None),
    (257, 130, 1, "repeat"),
    (37, 7, 257, "repeat"),
    (7, 257, 37, "perm"),
]
CLIP_CASES = [(1, 1), (7, 257), (37, 37), (130, 7), (257, 130)]  # (N = M, D)
GAMMA_CASES = [
    (1, 1, 7, None),
    (7, 37, 130, None),
    (130, 257, 37, None),
    (257, 130, 7, "repeat"),
    (37, 7, 257, "repeat"),
]


def _labels(spec, n, m):
    if spec is None:
        return None
    return make_labels(n, m, repeats=(spec == "repeat"))


def _log_u(q, k, scale, labels):
    """log u ≈ −log Ẑ (what the E-step produces) plus noise, so u·Ẑ ~ 1."""
    with torch.no_grad():
        _, log_z = reference.gamma_contrastive_loss(q, k, scale, torch.zeros(q.shape[0], dtype=q.dtype),
                                                    labels)
    g = torch.Generator().manual_seed(3)
    return (-log_z + 0.3 * torch.randn(q.shape[0], generator=g, dtype=log_z.dtype)).detach()


def _evaluate(kind, q, k, scale, *, labels=None, log_u=None, reduction="mean", backend=None,
              upstream=None):
    """(outputs, (grad_q, grad_k, grad_scale)) of one loss; backend=None → reference.py."""
    inputs = (q, k, scale)
    extra = []
    if kind == "info":
        out = (reference.info_nce(q, k, scale, labels, reduction) if backend is None else
               ck.info_nce(q, k, scale, labels, reduction=reduction, backend=backend))
    elif kind == "clip":
        out = (reference.clip_loss(q, k, scale, reduction=reduction) if backend is None else
               ck.clip_loss(q, k, scale, reduction=reduction, backend=backend))
    else:
        out, log_z = (reference.gamma_contrastive_loss(q, k, scale, log_u, labels, reduction)
                      if backend is None else
                      ck.gamma_contrastive_loss(q, k, scale, log_u, labels, reduction=reduction,
                                                backend=backend))
        assert not log_z.requires_grad
        extra.append(log_z)
    grads = grads_of(out, inputs, upstream if reduction == "none" else None)
    return [out.detach()] + extra, grads


def _check_f64(kind, backend, n, m, d, labels_spec, reduction, scale_value):
    q, k = make_features(n, m, d, seed=n * 1000 + m + d)
    labels = _labels(labels_spec, n, m)
    log_u = _log_u(q, k, scale_value, labels) if kind == "gamma" else None
    upstream = torch.randn(n, dtype=torch.float64)
    args = dict(labels=labels, log_u=log_u, reduction=reduction, upstream=upstream)
    gt_out, gt_grads = _evaluate(kind, leaf(q), leaf(k), leaf(torch.tensor(scale_value, dtype=torch.float64)),
                                 **args)
    out, grads = _evaluate(kind, leaf(q), leaf(k), leaf(torch.tensor(scale_value, dtype=torch.float64)),
                           backend=backend, **args)
    for i, (o, g) in enumerate(zip(out, gt_out)):
        assert o.dtype == torch.float64
        assert_close_f64(o, g, f"{kind} output {i}")
    for name, o, g in zip(("grad_query", "grad_keys", "grad_scale"), grads, gt_grads):
        assert o is not None and o.dtype == torch.float64, name
        assert_close_f64(o, g, f"{kind} {name}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,m,d,labels_spec", INFO_CASES)
def test_info_nce_float64(backend, n, m, d, labels_spec, reduction):
    _check_f64("info", backend, n, m, d, labels_spec, reduction, 14.0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,d", CLIP_CASES)
def test_clip_loss_float64(backend, n, d, reduction):
    _check_f64("clip", backend, n, n, d, None, reduction, 1 / 0.07)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,m,d,labels_spec", GAMMA_CASES)
def test_gamma_float64(backend, n, m, d, labels_spec, reduction):
    _check_f64("gamma", backend, n, m, d, labels_spec, reduction, 10.0)


@pytest.mark.parametrize("compute_col", [True, False])
@pytest.mark.parametrize("n,m,d,labels_spec", [(7, 37, 130, None), (130, 37, 7, "repeat")])
def test_lse_stats_float64(backend, n, m, d, labels_spec, compute_col):
    q, k = make_features(n, m, d, seed=5)
    labels = _labels(labels_spec, n, m)
    ups = [torch.randn(n, dtype=torch.float64), torch.randn(m, dtype=torch.float64),
           torch.randn(n, dtype=torch.float64)]
    qs, ks, ss = leaf(q), leaf(k), leaf(torch.tensor(12.0, dtype=torch.float64))
    row, col, pos = ck.lse_stats(qs, ks, ss, labels, compute_col=compute_col, backend=backend)
    qr, kr, sr = leaf(q), leaf(k), leaf(torch.tensor(12.0, dtype=torch.float64))
    grow, gcol, gpos = reference.lse_stats(qr, kr, sr, labels)
    assert_close_f64(row, grow, "row_lse")
    assert_close_f64(pos, gpos, "pos")
    total = (row * ups[0]).sum() + (pos * ups[2]).sum()
    total_ref = (grow * ups[0]).sum() + (gpos * ups[2]).sum()
    if compute_col:
        assert_close_f64(col, gcol, "col_lse")
        total, total_ref = total + (col * ups[1]).sum(), total_ref + (gcol * ups[1]).sum()
    else:
        assert col.shape == (0,)
    for name, o, g in zip(("query", "keys", "scale"), torch.autograd.grad(total, (qs, ks, ss)),
                          torch.autograd.grad(total_ref, (qr, kr, sr))):
        assert_close_f64(o, g, f"grad {name}")


def test_noncontiguous_inputs_float64(backend):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(37, 130, generator=g, dtype=torch.float64).T  # (130, 37), transposed view
    k = torch.randn(257, 74, generator=g, dtype=torch.float64)[:, ::2]  # (257, 37), strided
    scale = 5.0
    for kind in ("info", "clip"):
        kk = k[:130] if kind == "clip" else k
        gt_out, gt_grads = _evaluate(kind, leaf(q), leaf(kk), leaf(torch.tensor(scale, dtype=torch.float64)))
        qs, ks = q.detach().requires_grad_(), kk.detach().requires_grad_()
        assert not qs.is_contiguous() and not ks.is_contiguous()
        out, grads = _evaluate(kind, qs, ks, leaf(torch.tensor(scale, dtype=torch.float64)), backend=backend)
        assert_close_f64(out[0], gt_out[0], f"{kind} loss")
        for o, gg in zip(grads, gt_grads):
            assert_close_f64(o, gg, f"{kind} grad")


def test_python_float_scale_matches_tensor(backend):
    q, k = make_features(7, 37, 7)
    a = ck.info_nce(q, k, 14.0, backend=backend)
    b = ck.info_nce(q, k, torch.tensor(14.0, dtype=torch.float64), backend=backend)
    c = ck.info_nce(q, k, torch.tensor([14.0], dtype=torch.float32), backend=backend)
    assert_close_f64(a, b)
    assert_close_f64(c, b, rtol=1e-7)  # float32 scale 14.0 is exact; float64 math after the cast


def test_logit_bias_cancels(backend):
    q, k = make_features(37, 37, 7)
    bias = torch.tensor(-10.0, requires_grad=True)
    qs = leaf(q)
    loss_b = ck.clip_loss(qs, k, 10.0, bias, backend=backend)
    loss = ck.clip_loss(q, k, 10.0, backend=backend)
    assert_close_f64(loss_b, loss)
    gq, gb = torch.autograd.grad(loss_b, (qs, bias))
    assert gb is not None and float(gb) == 0.0


# ---------------------------------------------------------------------------------------------
# low precision: the relative rule (tests/helpers.py, after the project's shared/docs/design.md) against reference.py in the same dtype
# ---------------------------------------------------------------------------------------------

LOWP_CASES = [
    ("info", 130, 257, 37, None),
    ("info", 37, 7, 257, "repeat"),
    ("clip", 130, 130, 7, None),
    ("gamma", 257, 130, 37, "repeat"),
]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind,n,m,d,labels_spec", LOWP_CASES)
def test_low_precision_relative_rule(lowp_backend, kind, n, m, d, labels_spec, dtype, reduction):
    scale_value = 14.0  # exact in every dtype
    q64, k64 = make_features(n, m, d, dtype=dtype, seed=n + 7 * m + d)  # already rounded to dtype
    labels = _labels(labels_spec, n, m)
    log_u64 = _log_u(q64, k64, scale_value, labels) if kind == "gamma" else None
    if log_u64 is not None:
        log_u64 = log_u64.to(dtype).double()
    upstream = torch.randn(n, dtype=torch.float64).to(dtype).double()
    kw = dict(labels=labels, reduction=reduction)

    gt_out, gt_grads = _evaluate(kind, leaf(q64), leaf(k64), leaf(torch.tensor(scale_value, dtype=torch.float64)),
                                 log_u=log_u64, upstream=upstream, **kw)
    ref_out, ref_grads = _evaluate(kind, leaf(q64, dtype), leaf(k64, dtype),
                                   leaf(torch.tensor(scale_value, dtype=dtype)),
                                   log_u=None if log_u64 is None else log_u64.to(dtype),
                                   upstream=upstream.to(dtype), **kw)
    out, grads = _evaluate(kind, leaf(q64, dtype), leaf(k64, dtype),
                           leaf(torch.tensor(scale_value, dtype=torch.float32)),
                           log_u=None if log_u64 is None else log_u64.to(dtype),
                           upstream=upstream.to(torch.float32), backend=lowp_backend, **kw)
    assert out[0].dtype == torch.float32
    assert grads[0].dtype == dtype and grads[1].dtype == dtype and grads[2].dtype == torch.float32
    names = ["loss", "log_z"]
    for name, o, r, g in zip(names, out, ref_out, gt_out):
        assert_relative_rule(o, r, g, dtype, f"{kind} {name}")
    for name, o, r, g in zip(("grad_query", "grad_keys", "grad_scale"), grads, ref_grads, gt_grads):
        assert_relative_rule(o, r, g, dtype, f"{kind} {name}")


# ---------------------------------------------------------------------------------------------
# gradcheck on the float64 fused paths, through the public functions
# ---------------------------------------------------------------------------------------------

def _gc_inputs(n, m, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(m, d, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    return q, k, s


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_info_nce(fused_backend, reduction):
    q, k, s = _gc_inputs(6, 4, 3)
    labels = torch.tensor([0, 3, 3, 1, 2, 0])
    assert torch.autograd.gradcheck(
        lambda q, k, s: ck.info_nce(q, k, s, labels, reduction=reduction, backend=fused_backend),
        (q, k, s))
    q, k, s = _gc_inputs(3, 5, 4, seed=1)
    assert torch.autograd.gradcheck(
        lambda q, k, s: ck.info_nce(q, k, s, reduction=reduction, backend=fused_backend), (q, k, s))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_clip_loss(fused_backend, reduction):
    q, k, s = _gc_inputs(5, 5, 3)
    assert torch.autograd.gradcheck(
        lambda q, k, s: ck.clip_loss(q, k, s, reduction=reduction, backend=fused_backend), (q, k, s))


def test_gradcheck_gamma(fused_backend):
    q, k, s = _gc_inputs(5, 6, 3)
    log_u = torch.randn(5, dtype=torch.float64) - 1.0
    labels = torch.tensor([5, 0, 0, 2, 1])
    assert torch.autograd.gradcheck(
        lambda q, k, s: ck.gamma_contrastive_loss(q, k, s, log_u, labels, reduction="sum",
                                                  backend=fused_backend)[0], (q, k, s))


# ---------------------------------------------------------------------------------------------
# numerics: scale 100 with unnormalised inputs, large-magnitude logits
# ---------------------------------------------------------------------------------------------

def test_scale_100_unnormalised_float64(backend):
    q, k = make_features(37, 130, 37, norm=10.0, seed=11)  # |S| up to 1e4
    for kind in ("info", "clip"):
        kk = k[:37] if kind == "clip" else k
        gt_out, gt_grads = _evaluate(kind, leaf(q), leaf(kk), leaf(torch.tensor(100.0, dtype=torch.float64)))
        out, grads = _evaluate(kind, leaf(q), leaf(kk), leaf(torch.tensor(100.0, dtype=torch.float64)),
                               backend=backend)
        assert math.isfinite(float(out[0]))
        assert_close_f64(out[0], gt_out[0], f"{kind} loss")
        for name, o, g in zip(("q", "k", "s"), grads, gt_grads):
            assert bool(torch.isfinite(o).all())
            assert_close_f64(o, g, f"{kind} grad {name}")


def test_scale_100_unnormalised_float32(backend):
    q64, k64 = make_features(37, 130, 37, norm=10.0, dtype=torch.float32, seed=12)
    sc = 100.0
    gt_out, gt_grads = _evaluate("info", leaf(q64), leaf(k64), leaf(torch.tensor(sc, dtype=torch.float64)))
    ref_out, ref_grads = _evaluate("info", leaf(q64, torch.float32), leaf(k64, torch.float32),
                                   leaf(torch.tensor(sc)))
    out, grads = _evaluate("info", leaf(q64, torch.float32), leaf(k64, torch.float32),
                           leaf(torch.tensor(sc)), backend=backend)
    assert_relative_rule(out[0], ref_out[0], gt_out[0], torch.float32, "loss")
    for o, r, g in zip(grads, ref_grads, gt_grads):
        assert_relative_rule(o, r, g, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_logits_do_not_overflow(backend, dtype):
    # |S| up to 100·30·30 = 9e4: exp overflows float32 beyond 88 and float16 itself stops at 65504,
    # so only a shifted (online-max) evaluation in float32 statistics stays finite.
    q64, k64 = make_features(37, 37, 7, norm=30.0, dtype=dtype, seed=13)
    sc = torch.tensor(100.0, dtype=torch.float64)
    gt_out, gt_grads = _evaluate("clip", leaf(q64), leaf(k64), leaf(sc))
    out, grads = _evaluate("clip", leaf(q64, dtype), leaf(k64, dtype), leaf(sc.float()),
                           backend=backend)
    assert math.isfinite(float(out[0])), out
    for g in grads:
        assert bool(torch.isfinite(g).all())
    # Logits of ~9e4 carry a float32 rounding of ~4e-3 each (ulp(9e4) = 2^-7 = 7.8e-3), so the
    # loss (~1e4) is compared at 1e-6 relative and the softmax-weighted gradients at 2 % of their
    # largest entry (a 4e-3 logit error moves a weight by ~0.4 %; 16-bit outputs round at 0.05 %).
    torch.testing.assert_close(out[0].double(), gt_out[0], rtol=1e-6, atol=1e-3)
    for o, g in zip(grads, gt_grads):
        torch.testing.assert_close(o.double(), g, rtol=0, atol=2e-2 * float(g.abs().max()))


# ---------------------------------------------------------------------------------------------
# one checker for every loss: value and every gradient against the dense float64 oracle
# ---------------------------------------------------------------------------------------------

def conform(ours, ref, features, scalars, dtype, backend, upstream=None):
    """``ours(*features, *scalars, backend=...)`` against ``ref(*features, *scalars)``.

    float64: ≤ 1e-10 relative to the oracle. 16/32-bit: the relative rule, with the oracle run in
    the input dtype as the same-dtype yardstick (scalars — logit_scale, logit_bias — in float32 for
    the backend, in the input dtype for the yardstick, in float64 for the truth). Returns the
    backend's output.
    """
    feats64 = [f.double() for f in features]
    sc64 = [torch.tensor(float(v), dtype=torch.float64) for v in scalars]

    def evaluate(fn, fdt, sdt, **kw):
        ins = [leaf(f, fdt) for f in feats64] + [leaf(v, sdt) for v in sc64]
        out = fn(*ins, **kw)
        grads = grads_of(out, ins, upstream)
        return out.detach(), grads

    gt, gt_grads = evaluate(ref, torch.float64, torch.float64)
    if dtype == torch.float64:
        out, grads = evaluate(ours, torch.float64, torch.float64, backend=backend)
        assert out.dtype == torch.float64
        assert_close_f64(out, gt, "loss")
        for i, (o, g) in enumerate(zip(grads, gt_grads)):
            assert o is not None, f"input {i}: no gradient"
            assert_close_f64(o, g, f"grad of input {i}")
        return out
    same, same_grads = evaluate(ref, dtype, dtype)
    out, grads = evaluate(ours, dtype, torch.float32, backend=backend)
    assert out.dtype == torch.float32
    assert_relative_rule(out, same, gt, dtype, "loss")
    for i, (o, r, g) in enumerate(zip(grads, same_grads, gt_grads)):
        assert o is not None, f"input {i}: no gradient"
        assert_relative_rule(o, r, g, dtype, f"grad of input {i}")
    return out


def _views(n, d, dtype=torch.float64, seed=0):
    a, b = make_features(n, n, d, dtype=dtype, seed=seed)
    return a, (b + 0.5 * a) / (b + 0.5 * a).norm(dim=1, keepdim=True)


def _class_labels(n, classes, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, classes, (n,), generator=g)


# ---------------------------------------------------------------------------------------------
# triton through the public front doors and the registered ops (interpreter on CPU)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_through_the_public_api(dtype):
    require_backend("triton")
    q, k = make_features(37, 70, 20, dtype=dtype, seed=41)
    labels = make_labels(37, 70)
    conform(lambda q, k, s, backend: ck.clip_loss(q, k[:37], s, backend=backend),
            lambda q, k, s: reference.clip_loss(q, k[:37], s), (q, k), (12.0,), dtype, "triton")
    conform(lambda q, k, s, backend: ck.info_nce(q, k, s, labels, backend=backend),
            lambda q, k, s: reference.info_nce(q, k, s, labels), (q, k), (12.0,), dtype, "triton")
    ups = [torch.randn(n, dtype=torch.float64) for n in (37, 70, 37)]

    def stats(fn):
        def total(q, k, s, **kw):
            row, col, pos = fn(q, k, s, labels, **kw)[:3]
            u = [x.to(row.dtype) for x in ups]
            return (row * u[0]).sum() + (col * u[1]).sum() + (pos * u[2]).sum()
        return total
    conform(stats(lambda q, k, s, lab, backend: ck.lse_stats(q, k, s, lab, backend=backend)),
            stats(reference.lse_stats), (q, k), (12.0,), dtype, "triton")


def test_triton_opcheck():
    require_backend("triton")
    q, k = (t.float().requires_grad_() for t in make_features(9, 13, 5, seed=42))
    s = torch.tensor(3.0, requires_grad=True)
    b = torch.tensor(-2.0, requires_grad=True)
    labels = make_labels(9, 13)
    cls_q, cls_k = _class_labels(9, 3), _class_labels(13, 3, seed=6)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for args in ((q, k, s, labels, None, None, False, True, "triton"),
                 (q, k, s, None, cls_q, cls_k, True, False, "triton")):
        torch.library.opcheck(torch.ops.contrastive_kernels.lse_fwd.default, args, test_utils=utils)
    for args in ((q, k, s, b, None, None, True, "triton"), (q, k, s, b, cls_q, cls_k, False, "triton")):
        torch.library.opcheck(torch.ops.contrastive_kernels.sigmoid_fwd.default, args,
                              test_utils=utils)


# ---------------------------------------------------------------------------------------------
# lse_stats with the self pair excluded and class positives
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["exclude", "classes", "exclude+classes", "exclude+labels"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (7, 7, 37), (37, 130, 7), (130, 37, 1)])
def test_lse_stats_exclusion_and_classes_float64(backend, n, m, d, variant):
    if backend == "cuda":
        pytest.skip("the cuda backend implements the plain op only")
    q, k = make_features(n, m, d, seed=n + m + d)
    exclude = "exclude" in variant
    kw = dict(exclude_self=exclude)
    labels = make_labels(n, m) if "labels" in variant or m < n else None
    if "classes" in variant:
        kw.update(query_classes=_class_labels(n, 3), key_classes=_class_labels(m, 3, seed=7))
        labels = None
    ups = [torch.randn(x, dtype=torch.float64) for x in (n, m, n)]

    def total(fn):
        def f(q, k, s, **bk):
            out = fn(q, k, s, labels, **kw, **bk)
            row, col, pos = out[:3]
            t = (torch.where(torch.isfinite(row), row, 0.0) * ups[0]).sum()
            t = t + (torch.where(torch.isfinite(col), col, 0.0) * ups[1]).sum() + (pos * ups[2]).sum()
            return t
        return f
    conform(total(lambda *a, backend, **k_: ck.lse_stats(*a, backend=backend, **k_)),
            total(reference.lse_stats), (q, k), (9.0,), torch.float64, backend)
    if "classes" in variant:
        count = ck.lse_stats(q, k, 9.0, **kw, backend=backend)[3]
        assert torch.equal(count, reference.lse_stats(q, k, 9.0, **kw)[3])


# ---------------------------------------------------------------------------------------------
# NT-Xent, SupCon, SigLIP against the oracle (every backend)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("n,d", [(1, 7), (7, 37), (37, 130), (130, 1)])
def test_nt_xent_float64(backend, n, d, reduction):
    a, b = _views(n, d, seed=n + d)
    up = torch.randn(2 * n, dtype=torch.float64) if reduction == "none" else None
    conform(lambda a, b, s, backend: ck.nt_xent_loss(a, b, s, reduction=reduction, backend=backend),
            lambda a, b, s: reference.nt_xent_loss(a, b, s, reduction), (a, b), (1 / 0.07,),
            torch.float64, backend, upstream=up)


@pytest.mark.parametrize("classes", [1, 2, 5, "n"])
@pytest.mark.parametrize("n,d", [(1, 7), (7, 37), (37, 130), (130, 7)])
def test_supcon_float64(backend, n, d, classes):
    feats, _ = make_features(n, 1, d, seed=n * 3 + d)
    labels = _class_labels(n, n if classes == "n" else classes)
    conform(lambda f, s, backend: ck.supcon_loss(f, labels, s, backend=backend),
            lambda f, s: reference.supcon_loss(f, labels, s), (feats,), (10.0,), torch.float64,
            backend)


@pytest.mark.parametrize("n,m,d", [(7, 37, 13), (37, 7, 37), (1, 5, 3)])
def test_supcon_with_reference_set_float64(backend, n, m, d):
    feats, ref = make_features(n, m, d, seed=n + m)
    labels, ref_labels = _class_labels(n, 3), _class_labels(m, 3, seed=9)
    conform(lambda f, r, s, backend: ck.supcon_loss(f, labels, s, ref_features=r,
                                                    ref_labels=ref_labels, backend=backend),
            lambda f, r, s: reference.supcon_loss(f, labels, s, r, ref_labels), (feats, ref),
            (10.0,), torch.float64, backend)


@pytest.mark.parametrize("labels", [False, True], ids=["diagonal", "labels"])
@pytest.mark.parametrize("n,d,scale,bias", [(1, 3, 10.0, -10.0), (7, 130, 100.0, -12.5),
                                            (37, 37, 10.0, 0.0), (257, 7, 30.0, -5.0)])
def test_siglip_float64(backend, n, d, scale, bias, labels):
    img, txt = make_features(n, n, d, seed=n + d)
    lab = _class_labels(n, max(1, n // 3)) if labels else None
    conform(lambda i, t, s, b, backend: ck.siglip_loss(i, t, s, b, labels=lab, backend=backend),
            lambda i, t, s, b: reference.siglip_loss(i, t, s, b, lab), (img, txt), (scale, bias),
            torch.float64, backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "siglip"])
def test_second_wave_low_precision(lowp_backend, loss, dtype):
    if loss == "nt_xent":
        a, b = _views(37, 20, dtype=dtype, seed=3)
        conform(lambda a, b, s, backend: ck.nt_xent_loss(a, b, s, backend=backend),
                reference.nt_xent_loss, (a, b), (10.0,), dtype, lowp_backend)
    elif loss == "supcon":
        f, _ = make_features(70, 1, 20, dtype=dtype, seed=4)
        lab = _class_labels(70, 7)
        conform(lambda f, s, backend: ck.supcon_loss(f, lab, s, backend=backend),
                lambda f, s: reference.supcon_loss(f, lab, s), (f,), (10.0,), dtype, lowp_backend)
    else:
        i, t = make_features(37, 37, 20, dtype=dtype, seed=5)
        conform(lambda i, t, s, b, backend: ck.siglip_loss(i, t, s, b, backend=backend),
                reference.siglip_loss, (i, t), (10.0, -5.0), dtype, lowp_backend)


# ---------------------------------------------------------------------------------------------
# rounding, scale 100, degenerate batches
# ---------------------------------------------------------------------------------------------

def test_per_row_cross_entropy_is_never_negative(lowp_backend):
    # The positive is the same rounded logit as the tile element that entered the LSE, so
    # r_i - S_{i,l_i} >= 0 exactly, even at scale 100 in float32, and exactly 0 for N = 1.
    q, k = make_features(37, 130, 37, norm=3.0, dtype=torch.float32, seed=12)
    per = ck.info_nce(q.float(), k.float(), 100.0, reduction="none", backend=lowp_backend)
    assert bool((per >= 0).all()), float(per.min())
    one = ck.clip_loss(q[:1].float(), k[:1].float(), 100.0, reduction="none", backend=lowp_backend)
    assert float(one) == 0.0
    a, b = _views(37, 37, dtype=torch.float32)
    nt = ck.nt_xent_loss(a.float(), b.float(), 100.0, reduction="none", backend=lowp_backend)
    assert bool((nt >= 0).all()), float(nt.min())


@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "siglip"])
def test_finite_at_scale_100_unnormalised_float32(lowp_backend, loss):
    g = torch.Generator().manual_seed(13)
    x = (3 * torch.randn(37, 20, generator=g)).requires_grad_()
    y = (3 * torch.randn(37, 20, generator=g)).requires_grad_()
    s = torch.tensor(100.0, requires_grad=True)
    if loss == "nt_xent":
        out = ck.nt_xent_loss(x, y, s, backend=lowp_backend)
    elif loss == "supcon":
        out = ck.supcon_loss(x, _class_labels(37, 4), s, backend=lowp_backend)
    else:
        out = ck.siglip_loss(x, y, s, -12.5, backend=lowp_backend)
    out.backward()
    assert math.isfinite(float(out.detach()))
    for t in (x, y, s):
        if t.grad is not None:
            assert bool(torch.isfinite(t.grad).all())


@pytest.mark.parametrize("labels", ["all-distinct", "one-class", "single-row"])
def test_supcon_without_positive_or_negative_pairs_is_zero_with_zero_gradient(backend, labels):
    n = 1 if labels == "single-row" else 9
    f = torch.nn.functional.normalize(torch.randn(n, 5, dtype=torch.float64), dim=1).requires_grad_()
    lab = torch.arange(n) if labels == "all-distinct" else torch.zeros(n, dtype=torch.int64)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    loss = ck.supcon_loss(f, lab, s, backend=backend)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.equal(f.grad, torch.zeros_like(f)) and float(s.grad) == 0.0
    per = ck.supcon_loss(f.detach(), lab, 10.0, reduction="none", backend=backend)
    assert torch.equal(per, torch.zeros(n, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# every loss and module, every reduction, a non-uniform upstream gradient
# ---------------------------------------------------------------------------------------------

# name -> (ours(features..., scalars..., backend=, reduction=), oracle(..., reduction=), builder)
# The builder returns (features, scalars, rows of the "none" output). Ragged sizes, odd D.
def _reduction_case(name):
    n, m, d = 7, 37, 13
    if name in ("info_nce", "InfoNCELoss"):
        q, k = make_features(n, m, d, seed=21)
        lab = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2))
        if name == "info_nce":
            ours = lambda q, k, s, backend, reduction: ck.info_nce(q, k, s, lab, reduction=reduction,
                                                                    backend=backend)
        else:
            ours = lambda q, k, s, backend, reduction: ck.InfoNCELoss(
                reduction=reduction, backend=backend)(q, k, s, lab)
        ref = lambda q, k, s, reduction: reference.info_nce(q, k, s, lab, reduction)
        return ours, ref, (q, k), (14.0,), n
    if name == "clip":
        a, b = make_features(n, n, d, seed=22)
        return (lambda a, b, s, backend, reduction: ck.clip_loss(a, b, s, reduction=reduction,
                                                                 backend=backend),
                lambda a, b, s, reduction: reference.clip_loss(a, b, s, reduction=reduction),
                (a, b), (1 / 0.07,), n)
    if name in ("clip_bias", "ClipLoss"):
        # a bias cancels in the CLIP loss: its gradient is checked to be 0 (to 1e-13)
        a, b = make_features(n + 2, n + 2, d + 4, seed=27)
        if name == "clip_bias":
            ours = lambda a, b, s, bias, backend, reduction: ck.clip_loss(
                a, b, s, bias, reduction=reduction, backend=backend)
        else:
            ours = lambda a, b, s, bias, backend, reduction: ck.ClipLoss(backend=backend)(a, b, s, bias)
        return (ours, lambda a, b, s, bias, reduction: reference.clip_loss(a, b, s, bias, reduction),
                (a, b), (1 / 0.07, -3.0), n + 2)
    if name == "SigLipLoss":
        i, t = make_features(n + 4, n + 4, d + 20, seed=28)
        return (lambda i, t, s, b, backend, reduction: ck.SigLipLoss(backend=backend)(i, t, s, b),
                lambda i, t, s, b, reduction: reference.siglip_loss(i, t, s, b, None, reduction),
                (i, t), (10.0, -5.0), n + 4)
    if name in ("nt_xent", "NTXentLoss"):
        a, b = _views(n, d, seed=23)
        if name == "nt_xent":
            ours = lambda a, b, s, backend, reduction: ck.nt_xent_loss(a, b, s, reduction=reduction,
                                                                       backend=backend)
        else:
            ours = lambda a, b, s, backend, reduction: ck.NTXentLoss(
                reduction=reduction, backend=backend)(a, b, s)
        return ours, lambda a, b, s, reduction: reference.nt_xent_loss(a, b, s, reduction), \
            (a, b), (10.0,), 2 * n
    if name in ("supcon", "SupConLoss"):
        f, _ = make_features(2 * n + 1, 1, d, seed=24)
        lab = _class_labels(2 * n + 1, 4)
        if name == "supcon":
            ours = lambda f, s, backend, reduction: ck.supcon_loss(f, lab, s, reduction=reduction,
                                                                   backend=backend)
        else:
            ours = lambda f, s, backend, reduction: ck.SupConLoss(
                reduction=reduction, backend=backend)(f, lab, s)
        return ours, lambda f, s, reduction: reference.supcon_loss(f, lab, s, reduction=reduction), \
            (f,), (10.0,), 2 * n + 1
    if name == "supcon_ref":
        f, r = make_features(n, m, d, seed=25)
        lab, rlab = _class_labels(n, 3), _class_labels(m, 3, seed=9)
        return (lambda f, r, s, backend, reduction: ck.supcon_loss(
                    f, lab, s, ref_features=r, ref_labels=rlab, reduction=reduction, backend=backend),
                lambda f, r, s, reduction: reference.supcon_loss(f, lab, s, r, rlab, reduction),
                (f, r), (10.0,), n)
    if name in ("siglip", "siglip_labels"):
        i, t = make_features(n + 6, n + 6, d, seed=26)
        lab = _class_labels(n + 6, 4) if name == "siglip_labels" else None
        return (lambda i, t, s, b, backend, reduction: ck.siglip_loss(
                    i, t, s, b, labels=lab, reduction=reduction, backend=backend),
                lambda i, t, s, b, reduction: reference.siglip_loss(i, t, s, b, lab, reduction),
                (i, t), (10.0, -5.0), n + 6)
    raise AssertionError(name)


REDUCTION_LOSSES = ["info_nce", "InfoNCELoss", "clip", "clip_bias", "nt_xent", "NTXentLoss",
                    "supcon", "SupConLoss", "supcon_ref", "siglip", "siglip_labels"]
# open_clip's twins have no reduction argument: their one mode is the mean
REDUCTION_CASES = ([(name, r) for name in REDUCTION_LOSSES for r in REDUCTIONS]
                   + [("ClipLoss", "mean"), ("SigLipLoss", "mean")])


def _upstream(reduction, rows):
    # not all ones: a loss off by a constant factor in one mode, or a gradient that ignores the
    # upstream weights, must show
    g = torch.Generator().manual_seed(rows)
    if reduction == "none":
        return torch.rand(rows, generator=g, dtype=torch.float64) * 2 - 0.5
    return torch.tensor(0.7371, dtype=torch.float64)


def _check_reduction(name, reduction, dtype, backend):
    ours, ref, feats, scalars, rows = _reduction_case(name)
    conform(lambda *a, backend: ours(*a, backend=backend, reduction=reduction),
            lambda *a: ref(*a, reduction=reduction), feats, scalars, dtype, backend,
            upstream=_upstream(reduction, rows))


@pytest.mark.parametrize("name,reduction", REDUCTION_CASES)
def test_every_loss_and_reduction_float64(backend, name, reduction):
    _check_reduction(name, reduction, torch.float64, backend)


def _require_interpreted_triton():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors: triton runs them only under its interpreter")
    require_backend("triton")


@pytest.mark.parametrize("name,reduction", REDUCTION_CASES)
def test_every_loss_and_reduction_triton(name, reduction):
    _require_interpreted_triton()
    _check_reduction(name, reduction, torch.float32, "triton")


LSE_VARIANTS = ["plain", "no-col", "labels", "exclude", "classes", "exclude+classes"]


def _lse_stats_objective(variant, n, m):
    """(lse_stats keyword arguments, objective(fn) → Σ w·row + Σ w·col + Σ w·pos) with random
    weights per statistic, so every output and its gradient is seen with its own weight."""
    g = torch.Generator().manual_seed(31)
    ups = [torch.rand(x, generator=g, dtype=torch.float64) * 2 - 0.5 for x in (n, m, n)]
    kw = dict(exclude_self="exclude" in variant)
    if "classes" in variant:
        kw.update(query_classes=_class_labels(n, 3), key_classes=_class_labels(m, 3, seed=7))
    elif variant == "labels":
        kw.update(labels=make_labels(n, m))
    col_too = variant != "no-col"

    def objective(fn):
        def total(q, k, s, **bk):
            row, col, pos = fn(q, k, s, **kw, **bk)[:3]
            u = [x.to(row.dtype) for x in ups]
            t = (row * u[0]).sum() + (pos * u[2]).sum()
            return t + (col * u[1]).sum() if col_too else t
        return total
    return kw, col_too, objective


@pytest.mark.parametrize("variant", LSE_VARIANTS)
def test_lse_stats_every_output_triton(variant):
    _require_interpreted_triton()
    q, k = make_features(7, 37, 13, seed=29)
    kw, col_too, objective = _lse_stats_objective(variant, 7, 37)
    conform(objective(lambda *a, backend, **k_: ck.lse_stats(*a, compute_col=col_too,
                                                             backend=backend, **k_)),
            objective(reference.lse_stats), (q, k), (9.0,), torch.float32, "triton")
    if "classes" in variant:
        count = ck.lse_stats(q.float(), k.float(), 9.0, **kw, backend="triton")[3]
        assert torch.equal(count.double(), reference.lse_stats(q, k, 9.0, **kw)[3])
