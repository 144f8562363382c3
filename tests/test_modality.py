import math
import time

import pytest
import torch

from contrastive_kernels import modality as M
from contrastive_kernels import reference

BACKEND = "chunked"
F64 = torch.float64


def _unit(n, d, gen, dtype=F64):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1)


def _leaves(*xs):
    return [x.detach().clone().requires_grad_(True) for x in xs]


def _rel(a, b, floor=1e-6):
    # Relative error, with the scale floored at 1e-6: some cases are exactly 0 in exact arithmetic
    # (N = 1 unit vectors: L_GC = (1 − 1)²), where rounding leaves ~1e-17.
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(floor))


def _check_value_and_grads(fn, ref, inputs, tol=1e-9, floor=1e-6):
    xs, ys = _leaves(*inputs), _leaves(*inputs)
    out, want = fn(*xs), ref(*ys)
    assert _rel(out, want, floor) <= tol, (float(out), float(want))
    gx = torch.autograd.grad(out, xs, allow_unused=True)
    gy = torch.autograd.grad(want, ys, allow_unused=True)
    for a, b in zip(gx, gy):
        assert (a is None) == (b is None)
        if b is not None:
            assert _rel(a, b) <= tol


# ---- dense float64 references, written from docs/math.md §4 -------------------------------------

def ref_gc(v, t):
    n = v.shape[0]
    total = v.new_zeros(())
    for j in range(n):
        a = (v[j] @ t.T - v @ t[j]) ** 2
        b = (v[j] @ v.T - t[j] @ t.T) ** 2
        total = total + a.sum() + b.sum()
    return total / n


def ref_gc_aug(v, t, va, ta):
    n = v.shape[0]
    sv = ((v @ v.T - va @ va.T) ** 2).sum()
    st = ((t @ t.T - ta @ ta.T) ** 2).sum()
    diag = ((v * t).sum(1) - (va * ta).sum(1)) ** 2
    return ref_gc(v, t) + (sv + st) / n + diag.sum() / n


def ref_bridge(v, t, va, tt):
    tt = torch.as_tensor(tt, dtype=v.dtype)
    tt = tt[:, None] if tt.dim() == 1 else tt
    mu = tt * v + (1 - tt) * t
    mu = mu / mu.norm(dim=1, keepdim=True)
    return ((va - mu) ** 2).sum(1).mean()


def ref_info_nce(q, k, s):
    return reference.info_nce(q, k, s)


def ref_uniformity(z):
    return torch.log(torch.exp(4 * z @ z.T - 4).mean())


def ref_uniformity_distance(z):
    d2 = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return torch.log(torch.exp(-2 * d2).mean())


def ref_separation(v, t, vi, ti, via, tia, s):
    ortho = (((v * vi).sum(1)) ** 2 + ((t * ti).sum(1)) ** 2).mean()
    con = ref_info_nce(vi, via, s) + ref_info_nce(ti, tia, s)
    uni = ref_uniformity(vi) + ref_uniformity(ti)
    return ortho + con + uni


def ref_con(v, t, va, ta, s):
    # v2t + t2v = 2·CLIP
    return 0.25 * (2 * reference.clip_loss(v, t, s) + ref_info_nce(v, va, s) + ref_info_nce(t, ta, s))


SHAPES = [(1, 3), (1, 17), (7, 3), (7, 17), (37, 3), (37, 17)]


# ---- geometric consistency -----------------------------------------------------------------

@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("normalised", [True, False])
def test_gc_matches_dense(n, d, normalised):
    g = torch.Generator().manual_seed(n * 100 + d)
    mk = (lambda: _unit(n, d, g)) if normalised else (lambda: torch.randn(n, d, generator=g, dtype=F64))
    v, t = mk(), mk()
    _check_value_and_grads(M.geometric_consistency_loss, ref_gc, [v, t])


@pytest.mark.parametrize("n,d", SHAPES)
def test_gc_aug_matches_dense(n, d):
    g = torch.Generator().manual_seed(7 * n + d)
    xs = [_unit(n, d, g) for _ in range(4)]
    _check_value_and_grads(M.geometric_consistency_loss, ref_gc_aug, xs)


