import math

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import reference
from contrastive_kernels.gamma import GammaContrastiveLoss

BACKEND = "chunked"


def _feats(n, d, seed, m=None, dtype=torch.float64, norm=False, grad=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    b = torch.randn(m or n, d, generator=g, dtype=dtype)
    if norm:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.requires_grad_(grad), b.requires_grad_(grad)


def _log_z64(q, k, s):
    S = s * (q.detach().double() @ k.detach().double().T)
    return torch.logsumexp(S, 1) - math.log(k.shape[0]), torch.logsumexp(S, 0) - math.log(q.shape[0])


def _module(n=10, **kw):
    kw.setdefault("backend", BACKEND)
    kw.setdefault("dtype", torch.float64)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return GammaContrastiveLoss(n, **kw)


def test_first_visit_takes_batch_estimate_both_directions():
    m = _module(estimator="ema")
    img, txt = _feats(4, 5, 0)
    idx = torch.tensor([7, 1, 4, 0])
    m(img, txt, idx, 3.0)
    zr, zc = _log_z64(img, txt, 3.0)
    torch.testing.assert_close(m.log_z_row[idx], zr, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.log_z_col[idx], zc, rtol=0, atol=1e-12)
    assert m.visited_row.sum() == 4 and m.visited_row[idx].all() and m.visited_col[idx].all()
    assert torch.all(m.log_z_row[~m.visited_row] == 0)


@pytest.mark.parametrize("gamma", [0.9, 0.1, 1.0])
def test_ema_update_in_log_space(gamma):
    m = _module(estimator="ema", update_weight=gamma)
    idx = torch.tensor([2, 3, 5])
    img1, txt1 = _feats(3, 4, 1)
    img2, txt2 = _feats(3, 4, 2)
    img2 = img2 * 4  # different magnitudes so the two estimates differ a lot
    m(img1, txt1, idx, 2.0)
    m(img2, txt2, idx, 2.0)
    z1r, z1c = _log_z64(img1, txt1, 2.0)
    z2r, z2c = _log_z64(img2, txt2, 2.0)
    exp_r = torch.log((1 - gamma) * torch.exp(z1r) + gamma * torch.exp(z2r))
    exp_c = torch.log((1 - gamma) * torch.exp(z1c) + gamma * torch.exp(z2c))
    torch.testing.assert_close(m.log_z_row[idx], exp_r, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.log_z_col[idx], exp_c, rtol=0, atol=1e-12)
    log_u = m.estimate_log_u(idx, z2r, "row")
    torch.testing.assert_close(log_u, -exp_r, rtol=0, atol=1e-12)


def test_batch_estimator_matches_infonce_gradient():
    m = _module(estimator="batch", symmetric=False)
    img, txt = _feats(6, 8, 3, m=9, grad=True)
    idx = torch.arange(6)
    m(img, txt, idx, 5.0)  # visit once so the state differs from the next batch
    img2, txt2 = _feats(6, 8, 4, m=9, grad=True)
    loss = m(img2, txt2, idx, 5.0)
    g = torch.autograd.grad(loss, (img2, txt2))
    ref = torch.autograd.grad(reference.info_nce(img2, txt2, 5.0), (img2, txt2))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    zr, _ = _log_z64(img2, txt2, 5.0)
    torch.testing.assert_close(m.estimate_log_u(idx, zr), -zr, rtol=0, atol=1e-12)


def test_update_weight_one_makes_ema_equal_batch():
    img, txt = _feats(5, 3, 5, grad=True)
    a = _module(estimator="ema", update_weight=1.0)
    b = _module(estimator="batch", update_weight=1.0)
    idx = torch.arange(5)
    for k in range(3):
        x, y = img * (k + 1), txt
        la, lb = a(x, y, idx, 2.0), b(x, y, idx, 2.0)
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [0.3, 1.0, 4.0])
def test_gamma_draws_have_mean_one_over_zbar(shape):
    m = _module(100, estimator="gamma", shape=shape, symmetric=False)
    idx = torch.tensor([3])
    m.update_state(idx, torch.tensor([2.5], dtype=torch.float64))
    n = 40000
    big = idx.repeat(n)
    log_u = m.estimate_log_u(big, torch.full((n,), 7.0, dtype=torch.float64))
    assert torch.isfinite(log_u).all()
    v = torch.exp(log_u + 2.5)  # u·Z̄ ~ Gamma(a, a): mean 1, variance 1/a
    se = math.sqrt(1.0 / shape / n)
    assert abs(v.mean().item() - 1.0) < 4.5 * se, (v.mean().item(), se)
    assert abs(v.var().item() - 1.0 / shape) < 0.1 / shape


