import math

import pytest
import torch

import contrastive_kernels as ck
from helpers import (assert_close_f64, assert_relative_rule, grads_of, leaf, make_features,
                     make_labels, reference)

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
# low precision: the relative rule of design.md against reference.py in the same dtype
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
def test_low_precision_relative_rule(fused_backend, kind, n, m, d, labels_spec, dtype, reduction):
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
                           upstream=upstream.to(torch.float32), backend=fused_backend, **kw)
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