def test_gc_gradients_for_a_subset_of_inputs():
    g = torch.Generator().manual_seed(6)
    v, t, va, ta = (_unit(7, 3, g) for _ in range(4))
    v1, va1 = _leaves(v, va)
    M.geometric_consistency_loss(v1, t, va1, ta).backward()
    v2, va2 = _leaves(v, va)
    ref_gc_aug(v2, t, va2, ta).backward()
    assert _rel(v1.grad, v2.grad) <= 1e-9 and _rel(va1.grad, va2.grad) <= 1e-9


def test_gc_matches_math_md_gram_identities():
    g = torch.Generator().manual_seed(3)
    v, t = _unit(37, 17, g), _unit(37, 17, g)
    gv, gt, c = v.T @ v, t.T @ t, t.T @ v
    first = 2 * (gv * gt).sum() - 2 * torch.trace(c @ c)
    second = (gv ** 2).sum() + (gt ** 2).sum() - 2 * (c ** 2).sum()
    assert _rel(M.geometric_consistency_loss(v, t), (first + second) / 37) <= 1e-12


def test_gc_no_cancellation_when_nearly_aligned():
    # float32 inputs with t = v + 1e-4 noise: the loss is ~1e-8 of the Gram norms, which the
    # ‖G_V‖² + ‖G_T‖² − 2‖C‖² form would lose entirely in float32.
    g = torch.Generator().manual_seed(4)
    v = _unit(512, 17, g)
    t = torch.nn.functional.normalize(v + 1e-4 * torch.randn(512, 17, generator=g, dtype=F64), dim=1)
    want = ref_gc(v, t)
    got = M.geometric_consistency_loss(v.float(), t.float())
    assert got.dtype == torch.float32
    exact32 = ref_gc(v.float().double(), t.float().double())
    assert abs(float(got) - float(exact32)) <= 1e-3 * float(exact32)
    assert float(want) > 0


def test_gc_half_precision_accumulates_in_float32():
    g = torch.Generator().manual_seed(5)
    v, t = _unit(37, 17, g), _unit(37, 17, g)
    for dt in (torch.float16, torch.bfloat16):
        vb, tb = v.to(dt).requires_grad_(), t.to(dt).requires_grad_()
        out = M.geometric_consistency_loss(vb, tb)
        assert out.dtype == torch.float32
        out.backward()
        assert vb.grad.dtype == dt
        want = ref_gc(vb.detach().double(), tb.detach().double())
        assert abs(float(out) - float(want)) <= 1e-4 * float(want)


# ---- Brownian bridge -----------------------------------------------------------------------

@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tt", [0.25, 0.7])
def test_bridge_matches_dense(n, d, tt):
    g = torch.Generator().manual_seed(n + d)
    xs = [_unit(n, d, g) for _ in range(3)]
    _check_value_and_grads(lambda v, t, va: M.brownian_bridge_loss(v, t, va, tt),
                           lambda v, t, va: ref_bridge(v, t, va, tt), xs)


def test_bridge_closed_form_for_unit_vectors():
    g = torch.Generator().manual_seed(11)
    v, t, va = (_unit(37, 17, g) for _ in range(3))
    tt = 0.25
    num = tt * (v * va).sum(1) + (1 - tt) * (t * va).sum(1)
    den = torch.sqrt(tt ** 2 + (1 - tt) ** 2 + 2 * tt * (1 - tt) * (v * t).sum(1))
    assert _rel(M.brownian_bridge_loss(v, t, va, tt), (2 - 2 * num / den).mean()) <= 1e-12


def test_bridge_gradients_reach_all_inputs_and_detach():
    g = torch.Generator().manual_seed(12)
    v, t, va = _leaves(*(_unit(7, 17, g) for _ in range(3)))
    M.brownian_bridge_loss(v, t, va).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (v, t, va))
    v2, t2, va2 = _leaves(v, t, va)
    out = M.brownian_bridge_loss(v2, t2, va2, detach_bridge=True)
    out.backward()
    assert v2.grad is None and t2.grad is None
    mu = ref_bridge(v, t, va, 0.25)  # value check, then the closed-form gradient 2(vᵃ − μ)/N
    assert _rel(out, mu) <= 1e-12
    m = 0.25 * v.detach() + 0.75 * t.detach()
    m = m / m.norm(dim=1, keepdim=True)
    assert _rel(va2.grad, 2 * (va.detach() - m) / 7) <= 1e-12