def test_gamma_small_shape_never_underflows():
    m = _module(5, estimator="gamma", shape=0.01, symmetric=False, dtype=torch.float32)
    idx = torch.zeros(20000, dtype=torch.int64)
    log_u = m.e_step(idx, torch.zeros(20000))
    assert torch.isfinite(log_u).all()


def _partition_grads(fn, q, keys, s, chunks, log_u=None):
    gq = torch.zeros_like(q)
    gk = torch.zeros_like(keys)
    for c in range(chunks):
        qq = q.detach().clone().requires_grad_(True)
        kk = keys.detach().clone().requires_grad_(True)
        part = kk.chunk(chunks)[c]
        labels = torch.zeros(q.shape[0], dtype=torch.int64)
        if log_u is None:
            loss = fn(qq, part, s, labels, backend=BACKEND)
        else:
            loss, _ = fn(qq, part, s, log_u, labels, backend=BACKEND)
        a, b = torch.autograd.grad(loss, (qq, kk))
        gq += a / chunks
        gk += b / chunks
    return gq, gk


def test_decomposable_minibatch_gradient_is_unbiased_infonce_is_not():
    # Anchors Q against a data set of M candidates split into K equal minibatches; the positive of
    # every anchor in minibatch k is that minibatch's first candidate. Full-data objective:
    #   F = mean_i [ −(1/K)·Σ_k S_{i, first_k} + log mean_j exp(S_ij) ].
    torch.manual_seed(0)
    n, m, d, chunks, s = 5, 24, 3, 4, 2.0
    q = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    S = s * q @ keys.T
    firsts = torch.arange(0, m, m // chunks)
    full = (-S[:, firsts].mean(1) + torch.logsumexp(S, 1) - math.log(m)).mean()
    ref_q, ref_k = torch.autograd.grad(full, (q, keys))
    with torch.no_grad():
        log_u = -(torch.logsumexp(s * q @ keys.T, 1) - math.log(m))  # u = 1/Z of the full data
    dec_q, dec_k = _partition_grads(ck.gamma_contrastive_loss, q, keys, s, chunks, log_u)
    torch.testing.assert_close(dec_q, ref_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dec_k, ref_k, rtol=1e-10, atol=1e-12)
    nce_q, nce_k = _partition_grads(ck.info_nce, q, keys, s, chunks)
    assert (nce_q - ref_q).abs().max() > 1e-2
    assert (nce_k - ref_k).abs().max() > 1e-2


@pytest.mark.parametrize("symmetric", [True, False])
def test_loss_and_grads_match_reference(symmetric):
    gamma = 0.3
    m = _module(estimator="ema", update_weight=gamma, symmetric=symmetric)
    idx = torch.tensor([9, 0, 4, 6, 2])
    img1, txt1 = _feats(5, 7, 6)
    m(img1, txt1, idx, 4.0)
    img, txt = _feats(5, 7, 7, grad=True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    out = m(img, txt, idx, scale, output_dict=True)
    loss = out["contrastive_loss"]
    grads = torch.autograd.grad(loss, (img, txt, scale))

    z1r, z1c = _log_z64(img1, txt1, 4.0)
    z2r, z2c = _log_z64(img, txt, 4.0)
    ema = lambda a, b: torch.logaddexp(a + math.log(1 - gamma), b + math.log(gamma))  # noqa: E731
    img_r, txt_r = img.detach().requires_grad_(), txt.detach().requires_grad_()
    scale_r = scale.detach().clone().requires_grad_()
    ref, _ = reference.gamma_contrastive_loss(img_r, txt_r, scale_r, -ema(z1r, z2r))
    nce = reference.info_nce(img_r, txt_r, scale_r)
    if symmetric:
        ref_c, _ = reference.gamma_contrastive_loss(txt_r, img_r, scale_r, -ema(z1c, z2c))
        ref = 0.5 * (ref + ref_c)
        nce = reference.clip_loss(img_r, txt_r, scale_r)
    ref_grads = torch.autograd.grad(ref, (img_r, txt_r, scale_r))
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out["info_nce"], nce.detach(), rtol=1e-10, atol=1e-12)
    assert not out["info_nce"].requires_grad


def test_split_api_reproduces_forward():
    img, txt = _feats(6, 4, 8)
    idx = torch.tensor([1, 5, 2, 8, 3, 0])
    a = _module(estimator="gamma", generator=torch.Generator().manual_seed(3))
    b = _module(estimator="gamma", generator=torch.Generator().manual_seed(3))
    for k in range(3):
        x = img * (1 + 0.3 * k)
        la = a(x, txt, idx, 2.0)
        row, col, pos = ck.lse_stats(x, txt, 2.0, compute_col=True, backend=BACKEND)
        lr = b.e_step(idx, row - math.log(6), "row")
        lc = b.e_step(idx, col - math.log(6), "col")
        l1, _ = ck.gamma_contrastive_loss(x, txt, 2.0, lr, backend=BACKEND)
        l2, _ = ck.gamma_contrastive_loss(txt, x, 2.0, lc, backend=BACKEND)
        torch.testing.assert_close(la, 0.5 * (l1 + l2), rtol=1e-12, atol=1e-12)
    assert not lr.requires_grad


def _train(m, steps, seed, start=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(77), dtype=torch.float64)
    losses = []
    for t in range(steps + start):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, 4, generator=g, dtype=torch.float64)
        idx = torch.randint(0, 12, (8,), generator=g)
        if t < start:
            continue
        losses.append(m(x @ w.T, y @ w.T, idx, 3.0).item())
    return losses