@pytest.mark.parametrize("n,d", [(1, 3), (7, 17), (37, 3)])
def test_bridge_per_row_t(n, d):
    g = torch.Generator().manual_seed(13 + n)
    v, t, va = (_unit(n, d, g) for _ in range(3))
    tt = torch.rand(n, generator=g, dtype=F64) * 0.98 + 0.01

    def per_row(v, t, va):
        rows = [ref_bridge(v[j:j + 1], t[j:j + 1], va[j:j + 1], float(tt[j])) for j in range(n)]
        return torch.stack(rows).mean()

    _check_value_and_grads(lambda v, t, va: M.brownian_bridge_loss(v, t, va, tt), per_row,
                           [v, t, va])
    tg = tt.clone().requires_grad_()
    tg2 = tt.clone().requires_grad_()
    M.brownian_bridge_loss(v, t, va, tg).backward()
    ref_bridge(v, t, va, tg2).backward()
    assert _rel(tg.grad, tg2.grad) <= 1e-9


def test_bridge_uniform_t_uses_generator():
    g = torch.Generator().manual_seed(14)
    v, t, va = (_unit(37, 17, g) for _ in range(3))
    a = M.brownian_bridge_loss(v, t, va, "uniform", generator=torch.Generator().manual_seed(5))
    b = M.brownian_bridge_loss(v, t, va, "uniform", generator=torch.Generator().manual_seed(5))
    tt = torch.rand(37, generator=torch.Generator().manual_seed(5), dtype=F64)
    assert float(a) == float(b)
    assert _rel(a, ref_bridge(v, t, va, tt)) <= 1e-12


# ---- feature separation --------------------------------------------------------------------

@pytest.mark.parametrize("n,d", SHAPES)
def test_separation_matches_dense(n, d):
    g = torch.Generator().manual_seed(1000 + 10 * n + d)
    xs = [_unit(n, d, g) for _ in range(6)] + [torch.tensor(7.5, dtype=F64)]
    _check_value_and_grads(lambda *a: M.feature_separation_loss(*a, backend=BACKEND),
                           ref_separation, xs)


def test_separation_terms_and_uniformity():
    g = torch.Generator().manual_seed(21)
    v, t, vi, ti, via, tia = (_unit(37, 17, g) for _ in range(6))
    out = M.feature_separation_loss(v, t, vi, ti, via, tia, 10.0, output_dict=True, backend=BACKEND)
    assert _rel(out["orthogonality"], (((v * vi).sum(1)) ** 2 + ((t * ti).sum(1)) ** 2).mean()) <= 1e-12
    assert _rel(out["private_contrastive"],
                ref_info_nce(vi, via, 10.0) + ref_info_nce(ti, tia, 10.0)) <= 1e-12
    assert _rel(out["private_uniformity"], ref_uniformity(vi) + ref_uniformity(ti)) <= 1e-12
    assert _rel(out["separation_loss"],
                out["orthogonality"] + out["private_contrastive"] + out["private_uniformity"]) <= 1e-15
    assert _rel(M.uniformity_loss(vi, backend=BACKEND), ref_uniformity(vi)) <= 1e-12


@pytest.mark.parametrize("n,d", SHAPES)
def test_uniformity_forms(n, d):
    g = torch.Generator().manual_seed(23 + n + d)
    z = _unit(n, d, g)
    assert _rel(M.uniformity_loss(z, backend=BACKEND), ref_uniformity_distance(z)) <= 1e-9
    # N = 1: the value is exactly 0 but −2‖z‖² is formed as 4·z·z − 2‖z‖² − 2‖z‖² (terms ~10),
    # so the error is measured against the O(1) scale of the terms.
    _check_value_and_grads(lambda z: M.uniformity_loss(z, form="distance", backend=BACKEND),
                           ref_uniformity_distance, [0.7 * torch.randn(n, d, generator=g, dtype=F64)],
                           floor=1.0)
    a, b = _leaves(z, z)
    M.uniformity_loss(a, backend=BACKEND).backward()
    ref_uniformity_distance(b).backward()

    def tangential(gr):
        return gr - (gr * z).sum(1, keepdim=True) * z

    assert _rel(tangential(a.grad), tangential(b.grad)) <= 1e-9


def test_uniformity_at_large_scale_is_finite_float32():
    g = torch.Generator().manual_seed(22)
    z = _unit(257, 3, g, torch.float32).requires_grad_()
    out = M.uniformity_loss(z, backend=BACKEND)
    out.backward()
    assert abs(float(out) - float(ref_uniformity(z.detach().double()))) < 1e-5
    assert torch.isfinite(z.grad).all()