def test_state_dict_round_trip_continues_identically():
    a = _module(12, estimator="gamma", generator=torch.Generator().manual_seed(11))
    _train(a, 5, seed=1)
    sd = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.state_dict().items()}
    assert {"log_z_row", "visited_row", "log_z_col", "visited_col"} <= set(sd)
    cont_a = _train(a, 4, seed=2)
    b = _module(12, estimator="gamma", generator=torch.Generator().manual_seed(999))
    b.load_state_dict(sd)
    cont_b = _train(b, 4, seed=2)
    assert cont_a == cont_b
    for name in ("log_z_row", "log_z_col", "visited_row", "visited_col"):
        assert torch.equal(getattr(a, name), getattr(b, name))


def test_reproducible_with_generator_and_seed():
    runs = [_train(_module(12, estimator="gamma", generator=torch.Generator().manual_seed(s)), 6, 0)
            for s in (5, 5, 6)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    torch.manual_seed(42)
    r1 = _train(GammaContrastiveLoss(12, backend=BACKEND), 4, 0)
    torch.manual_seed(42)
    r2 = _train(GammaContrastiveLoss(12, backend=BACKEND), 4, 0)
    assert r1 == r2


@pytest.mark.parametrize("estimator", ["gamma", "ema", "batch"])
def test_large_logit_scale_no_overflow(estimator):
    m = GammaContrastiveLoss(16, estimator=estimator, backend=BACKEND,
                             generator=torch.Generator().manual_seed(0))
    img, txt = _feats(8, 16, 9, dtype=torch.float32, norm=True)
    img = (img * 1.0).requires_grad_()
    idx = torch.arange(8)
    for _ in range(2):
        out = m(img, txt, idx, 100.0, output_dict=True)
        (gi,) = torch.autograd.grad(out["contrastive_loss"], img)
        assert torch.isfinite(out["contrastive_loss"]) and torch.isfinite(gi).all()
        assert torch.isfinite(m.log_z_row).all() and m.log_z_row.max() > 50
    ref = reference.clip_loss(img.detach().double(), txt.double(), 100.0)
    torch.testing.assert_close(out["info_nce"].double(), ref, rtol=1e-4, atol=1e-3)


def test_duplicate_indices_average_in_z_space_order_independent():
    img, txt = _feats(4, 3, 10)
    img = img * 2
    idx = torch.tensor([3, 5, 3, 3])
    m = _module(estimator="ema", update_weight=0.5)
    m(img, txt, idx, 1.5)
    zr, zc = _log_z64(img, txt, 1.5)
    dup = torch.tensor([0, 2, 3])
    torch.testing.assert_close(m.log_z_row[3], torch.logsumexp(zr[dup], 0) - math.log(3),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(m.log_z_col[3], torch.logsumexp(zc[dup], 0) - math.log(3),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(m.log_z_row[5], zr[1], rtol=0, atol=1e-12)
    first = m.log_z_row[3].clone()
    # Second visit: one EMA update with the combined estimate; every duplicate row reads it.
    z2 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    out = m.update_state(idx, z2, "row")
    comb = torch.logsumexp(z2[dup], 0) - math.log(3)
    expect = torch.logaddexp(first + math.log(0.5), comb + math.log(0.5))
    torch.testing.assert_close(out[dup], expect.expand(3), rtol=0, atol=1e-12)
    log_u = m.estimate_log_u(idx, z2, "row")
    assert log_u[0] == log_u[2] == log_u[3]
    perm = torch.tensor([3, 1, 0, 2])
    p = _module(estimator="ema", update_weight=0.5)
    p(img[perm], txt[perm], idx[perm], 1.5)
    torch.testing.assert_close(p.log_z_row[3], first, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.log_z_col[3], torch.logsumexp(zc[dup], 0) - math.log(3),
                               rtol=0, atol=1e-12)


def test_one_directional_extra_negatives_and_labels():
    m = _module(estimator="ema", symmetric=False)
    assert m.directions == ("row",) and not hasattr(m, "log_z_col")
    q, k = _feats(3, 4, 12, m=7, grad=True)
    idx = torch.tensor([0, 1, 2])
    loss = m(q, k, idx, 2.0)  # positives: k[0..2]; k[3..6] extra negatives
    torch.testing.assert_close(loss, torch.tensor(1.0, dtype=torch.float64) - (2.0 * (q * k[:3]).sum(1)).mean())
    labels = torch.tensor([6, 6, 0])
    m(q, k, idx, 2.0, labels=labels)
    small = m(q, k[:2], idx, 2.0, labels=torch.tensor([1, 0, 1]))
    assert torch.isfinite(small)


def test_log_u_gets_no_gradient_and_state_is_not_in_graph():
    m = _module(estimator="gamma")
    img, txt = _feats(4, 3, 13, grad=True)
    loss = m(img, txt, torch.arange(4), 2.0)
    loss.backward()
    assert not m.log_z_row.requires_grad and m.log_z_row.grad_fn is None


def test_follows_device_moves_and_reports_mismatch():
    m = _module(estimator="ema").to("meta")
    assert m.log_z_row.device.type == "meta" and m.visited_col.device.type == "meta"
    img, txt = _feats(3, 2, 14)
    with pytest.raises(ValueError, match=r"\.to\("):
        m(img, txt, torch.arange(3), 1.0)


def test_reset_state():
    m = _module(estimator="ema")
    img, txt = _feats(3, 2, 15)
    m(img, txt, torch.arange(3), 1.0)
    m.reset_state()
    assert not m.visited_row.any() and not m.visited_col.any()


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(num_samples=2.5), ValueError, "num_samples"),
    (dict(estimator="sogclr"), ValueError, "estimator"),
    (dict(shape=0.0), ValueError, "shape"),
    (dict(shape=-1.0), ValueError, "shape"),
    (dict(update_weight=0.0), ValueError, r"\(0, 1\]"),
    (dict(update_weight=1.5), ValueError, r"\(0, 1\]"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(generator=123), TypeError, "generator"),
    (dict(dtype=torch.float16), TypeError, "dtype"),
])
def test_bad_constructor_arguments(kwargs, exc, msg):
    kw = dict(num_samples=10)
    kw.update(kwargs)
    n = kw.pop("num_samples")
    with pytest.raises(exc, match=msg):
        GammaContrastiveLoss(n, **kw)


def test_bad_forward_inputs():
    m = _module(estimator="ema")
    img, txt = _feats(4, 3, 16)
    idx = torch.arange(4)
    with pytest.raises(TypeError, match="int64"):
        m(img, txt, idx.int(), 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(img, txt, [0, 1, 2, 3], 1.0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        m(img, txt, idx[:3], 1.0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        m(img, txt, idx[:, None], 1.0)
    with pytest.raises(ValueError, match=r"\[0, 10\).*\[0, 10\]"):
        m(img, txt, torch.tensor([0, 1, 2, 10]), 1.0)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        m(img, txt, torch.tensor([0, -1, 2, 1]), 1.0)
    with pytest.raises(ValueError, match="batch sizes must match"):
        m(img, txt[:3], idx, 1.0)
    with pytest.raises(ValueError, match="feature dimensions"):
        m(img, txt[:, :2], idx, 1.0)
    with pytest.raises(ValueError, match="logit_scale"):
        m(img, txt, idx, -1.0)
    with pytest.raises(ValueError, match="symmetric=False"):
        m(img, txt, idx, 1.0, labels=idx)
    one = _module(estimator="ema", symmetric=False)
    with pytest.raises(ValueError, match="at least N=4"):
        one(img, txt[:3], idx, 1.0)
    with pytest.raises(ValueError, match="direction"):
        one.update_state(idx, torch.zeros(4, dtype=torch.float64), "col")
    with pytest.raises(ValueError, match="log_z_batch"):
        one.update_state(idx, torch.zeros(3, dtype=torch.float64))
    assert not m.visited_row.any()  # nothing was updated by the rejected calls