# ---- combined module -----------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(1, 3), (7, 17), (37, 17)])
@pytest.mark.parametrize("weights", [dict(), dict(separation=True), dict(bridge=True),
                                     dict(geometric=True),
                                     dict(separation=0.5, bridge=2.0, geometric=0.1)])
def test_module_matches_dense(n, d, weights):
    g = torch.Generator().manual_seed(31 * n + d)
    xs = [_unit(n, d, g) for _ in range(8)] + [torch.tensor(12.0, dtype=F64)]
    loss = M.ModalityStructureLoss(**weights, backend=BACKEND)
    w = {k: (M.DEFAULT_WEIGHTS[k] if v is True else v) for k, v in weights.items()}

    def fn(v, t, va, ta, vi, ti, via, tia, s):
        return loss(v, t, s, va, ta, vi, ti, via, tia)

    def ref(v, t, va, ta, vi, ti, via, tia, s):
        out = ref_con(v, t, va, ta, s)
        if w.get("separation"):
            out = out + w["separation"] * ref_separation(v, t, vi, ti, via, tia, s)
        if w.get("bridge"):
            out = out + w["bridge"] * ref_bridge(v, t, va, 0.25)
        if w.get("geometric"):
            out = out + w["geometric"] * ref_gc_aug(v, t, va, ta)
        return out

    _check_value_and_grads(fn, ref, xs)


def test_module_output_dict_and_defaults():
    g = torch.Generator().manual_seed(41)
    v, t, va, ta, vi, ti, via, tia = (_unit(37, 17, g) for _ in range(8))
    loss = M.ModalityStructureLoss(separation=True, bridge=True, geometric=True, backend=BACKEND)
    assert (loss.separation, loss.bridge, loss.geometric) == (1.0, 1.0, 0.25)
    d = loss(v, t, 10.0, va, ta, vi, ti, via, tia, output_dict=True)
    assert set(d) == {"contrastive_loss", "separation_loss", "bridge_loss", "geometric_loss"}
    total = loss(v, t, 10.0, va, ta, vi, ti, via, tia)
    assert _rel(sum(d.values()), total) <= 1e-15
    assert _rel(d["geometric_loss"], 0.25 * ref_gc_aug(v, t, va, ta)) <= 1e-12
    assert _rel(d["contrastive_loss"], ref_con(v, t, va, ta, 10.0)) <= 1e-12
    plain = M.ModalityStructureLoss(in_modal=False, backend=BACKEND)
    assert _rel(plain(v, t, 10.0), reference.clip_loss(v, t, 10.0)) <= 1e-12
    assert set(plain(v, t, 10.0, output_dict=True)) == {"contrastive_loss"}
    parts = M.modality_contrastive_loss(v, t, va, ta, 10.0, output_dict=True, backend=BACKEND)
    assert _rel(parts["contrastive_loss"], 0.5 * parts["clip"]
                + 0.25 * (parts["image_image"] + parts["text_text"])) <= 1e-15


def test_module_float32_training_step():
    g = torch.Generator().manual_seed(42)
    xs = _leaves(*(_unit(64, 16, g, torch.float32) for _ in range(8)))
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    loss = M.ModalityStructureLoss(True, True, True, backend=BACKEND)
    out = loss(xs[0], xs[1], scale.exp(), *xs[2:])
    assert out.dtype == torch.float32
    out.backward()
    assert all(torch.isfinite(x.grad).all() for x in xs) and torch.isfinite(scale.grad)


# ---- bad inputs ----------------------------------------------------------------------------

def _x(n=5, d=3, dtype=F64):
    return torch.randn(n, d, dtype=dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: M.geometric_consistency_loss(_x(5), _x(6)), ValueError, r"\(5, 3\).*\(6, 3\)"),
    (lambda: M.geometric_consistency_loss(_x(5, 3), _x(5, 4)), ValueError, r"\(5, 3\).*\(5, 4\)"),
    (lambda: M.geometric_consistency_loss(_x()[0], _x()), ValueError, "2-D"),
    (lambda: M.geometric_consistency_loss(_x(0), _x(0)), ValueError, "empty"),
    (lambda: M.geometric_consistency_loss(_x().long(), _x().long()), TypeError, "int64"),
    (lambda: M.geometric_consistency_loss(_x(), _x().float()), TypeError, "dtypes differ"),
    (lambda: M.geometric_consistency_loss(_x(), [[1.0]]), TypeError, "list"),
    (lambda: M.geometric_consistency_loss(_x(), _x(), _x()), ValueError, "text_aug"),
    (lambda: M.geometric_consistency_loss(_x(), _x(), None, _x()), ValueError, "image_aug"),
    (lambda: M.geometric_consistency_loss(_x(), _x(), _x(), _x(4)), ValueError, r"\(4, 3\)"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(4)), ValueError, r"image_aug \(4, 3\)"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), 0.0), ValueError, r"\(0, 1\)"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), 1.0), ValueError, r"\(0, 1\)"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), float("nan")), ValueError, r"\(0, 1\)"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), torch.full((5,), 1.5)), ValueError, "1.5"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), torch.rand(4)), ValueError, r"\(5,\).*\(4,\)"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), torch.ones(5, dtype=torch.long)), TypeError,
     "floating"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), "normal"), ValueError, "uniform"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), True), TypeError, "bool"),
    (lambda: M.brownian_bridge_loss(_x(), _x(), _x(), 0.3, generator=torch.Generator()),
     ValueError, "uniform"),
    (lambda: M.feature_separation_loss(*[_x()] * 5, _x(5, 4), 10.0), ValueError,
     r"private_text_aug \(5, 4\)"),
    (lambda: M.feature_separation_loss(*[_x()] * 6, -1.0), ValueError, "logit_scale"),
    (lambda: M.uniformity_loss(_x(), form="cosine"), ValueError, "form"),
    (lambda: M.ModalityStructureLoss(separation=-1.0), ValueError, "separation"),
    (lambda: M.ModalityStructureLoss(geometric="x"), TypeError, "geometric"),
    (lambda: M.ModalityStructureLoss(bridge_t=1.5), ValueError, "bridge_t"),
    (lambda: M.ModalityStructureLoss()(_x(), _x(), 10.0), ValueError, "image_aug"),
    (lambda: M.ModalityStructureLoss(bridge=1.0, in_modal=False)(_x(), _x(), 10.0), ValueError,
     "image_aug.*bridge"),
    (lambda: M.ModalityStructureLoss(separation=1.0)(_x(), _x(), 10.0, _x(), _x()), ValueError,
     "private_image"),
    (lambda: M.ModalityStructureLoss(geometric=1.0, in_modal=False)(_x(), _x(), 10.0, _x()),
     ValueError, "text_aug"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- experiment smoke run ------------------------------------------------------------------

def test_experiment_quick(tmp_path):
    from contrastive_kernels.experiments import modality as exp
    start, cpu = time.perf_counter(), time.process_time()
    assert exp.main(["--quick", "--out", str(tmp_path), "--backend", BACKEND]) == 0
    # CPU time for the budget (shared CI boxes are oversubscribed); wall time only guards hangs.
    assert time.process_time() - cpu < 20
    assert time.perf_counter() - start < 120
    names = {p.name for p in tmp_path.iterdir()}
    assert {"modality_results.csv", "modality_summary.csv", "modality_results.md",
            "modality_results.png"} <= names


def test_default_backend_float32():
    # backend="auto" (the native CPU kernels when built) in float32 against the float64 reference;
    # 1e-4 is float32 rounding through N = 37 sums.
    g = torch.Generator().manual_seed(51)
    xs = [_unit(37, 17, g) for _ in range(8)] + [torch.tensor(12.0, dtype=F64)]
    loss = M.ModalityStructureLoss(True, True, True)

    def ref(v, t, va, ta, vi, ti, via, tia, s):
        return (ref_con(v, t, va, ta, s) + ref_separation(v, t, vi, ti, via, tia, s)
                + ref_bridge(v, t, va, 0.25) + 0.25 * ref_gc_aug(v, t, va, ta))

    xf = _leaves(*[x.float() for x in xs])
    yd = _leaves(*[x.float().double() for x in xs])
    out, want = loss(xf[0], xf[1], xf[8], *xf[2:8]), ref(*yd)
    assert out.dtype == torch.float32
    assert _rel(out, want) <= 1e-4
    for a, b in zip(torch.autograd.grad(out, xf), torch.autograd.grad(want, yd)):
        assert _rel(a, b) <= 1e-4
